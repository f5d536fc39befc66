import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import common
import data
import train
from conftest import REPO, run_script, script_env


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_torchrun_two_cpu_processes(cifar, tmp_path):
    out = tmp_path / "ddp"
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--device", "cpu", "--data-dir", cifar, "--epochs", "1", "--limit-train", "256",
                     "--limit-test", "100", "--batch-size", "64", "--max-lr", "0.5", "--no-amp", "--out", out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert sorted(os.listdir(out)) == ["best.pt", "curves.png", "last.pt", "metrics.json"]
    assert res.stdout.count("Test set:") == 1  # only rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    epoch = metrics["epochs"][0]
    assert epoch["train_images"] == 256  # the two shards together cover the epoch once
    assert metrics["per_class_test_acc"] is not None
    # the all-reduced test result counts every test image exactly once, and is that of the saved
    # model: both processes test with rank 0's BN statistics, the ones in best.pt (the high
    # --max-lr makes the two processes' statistics far apart, about 4% in test loss)
    assert "Accuracy: " in res.stdout and "/100 (" in res.stdout
    model, *_ = common.model_from_checkpoint(common.load_checkpoint(str(out / "best.pt")))
    test_x, test_y, _ = data.load_cifar10(cifar, "test")
    alone = train.evaluate(model, test_x[:100], test_y[:100], 100)
    assert alone["accuracy"] == epoch["test_acc"]
    assert alone["loss"] == pytest.approx(epoch["test_loss"], rel=1e-4)


def test_sync_bn_on_cpu_is_a_clear_error(cifar, tmp_path):
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--device", "cpu", "--data-dir", cifar, "--limit-train", "256", "--batch-size", "64",
                     "--out", tmp_path / "ddp", "--sync-bn")
    assert res.returncode != 0 and res.stderr.count("--sync-bn works only with CUDA GPUs") == 1
    assert "[rank0]: Traceback" not in res.stderr and "[rank1]: Traceback" not in res.stderr


def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_torchrun_killed_then_resumed(cifar, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--device", "cpu", "--data-dir", str(cifar), "--epochs", "2", "--limit-train", "512",
               "--limit-test", "100", "--batch-size", "64", "--max-lr", "0.05", "--out", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=script_env())
    for line in proc.stdout:
        if line.startswith("Epoch 2/2  step 1/8"):
            for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in new sessions
                os.kill(pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    single = run_script("train.py", "--device", "cpu", "--data-dir", cifar, "--resume", out / "last.pt")
    assert single.returncode == 1 and "saved by 2 process(es)" in single.stderr
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--device", "cpu", "--data-dir", cifar, "--resume", out / "last.pt")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "at epoch 2, step 0" in res.stdout and res.stdout.count("Test set:") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["world_size"] == 2
    single = run_script("train.py", "--device", "cpu", "--data-dir", cifar, "--resume", out / "last.pt")
    assert single.returncode == 0 and "is a finished run (2 of 2 epochs)" in single.stdout, single.stderr
