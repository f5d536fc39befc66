"""results/gpu/run.py, the GPU call's driver, tried on the CPU with tiny runs: parallel steps each
leave a whole run folder, the deadline stops a long step without touching the others, and the log
says which step finished, which was stopped and which never started."""
import json
import subprocess
import sys
import tarfile

from conftest import REPO

TINY = "--device cpu --epochs 1 --limit-train 384 --limit-test 100 --batch-size 128 --max-lr 0.05"


def driver(tmp_path, cifar, *args, timeout=300):
    command = [sys.executable, "results/gpu/run.py", str(tmp_path / "out"), "--data-dir", str(cifar),
               "--work", str(tmp_path / "work"), "--no-mps", *args]
    res = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return res, (tmp_path / "out" / "log.txt").read_text()


def test_parallel_steps_each_leave_a_whole_run(cifar, tmp_path):
    res, log = driver(tmp_path, cifar, "--train-args", TINY, "--jobs", "2", "--parallel", "default", "nobnwd-seed1")
    assert res.returncode == 0, res.stderr
    for name, seed, bn_wd in (("default", 0, True), ("nobnwd-seed1", 1, False)):
        metrics = json.loads((tmp_path / "work" / name / "metrics.json").read_text())
        assert len(metrics["epochs"]) == 1 and metrics["args"]["seed"] == seed and metrics["args"]["bn_wd"] == bn_wd
        assert (tmp_path / "work" / name / "last.pt").is_file()
        assert f"end {name}: exit 0" in log and "final " in log
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/default/metrics.json" in names and "runs/nobnwd-seed1/log.txt" in names
    assert not [n for n in names if n.endswith(".pt")]


def test_the_deadline_stops_a_long_step_and_leaves_the_finished_one(cifar, tmp_path):
    """A tiny run beside a profile (minutes on a CPU) under a 45 s deadline: the run finishes
    whole, the profile is stopped with all its processes, and the step queued behind them is
    skipped or stopped, and the log says which."""
    res, log = driver(tmp_path, cifar, "--train-args", TINY, "--jobs", "2", "--deadline", "45",
                      "--parallel", "default", "profile", "lr0.4")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "work" / "default" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and "end default: exit 0" in log
    assert "stopped profile at the deadline" in log
    assert "skip lr0.4" in log or "stopped lr0.4" in log
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
    assert left == "", left


def test_an_unknown_step_stops_the_call_before_anything_runs(tmp_path):
    res = subprocess.run([sys.executable, "results/gpu/run.py", str(tmp_path / "out"), "--parallel", "default",
                          "fastest"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "unknown step fastest" in res.stderr
    assert not (tmp_path / "out").exists()
