import json
import os

import pytest
import torch

from conftest import run_script


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_torchrun_two_cpu_processes(cifar, tmp_path):
    out = tmp_path / "ddp"
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--device", "cpu", "--data-dir", cifar, "--epochs", "1", "--limit-train", "256",
                     "--limit-test", "100", "--batch-size", "64", "--max-lr", "0.05", "--out", out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["best.pt", "curves.png", "last.pt", "metrics.json"]
    assert res.stdout.count("Test set:") == 1  # only rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    epoch = metrics["epochs"][0]
    assert epoch["train_images"] == 256  # the two shards together cover the epoch once
    assert metrics["per_class_test_acc"] is not None
    # the all-reduced test result counts every test image exactly once
    assert "Accuracy: " in res.stdout and "/100 (" in res.stdout


def test_sync_bn_on_cpu_is_a_clear_error(cifar, tmp_path):
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--device", "cpu", "--data-dir", cifar, "--limit-train", "256", "--batch-size", "64",
                     "--out", tmp_path / "ddp", "--sync-bn")
    assert res.returncode != 0 and res.stderr.count("--sync-bn works only with CUDA GPUs") == 1
    assert "[rank0]: Traceback" not in res.stderr and "[rank1]: Traceback" not in res.stderr
