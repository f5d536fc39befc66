"""torchrun on the CPU: what cannot work there is one sentence. (Stopping, saving and resuming
under torchrun: tests/test_reliability.py.)"""
from conftest import run_script


def test_sync_bn_on_cpu_is_a_clear_error(cifar, tmp_path):
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--device", "cpu", "--data-dir", cifar, "--limit-train", "256", "--batch-size", "64",
                     "--out", tmp_path / "ddp", "--sync-bn")
    assert res.returncode != 0 and res.stderr.count("--sync-bn works only with CUDA GPUs") == 1
    assert "[rank0]: Traceback" not in res.stderr and "[rank1]: Traceback" not in res.stderr
