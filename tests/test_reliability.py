"""What goes wrong around a run, and how the scripts answer: signals, a full disk, a diverged model,
two runs into one folder, an oversized request."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import common
import data
import gradcam
import plumbing
import train
from conftest import REPO, run_script, script_env
from resnet import ResNet18
from test_train import TINY, tiny_fit


def strict_json(path):
    """json.load that refuses NaN and infinities, as strict parsers (JavaScript's, jq) do."""
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# Signals


def test_the_first_sigterm_asks_to_stop_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with plumbing.Run(train.build_parser().parse_args([])) as run:
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.signum == signal.SIGTERM and run.stop_agreed()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one ends the process
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # put back


def test_sigterm_during_a_save_leaves_no_temp_file(tmp_path):
    """gradcam.py and lr_range.py turn SIGTERM into SystemExit, so a save under way cleans up."""
    previous = signal.getsignal(signal.SIGTERM)
    common.exit_cleanly_on_sigterm()
    try:
        def write(f):
            f.write(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            f.write(b"the rest")  # the handler runs at the latest here

        with pytest.raises(SystemExit) as stopped:
            common.save_atomic(str(tmp_path / "figure.png"), write)
        assert stopped.value.code == 143 and os.listdir(tmp_path) == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_the_last_test_lets_the_run_finish(cifar, tmp_path, monkeypatch, capsys):
    """A SIGTERM while the last epoch is tested: everything is done, so the run finishes as usual
    instead of saving a 'resumable' finished run and printing a resume line."""
    result, calls = train.test_result, []

    def signal_in_epoch_2(sums, *args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result(sums, *args)

    monkeypatch.setattr(train, "test_result", signal_in_epoch_2)
    history = tiny_fit(cifar, tmp_path / "run", epochs=2)
    assert len(history) == 2 and "Resume with" not in capsys.readouterr().out
    assert len(strict_json(tmp_path / "run" / "metrics.json")["epochs"]) == 2


def test_ctrl_c_during_the_range_test_of_max_lr_auto_stops_at_once(cifar, tmp_path):
    """It used to record the signal and sweep on for minutes on a CPU, stopping only at the first
    training step. Now the sweep shows progress and stops at the next step, with nothing saved, so
    the same command starts over."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(cifar), "--out", str(out), "--device",
                             "cpu", "--max-lr", "auto", "--lr-range-steps", "100", *TINY[:-2]], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step "):  # the sweep's first progress line: step 10/100
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130 and "Traceback" not in rest, rest
    stopped_at = int(rest.split("Stopped during the LR range test, at step ")[1].split(";")[0])
    assert 10 <= stopped_at < 100 and "nothing was trained or saved: run the same command again" in rest
    assert plumbing.run_files(out) == []


def test_ctrl_c_in_gradcam_and_bench_is_one_line(tmp_path, monkeypatch, capsys):
    """Nothing to resume there: a line saying what is on disk, exit code 130, no traceback."""
    import bench

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradcam, "report", ctrl_c)
    monkeypatch.setattr(bench, "default_path", ctrl_c)
    runs = ((gradcam.main, ["--ckpt", str(tmp_path / "best.pt")]),
            (bench.main, ["--device", "cpu", "--steps", "1", "--windows", "1"]))
    for main, argv in runs:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        said = capsys.readouterr().err
        assert stopped.value.code == 130 and "Interrupted: the files written so far are whole" in said


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(cifar, tmp_path):
    """torchrun forwards Ctrl-C (SIGINT) to its two workers: both stop at the same step (they agree
    every 10 steps), rank 0 saves mid-epoch and prints the torchrun resume command; one process may
    not resume it; the command continues to the uninterrupted run's weights and record."""
    args = ["--device", "cpu", "--data-dir", str(cifar), "--epochs", "1", "--limit-train", "352", "--limit-test",
            "50", "--batch-size", "32", "--max-lr", "0.05", "--cutout-p", "1", "--no-amp"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    full = run_script(*torchrun, *args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert full.stdout.count("Test set:") == 1  # only rank 0 prints
    proc = subprocess.Popen([sys.executable, *torchrun, *args, "--out", str(tmp_path / "int")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=script_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Epoch 1/1  step 3/11"):
            proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    log = "".join(lines)
    assert "Interrupted at epoch 1, step 10/11" in log, log[-3000:]
    hint = f"torchrun --nproc_per_node=2 train.py --resume {tmp_path / 'int' / 'last.pt'} --data-dir {cifar} " \
           f"--device cpu"
    assert f"Resume with: {hint}" in log
    saved = common.load_checkpoint(str(tmp_path / "int" / "last.pt"))
    assert (saved["epoch"], saved["step"]) == (0, 10) and len(saved["aug_generator"]) == 2
    single = run_script("train.py", "--device", "cpu", "--data-dir", cifar, "--resume", tmp_path / "int" / "last.pt")
    assert single.returncode == 1 and "saved by 2 process(es); resume it with the same number" in single.stderr
    resumed = run_script(*torchrun[:-1], *hint.split()[2:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after = (common.load_checkpoint(str(tmp_path / name / "last.pt")) for name in ("full", "int"))
    for key, value in reference["model"].items():
        assert torch.equal(value, after["model"][key]), key
    for key in ("train_loss", "train_acc", "train_images", "test_acc"):  # the epoch's two halves add up
        assert after["history"][0][key] == pytest.approx(reference["history"][0][key], rel=1e-6), key
    assert sorted(os.listdir(tmp_path / "int")) == ["best.pt", "curves.png", "last.pt", "metrics.json"]
    # the all-reduced test result counts each test image once, with rank 0's BN statistics, those saved
    model, *_ = common.model_from_checkpoint(after)
    test_x, test_y, _ = data.load_cifar10(cifar, "test")
    alone = train.evaluate(model, test_x[:50], test_y[:50], batch_size=50)
    assert alone["accuracy"] == after["history"][0]["test_acc"] and alone["total"] == 50
    single = run_script("train.py", "--device", "cpu", "--data-dir", cifar, "--resume", tmp_path / "int" / "last.pt")
    assert single.returncode == 0 and "is a finished run (1 of 1 epochs)" in single.stdout, single.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("phase, line", [("after the last agreement", "Epoch 1/2  step 12/14"),
                                         ("during the test pass", "Epoch 1/2  step 14/14")])
def test_a_signal_late_in_an_epoch_under_torchrun_stops_every_rank_after_it(cifar, tmp_path, phase, line):
    """The processes agree on stopping every 10 steps, so a Ctrl-C after step 10 of 14 (or while
    the epoch is tested and saved) is agreed on at the epoch's end: every process stops there,
    at once, with the resume line, instead of rank 0 waiting on a gather the others never join."""
    args = ["--device", "cpu", "--data-dir", str(cifar), "--epochs", "2", "--limit-train", "448", "--limit-test",
            "50", "--batch-size", "32", "--max-lr", "0.05", "--no-amp", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=script_env())
    lines = []
    for text in proc.stdout:
        lines.append(text)
        if text.startswith(line) and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    log = "".join(lines)
    assert "Interrupted after epoch 1; saved" in log, log[-3000:]
    assert f"Resume with: torchrun --nproc_per_node=2 train.py --resume {tmp_path / 'run' / 'last.pt'}" in log
    saved = common.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert (saved["epoch"], saved["step"], saved["partial"]) == (1, 0, None)
    assert "Epoch 2/2" not in log, log[-3000:]


# ---------------------------------------------------------------------------------------------
# A full disk


class FullDisk:
    """Files opened by common.save_atomic take max_bytes, then fail as a full disk does."""

    def __init__(self, monkeypatch, max_bytes):
        self.max_bytes, real_fdopen = max_bytes, os.fdopen
        monkeypatch.setattr(common.os, "fdopen", lambda fd, mode: self.Writer(real_fdopen(fd, mode), self))

    class Writer:
        def __init__(self, f, disk):
            self.f, self.disk, self.written = f, disk, 0

        def write(self, chunk):
            self.written += len(chunk)
            if self.written > self.disk.max_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(chunk)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()


def test_a_full_disk_during_a_checkpoint_is_one_sentence_and_leaves_no_temp_file(cifar, tmp_path, monkeypatch):
    tiny_fit(cifar, tmp_path / "run", epochs=1)
    last = (tmp_path / "run" / "last.pt").read_bytes()
    FullDisk(monkeypatch, max_bytes=10_000_000)  # a checkpoint is about 89 MB
    with pytest.raises(common.DiskFull) as full:
        tiny_fit(cifar, tmp_path / "run", epochs=1, overwrite=True)
    message = str(full.value)
    assert str(tmp_path / "run") in message and "no space left" in message and "89 MB" in message
    assert "\n" not in message and not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]
    assert (tmp_path / "run" / "last.pt").read_bytes() == last  # the earlier file is whole


def test_torch_s_wrapped_disk_error_is_recognised():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file") from e
    except RuntimeError as wrapped:
        assert common.disk_full(wrapped)
    assert not common.disk_full(RuntimeError("another failure"))


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a small tmpfs (Linux, as root)")
def test_train_py_on_a_really_full_disk(cifar, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        res = run_script("train.py", "--data-dir", cifar, "--device", "cpu", "--epochs", "2", *TINY,
                         "--out", disk / "run")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "no space left on the disk of" in res.stderr and "89 MB" in res.stderr
        assert not [n for n in os.listdir(disk / "run") if n.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------------------------------------
# Out of memory: a batch too large for the GPU (or the CPU's memory)

CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "14.74 GiB of which 3.06 GiB is free.")


def test_out_of_memory_is_recognised_as_torch_raises_it():
    with pytest.raises(RuntimeError) as real:
        torch.empty(2 ** 48)  # 1 PiB: the CPU allocator's own error
    assert common.out_of_memory(real.value) and common.out_of_memory(CUDA_OOM)
    assert not common.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x10)"))


def raises(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def test_running_out_of_memory_while_training_is_one_sentence(cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_step", raises(CUDA_OOM))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data-dir", str(cifar), "--out", str(tmp_path / "run"), "--device", "cpu", *TINY])
    assert "error: out of memory on the device: run again with a smaller --batch-size" in stopped.value.code
    monkeypatch.setattr(train, "train_step", raises(RuntimeError("a bug, not the memory")))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        train.main(["--data-dir", str(cifar), "--out", str(tmp_path / "run2"), "--device", "cpu", *TINY])


def test_lr_range_and_bench_running_out_of_memory_is_one_sentence(cifar, tmp_path, monkeypatch):
    import bench
    import lr_range

    monkeypatch.setattr(lr_range, "lr_range_test", raises(CUDA_OOM))
    with pytest.raises(SystemExit) as stopped:
        lr_range.main(["--data-dir", str(cifar), "--device", "cpu", "--out", str(tmp_path / "lr")])
    assert stopped.value.code == "error: out of memory on the device: run again with a smaller --batch-size"
    monkeypatch.setattr(bench, "default_path", raises(CUDA_OOM))
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--device", "cpu", "--steps", "1", "--windows", "1"])
    assert stopped.value.code == "error: out of memory on the device: run again with a smaller --batch-size"


# ---------------------------------------------------------------------------------------------
# A diverged model


def test_a_non_finite_test_loss_stops_the_run_before_it_is_saved(cifar, tmp_path, monkeypatch):
    result, calls = train.test_result, []

    def nan_from_epoch_2(sums, *args):
        calls.append(1)
        scored = result(sums, *args)
        return {**scored, "loss": float("nan")} if len(calls) > 1 else scored

    monkeypatch.setattr(train, "test_result", nan_from_epoch_2)
    with pytest.raises(plumbing.NonFiniteLoss) as stopped:
        tiny_fit(cifar, tmp_path / "run", epochs=2)
    assert "non-finite after epoch 2" in str(stopped.value) and "epoch 1" in str(stopped.value)
    assert str(tmp_path / "run" / "last.pt") in str(stopped.value)
    assert common.load_checkpoint(str(tmp_path / "run" / "last.pt"))["epoch"] == 1
    assert common.load_checkpoint(str(tmp_path / "run" / "best.pt"))["epoch"] == 1
    assert len(strict_json(tmp_path / "run" / "metrics.json")["epochs"]) == 1


def test_divergence_in_a_replaced_run_does_not_claim_the_old_checkpoint(cifar, tmp_path):
    tiny_fit(cifar, tmp_path / "run", epochs=1)
    res = run_script("train.py", "--data-dir", cifar, "--epochs", "1", "--out", tmp_path / "run", "--overwrite",
                     *TINY[:-2], "--max-lr", "1e12", "--no-amp")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"no checkpoint of this run was saved in {tmp_path / 'run'}" in res.stderr
    assert "last good checkpoint" not in res.stderr


def test_metrics_json_is_strict_json_even_with_a_nan():
    path = REPO / ".pytest_cache" / "nan.json"
    path.parent.mkdir(exist_ok=True)
    common.save_json(str(path), {"loss": float("nan"), "epochs": [{"acc": float("inf"), "ok": 1.5}]})
    assert strict_json(path) == {"loss": None, "epochs": [{"acc": None, "ok": 1.5}]}


def test_gradcam_refuses_a_checkpoint_whose_outputs_are_not_finite(cifar, tmp_path):
    torch.manual_seed(0)
    model = ResNet18()
    with torch.no_grad():
        model.linear.bias.fill_(float("nan"))
    torch.save({"model": model.state_dict(), "args": {"tta": False}}, tmp_path / "nan.pt")
    res = run_script("gradcam.py", "--ckpt", tmp_path / "nan.pt", "--data-dir", cifar, "--limit-test", "50",
                     "--device", "cpu", "--out", tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "gives non-finite outputs (its training diverged)" in res.stderr
    assert not (tmp_path / "out" / "gradcam.png").exists()


# ---------------------------------------------------------------------------------------------
# gradcam.py: one run per folder, a bounded request, progress


def test_a_second_gradcam_into_a_busy_folder_is_refused_at_once(tmp_path):
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "m.pt")
    with common.FolderLock(str(tmp_path / "out")):
        res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--data-dir", tmp_path, "--out", tmp_path / "out",
                         "--device", "cpu", timeout=120)
    assert res.returncode == 1 and "another train.py or gradcam.py is writing to" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("count", ["51", "625"])
def test_an_oversized_count_is_one_line(count, tmp_path):
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--count", count, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "argument --count: must be from 1 to 50" in res.stderr


def test_scoring_a_long_test_set_shows_progress():
    lines = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    images = torch.randint(0, 256, (4500, 3, 32, 32), dtype=torch.uint8)
    probs = gradcam.predict(model, images, (0.5,) * 3, (0.25,) * 3, tta=True,
                            progress=lambda line, **kw: lines.append(line))
    assert probs.shape == (4500, 10)
    assert lines == [f"scored {n}/4,500 test images" for n in ("1,024", "2,048", "3,072", "4,096", "4,500")]


# ---------------------------------------------------------------------------------------------
# Small things


def test_one_epoch_is_not_one_epochs(cifar, tmp_path, capsys):
    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96)
    assert "batch 32, 1 epoch\n" in capsys.readouterr().out


def test_help_says_batchnorm_statistics_stay_per_process_under_torchrun():
    text = train.build_parser().format_help()
    assert "same results" not in text and "BatchNorm statistics" in text and "--sync-bn" in text


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_a_seed_outside_what_the_random_streams_take_is_a_usage_error(seed, capsys):
    import lr_range

    for parser, given in ((train.build_parser(), []), (lr_range.build_parser(), []),
                          (gradcam.build_parser(), ["--ckpt", "m.pt"])):
        with pytest.raises(SystemExit) as stopped:  # 99999999999999999999 was an overflow traceback
            parser.parse_args(given + ["--seed", seed])
        assert stopped.value.code == 2 and "argument --seed: must be from 0 to 4,294,967,295" in capsys.readouterr().err


def test_the_largest_seed_drives_every_random_stream(cifar, tmp_path):
    import lr_range

    history = tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96, seed=common.SEED_MAX, alternate_flip=True)
    assert len(history) == 1
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8)
    batches, _ = lr_range.lr_range_inputs(images, labels, 4, seed=common.SEED_MAX)
    assert len(next(batches)[1]) == 4
    probs = torch.eye(10)[(labels + 1) % 10]  # every prediction wrong
    assert len(gradcam.misclassified(probs, labels, 3, seed=common.SEED_MAX)) == 3
