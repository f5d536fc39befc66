"""results/gpu/run.py, the GPU call's driver, tried on the CPU with tiny runs: parallel steps each
leave a whole run folder, the deadline stops a long step without touching the others, and the log
says which step finished, which was stopped and which never started."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, SHARED

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


def test_a_tty_step_trains_with_its_progress_on_a_pseudo_terminal(cifar, tmp_path):
    """default-tty: the default run as a person in a terminal sees it ('\\r'-updated progress, which
    a log file never gets), a whole run folder beside it."""
    res, log = driver(tmp_path, cifar, "--train-args", TINY, "--solo", "default-tty", "--parallel", "default")
    assert res.returncode == 0 and "end default-tty: exit 0" in log and "end default: exit 0" in log, log
    for name, tty in (("default-tty", True), ("default", False)):
        assert json.loads((tmp_path / "work" / name / "metrics.json").read_text())["args"]["seed"] == 0
        assert (b"\rEpoch 1/1  step 3/3" in (tmp_path / "work" / name / "log.txt").read_bytes()) == tty


def test_a_step_that_cannot_start_in_time_is_skipped(cifar, tmp_path):
    res, log = driver(tmp_path, cifar, "--deadline", "10", "--parallel", "default", "gpu-tests")
    assert res.returncode == 0 and "skip default: 10s left" in log and "skip gpu-tests: 10s left" in log
    assert not (tmp_path / "work" / "default").exists()


def test_an_unknown_step_stops_the_call_before_anything_runs(tmp_path):
    res = subprocess.run([sys.executable, "results/gpu/run.py", str(tmp_path / "out"), "--parallel", "default",
                          "fastest"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "unknown step fastest" in res.stderr
    assert not (tmp_path / "out").exists()


def prepared_call():
    """The run.sh command of results/README.md's section on how to run the GPU measurements."""
    text = (REPO / "results" / "README.md").read_text()
    section = text[text.index("## How to run the GPU measurements"):]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.docs
def test_the_prepared_gpu_call_names_known_steps_with_flags_train_py_takes():
    """A typo there would cost the next GPU session a machine's start: every step is one run.py
    knows, and each training step's command parses with train.py's own parser."""
    sys.path.insert(0, str(REPO / "results" / "gpu"))
    import run
    import train

    words = prepared_call()
    assert words[:3] == ["bash", "results/gpu/run.sh", "$OUT"]
    steps = [w for w in words[words.index("--solo") + 1:] if not w.startswith("--")]
    assert len(steps) > 20 and "sgd-auto" in steps and "spec-auto" in steps
    for name in steps:
        command = run.step_command(name, "folder")
        if run.is_training(name):
            args = train.build_parser().parse_args(shlex.split(command)[2:])
            assert args.seed == int(name.partition("-seed")[2] or 0)
            assert args.tta6 == name.startswith("compile-ro"), name  # six views on the candidate default only


def test_prepare_sh_leaves_the_tree_small_enough_to_travel(tmp_path):
    """prepare.sh in a clean clone: the data in .data/, the committed figures left behind, the
    whole under the 64 MiB that travels; the command the README gives puts the figures back."""
    if not (SHARED / "cifar10-jpeg.npz").is_file():
        pytest.skip(f"needs {SHARED}")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copy(REPO / "results" / "gpu" / "prepare.sh", clone / "results" / "gpu" / "prepare.sh")
    res = subprocess.run(["bash", "results/gpu/prepare.sh", str(SHARED)], cwd=clone, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(clone / ".data")) == ["build_batches.py", "cifar10-jpeg.npz"]
    assert not list(clone.glob("results/**/*.png"))
    assert int(res.stdout.split("travels: ")[1].split()[0]) < 64
    subprocess.run("git ls-files -d -z | xargs -0 git checkout --", shell=True, cwd=clone, check=True)
    assert subprocess.run(["git", "ls-files", "-d"], cwd=clone, capture_output=True, text=True).stdout == ""
    res = subprocess.run(["bash", "results/gpu/prepare.sh", str(tmp_path / "nowhere")], cwd=clone,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "pass the folder holding the JPEG copy" in res.stderr
