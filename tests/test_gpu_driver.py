"""results/gpu/run.py, the GPU call's driver, tried on the CPU with tiny runs: parallel steps each
leave a whole run folder, the deadline stops a long step without touching the others, and the log
says which step finished, which was stopped and which never started."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO

TINY = "--device cpu --epochs 1 --limit-train 48 --limit-test 16 --batch-size 16 --max-lr 0.05"


def driver(tmp_path, cifar, *args, timeout=300):
    command = [sys.executable, "results/gpu/run.py", str(tmp_path / "out"), "--data-dir", str(cifar),
               "--work", str(tmp_path / "work"), "--no-mps", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a thread a step: the profile does not starve the runs
    res = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return res, (tmp_path / "out" / "log.txt").read_text()


@pytest.mark.slow
def test_parallel_steps_finish_whole_and_the_deadline_stops_the_rest(cifar, tmp_path):
    """Two tiny runs beside a profile (minutes on a CPU) under a 30 s deadline: the runs finish,
    each a whole run folder; the profile is stopped with all its processes; the step queued behind
    them runs or not as time allows; the log says what each did; the tarball holds no checkpoint."""
    res, log = driver(tmp_path, cifar, "--train-args", TINY, "--jobs", "3", "--deadline", "30",
                      "--parallel", "default", "nobnwd-seed1", "profile", "lr0.4")
    assert res.returncode == 0, res.stderr
    for name, seed, bn_wd in (("default", 0, True), ("nobnwd-seed1", 1, False)):
        metrics = json.loads((tmp_path / "work" / name / "metrics.json").read_text())
        assert len(metrics["epochs"]) == 1 and metrics["args"]["seed"] == seed and metrics["args"]["bn_wd"] == bn_wd
        assert (tmp_path / "work" / name / "last.pt").is_file()
        assert json.loads((tmp_path / "work" / name / "step.json").read_text())["alone"] is False
        assert f"end {name}: exit 0" in log
    assert "stopped profile at the deadline" in log
    assert sum(f"{outcome} lr0.4" in log for outcome in ("skip", "stopped", "end")) == 1  # one way or another
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
    assert left == "", left
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/default/metrics.json" in names and "runs/nobnwd-seed1/log.txt" in names
    assert not [n for n in names if n.endswith(".pt")]


def test_a_step_that_cannot_start_in_time_is_skipped(cifar, tmp_path):
    res, log = driver(tmp_path, cifar, "--deadline", "10", "--parallel", "default", "gpu-tests")
    assert res.returncode == 0 and "skip default: 10s left" in log and "skip gpu-tests: 10s left" in log
    assert not (tmp_path / "work" / "default").exists()


def test_an_unknown_step_stops_the_call_before_anything_runs(tmp_path):
    res = subprocess.run([sys.executable, "results/gpu/run.py", str(tmp_path / "out"), "--parallel", "default",
                          "fastest"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "unknown step fastest" in res.stderr
    assert not (tmp_path / "out").exists()
