import argparse
import copy
import itertools
import json
import math
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torchvision.transforms.functional as TF

import common
import data
import plumbing
import train
from resnet import ResNet18
from conftest import REPO, run_script, script_env

TINY = ["--limit-train", "128", "--limit-test", "50", "--batch-size", "32", "--max-lr", "0.05"]


def tiny_fit(cifar, out, **kw):
    args = dict(data_dir=str(cifar), out=str(out), limit_train=128, limit_test=50, batch_size=32, max_lr=0.05)
    args.update(kw)
    return train.fit(**args)


def test_help_lists_every_option():
    res = run_script("train.py", "--help")
    assert res.returncode == 0
    for flag in ["--epochs", "--batch-size", "--data-dir", "--out", "--optimizer", "--max-lr", "--wd",
                 "--label-smoothing", "--no-flip", "--seed", "--device", "--amp", "--no-amp", "--compile",
                 "--resume", "--download", "--no-download", "--limit-train", "--limit-test", "--tensorboard",
                 "--overwrite", "--sync-bn"]:
        assert flag in res.stdout, flag


def test_amp_selects_the_autocast_dtype_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert common.amp_dtype(cpu, amp=False) is None and common.amp_dtype(torch.device("cuda"), amp=False) is None
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: True)
    assert common.amp_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: False)
    assert common.amp_dtype(cpu) is None
    assert common.amp_dtype(torch.device("mps")) is None


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="reads Linux's CPU flags")
def test_cpu_bf16_only_where_linux_lists_bf16_units():
    """Plain AVX-512 runs bf16 by emulation, slower than fp32: bf16 only with AVX512-BF16 or AMX."""
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    assert common.cpu_supports_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_gpus_without_bf16_units_get_fp16_with_a_grad_scaler(monkeypatch, capability, dtype):
    """V100 (7.0) and Colab's T4 (7.5) emulate bf16, which torch.cuda.is_bf16_supported() counts as
    support; they must train in fp16 with a GradScaler. A100 (8.0) and H100 (9.0) get bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen = common.amp_dtype(torch.device("cuda"))
    assert chosen is dtype
    assert common.precision_name(chosen) == ("fp16 autocast + GradScaler" if capability < (8, 0) else "bf16 autocast")


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_make_optimizer_builds_the_recipe_s_optimizer(name):
    """SGD with Nesterov momentum 0.9, or Adam; both with the given LR and L2 weight decay."""
    optimizer = common.make_optimizer(torch.nn.Linear(3, 2), name, lr=0.1, wd=0.01)
    group = optimizer.param_groups[0]
    assert type(optimizer) is {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.01)
    if name == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"]


@pytest.mark.parametrize("option, value, says", [
    ("pct_start", 1.5, "argument --pct-start: must be a number in [0, 1), got 1.5"),  # it trained to chance in silence
    ("cutout_p", 2.0, "argument --cutout-p: must be a number in [0, 1], got 2.0"),
    ("optimizer", "adamw", "argument --optimizer: invalid choice: 'adamw'"),
    ("batch_size", 0, "argument --batch-size: must be at least 1, got 0"),
    ("epochs", 2.5, "argument --epochs: must be a whole number, got 2.5"),
    ("compile", "yes", "argument --compile: ignored explicit argument 'yes'"),
    ("batch_size", 100_000, "--batch-size 100000 is larger than the 50000 training images"),
])
def test_fit_refuses_a_value_the_command_line_refuses(option, value, says):
    with pytest.raises(common.UserError) as refused:
        train.fit(**{option: value})
    assert str(refused.value).startswith(f"fit(): {says}")
    with pytest.raises(TypeError, match="unknown option 'lr'"):
        train.fit(lr=0.1)


def test_fit_takes_what_the_command_line_takes(monkeypatch):
    monkeypatch.setattr(train, "start", lambda args: args)
    given = train.fit(epochs="3", data_dir=pathlib.Path("cifar"), max_lr="auto", ema=0.99, limit_train=None,
                      tta=False, compile_mode="reduce-overhead", wd=0)
    parsed = train.build_parser().parse_args(["--epochs", "3", "--data-dir", "cifar", "--max-lr", "auto", "--ema",
                                              "0.99", "--no-tta", "--compile-mode", "reduce-overhead", "--wd", "0"])
    assert vars(given) == vars(parsed)


def test_fit_learns_and_writes_outputs(cifar, tmp_path):
    out = tmp_path / "run"
    history = tiny_fit(cifar, out, epochs=3, max_lr=0.02)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["test_acc"] for e in metrics["epochs"]] == [h["test_acc"] for h in history]
    assert set(metrics["per_class_test_acc"]) == set(data.CLASSES)
    assert metrics["max_lr"] == 0.02 and metrics["best_test_acc"] == max(h["test_acc"] for h in history)
    for e in metrics["epochs"]:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"} <= set(e)
        assert 0 <= e["test_acc_tta"] <= 100
    assert metrics["final_test_acc_tta"] == history[-1]["test_acc_tta"]
    assert set(metrics["per_class_test_acc_tta"]) == set(data.CLASSES)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_shortest_onecycle_runs_and_shorter_is_a_clear_error(cifar, tmp_path):
    history = tiny_fit(cifar, tmp_path / "three", epochs=1, limit_train=96)  # 3 steps of 32
    assert len(history) == 1 and history[0]["train_images"] == 96
    with pytest.raises(common.UserError, match="only 2 training steps: OneCycle needs at least 3"):
        tiny_fit(cifar, tmp_path / "two", epochs=1, limit_train=64)


@pytest.mark.parametrize("smoothing, label", [(0.1, "train (targets smoothed by 0.1)"), (0.0, "train")])
def test_curves_say_when_the_train_loss_is_against_smoothed_targets(tmp_path, smoothing, label):
    history = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 1.9 / e, "train_acc": 30.0 * e, "test_acc": 31.0 * e}
               for e in (1, 2)]
    fig = plumbing.plot_curves(history, str(tmp_path / "curves.png"), smoothing)
    loss_legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert loss_legend == [label, "test"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_round_trip(cifar, tmp_path):
    out = tmp_path / "run"
    history = tiny_fit(cifar, out, epochs=1)
    ckpt = common.load_checkpoint(str(out / "best.pt"))
    assert ckpt["classes"] == list(data.CLASSES) and ckpt["mean"] == list(data.MEAN)
    assert ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 32 and ckpt["history"] == history
    assert {"optimizer", "scheduler", "scaler", "aug_generator"} <= set(ckpt)
    model, classes, mean, std = common.model_from_checkpoint(ckpt)
    assert classes == list(data.CLASSES) and (mean, std) == (data.MEAN, data.STD)
    test_x, test_y, _ = data.load_cifar10(cifar, "test")
    result = train.evaluate(model, test_x[:50], test_y[:50], batch_size=25,
                            amp_dtype=common.amp_dtype(torch.device("cpu")))
    assert result["accuracy"] == pytest.approx(history[0]["test_acc"])


@pytest.mark.slow
def test_resume_after_sigint_sigterm_and_sigkill_equals_uninterrupted_run(cifar, tmp_path):
    # On the CPU: CUDA's convolution kernels are not bit-reproducible (PyTorch's reproducibility
    # notes), and its tiny steps finish the epoch before the Ctrl-C below can land mid-epoch.
    base = ["train.py", "--data-dir", cifar, "--device", "cpu", "--epochs", "2", "--cutout-p", "1", *TINY]
    full = run_script(*base, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr

    def interrupted(out, wait_for, sig):
        proc = subprocess.Popen([sys.executable, *map(str, base), "--out", str(out)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=script_env())
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if wait_for in line:
                proc.send_signal(sig)
                break
        rest = proc.communicate(timeout=300)[0]
        return proc.returncode, "".join(lines) + rest

    hints = {}
    for name, sig, code_expected in [("int", signal.SIGINT, 130), ("term", signal.SIGTERM, 143)]:
        code, log = interrupted(tmp_path / name, "Epoch 1/2  step 2/4", sig)
        assert code == code_expected, log
        assert ("Interrupted at epoch 1" if name == "int" else "Stopped by SIGTERM at epoch 1") in log
        resume_line = [l for l in log.splitlines() if l.startswith("Resume with:")]
        hints[name] = ["python", "train.py", "--resume", str(tmp_path / name / "last.pt"), "--data-dir", str(cifar),
                       "--device", "cpu"]
        assert resume_line == ["Resume with: " + shlex.join(hints[name])]
        saved = common.load_checkpoint(str(tmp_path / name / "last.pt"))
        assert (saved["epoch"], saved["step"]) in [(0, 2), (0, 3)]
        assert saved["partial"][2] == saved["step"] * 32 and saved["partial"][3] > 0
    saved = common.load_checkpoint(str(tmp_path / "int" / "last.pt"))
    saved["partial"][3] += 1000.0  # as if the steps before the stop had taken 1,000 s more
    torch.save(saved, tmp_path / "int" / "last.pt")

    code, log = interrupted(tmp_path / "kill", "Epoch 2/2  step 1/4", signal.SIGKILL)
    assert code == -signal.SIGKILL
    killed = common.load_checkpoint(str(tmp_path / "kill" / "last.pt"))
    assert killed["epoch"] == 1
    common.load_checkpoint(str(tmp_path / "kill" / "best.pt"))

    reference = common.load_checkpoint(str(tmp_path / "full" / "last.pt"))
    kill_command = ["--data-dir", cifar, "--device", "cpu", "--resume", tmp_path / "kill" / "last.pt"]
    for name, command in [("int", hints["int"][2:]), ("term", hints["term"][2:]), ("kill", kill_command)]:
        res = run_script("train.py", *command)
        assert res.returncode == 0, res.stderr
        resumed = common.load_checkpoint(str(tmp_path / name / "last.pt"))
        assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
        for key, value in reference["model"].items():
            assert torch.equal(value, resumed["model"][key]), (name, key)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert [e["test_acc"] for e in metrics["epochs"]] == [h["test_acc"] for h in reference["history"]]
    first = json.loads((tmp_path / "int" / "metrics.json").read_text())["epochs"][0]
    assert first["train_images"] == 128 and first["train_seconds"] > 1000  # the whole epoch's time, both halves
    assert first["train_images_per_s"] < 128 / 1000


def test_non_finite_loss_stops_with_a_clear_message(cifar, tmp_path):
    res = run_script("train.py", "--data-dir", cifar, "--epochs", "1", "--out", tmp_path / "nan",
                     *TINY[:-2], "--max-lr", "1e12", "--no-amp")
    assert res.returncode == 1
    assert "non-finite at epoch 1, step" in res.stderr and "--max-lr" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_non_finite_loss_keeps_the_last_good_checkpoint(cifar, tmp_path, monkeypatch):
    calls = []

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        """Finite for the 4 steps of epoch 1, NaN from the first step of epoch 2 on."""

        def forward(self, logits, target):
            calls.append(1)
            loss = super().forward(logits, target)
            return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", PoisonedLoss)
    out = tmp_path / "run"
    with pytest.raises(plumbing.NonFiniteLoss, match="epoch 2, step 1;.*lower --max-lr"):
        tiny_fit(cifar, out, epochs=2)
    last = common.load_checkpoint(str(out / "last.pt"))
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert common.load_checkpoint(str(out / "best.pt"))["epoch"] == 1
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "device"),
    (["--limit-train", "60000"], "--limit-train: must be from 1 to 50,000, got 60000"),
    (["--limit-train", "100", "--batch-size", "128"], "larger than the 100 training images"),
    (["--max-lr", "fast"], "--max-lr"),
    (["--cutout-p", "1.5"], "--cutout-p"),
    (["--epochs", "2.5"], "--epochs: must be a whole number, got 2.5"),
    (["--batch-size", "many"], "--batch-size: must be a whole number, got many"),
    (["--wd", "x"], "--wd: must be zero or a positive number, got x"),
    (["--bn-momentum", "0"], "--bn-momentum: must be a number in (0, 1], got 0"),
    (["--ema", "1"], "--ema: must be a number in [0, 1), got 1"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    """In-process, as the command line runs main(): any exception but argparse's exit fails the test."""
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_an_argument_error():
    res = run_script("train.py", "--device", "cuda")
    assert res.returncode == 2 and "no CUDA GPU" in res.stderr


def test_existing_run_folder_is_not_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"precious")
    res = run_script("train.py", "--out", tmp_path / "run")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (tmp_path / "run" / "best.pt").read_bytes() == b"precious"


def test_unwritable_output_is_refused_before_training(cifar, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match="cannot write"):
        tiny_fit(cifar, tmp_path / "file" / "run", epochs=1)


def test_missing_data_without_download_is_one_clear_error(tmp_path):
    res = run_script("train.py", "--data-dir", tmp_path, "--no-download", "--out", tmp_path / "run")
    assert res.returncode == 1 and "CIFAR-10 not found" in res.stderr and "Traceback" not in res.stderr


def test_tensorboard_missing_is_a_clear_error(cifar, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(common.UserError, match="pip install tensorboard"):
        tiny_fit(cifar, tmp_path / "run", epochs=1, tensorboard=str(tmp_path / "tb"))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(common.UserError, match="refused"):
        common.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_and_other_architecture(tmp_path):
    good = {"model": ResNet18().state_dict(), "classes": list(data.CLASSES)}
    torch.save(good, tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        common.load_checkpoint(str(tmp_path / "cut.pt"))
    other = {"model": ResNet18(num_classes=100).state_dict(), "classes": list(data.CLASSES)}
    with pytest.raises(common.UserError, match=r"does not fit a CIFAR ResNet18 with 10 classes.*shapes.*train.py"):
        common.model_from_checkpoint(other)
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "none.pt"))


def test_max_lr_auto_refuses_a_range_test_whose_loss_never_fell(cifar, tmp_path, monkeypatch, capsys):
    """A sweep that only rose suggests no peak: the run stops in one sentence instead of training
    at the sweep's first LR."""
    sweep = train.lr_range.lr_range_test
    monkeypatch.setattr(train.lr_range, "lr_range_test", lambda *a, **kw: sweep(*a, **kw, start_lr=100, end_lr=1e6))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data-dir", str(cifar), "--out", str(tmp_path / "run"), "--max-lr", "auto",
                    "--lr-range-steps", "4", "--limit-train", "64", "--limit-test", "16", "--batch-size", "16",
                    "--device", "cpu"])
    said = stopped.value.code  # exit status 1, the sentence on stderr
    assert said.startswith("error: ") and "the loss never fell below its first value" in said
    assert "give --max-lr a number (sgd's default here: 0.0125)" in said
    assert (tmp_path / "run" / "lr_range.png").is_file() and not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_max_lr_auto_runs_the_range_test_and_records_it(cifar, tmp_path, capsys):
    out = tmp_path / "auto"
    tiny_fit(cifar, out, epochs=1, max_lr="auto", lr_range_steps=8, limit_train=128, batch_size=32)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_lr"] == metrics["lr_range"]["suggested_lr"] > 0
    ratio = 0.4 * 32 / 512 / metrics["max_lr"]  # against SGD's default peak at batch 32
    said = f"{ratio:.3g}x below" if ratio > 1 else f"{1 / ratio:.3g}x above"
    assert f"that is {said} sgd's hand-set default, 0.025" in capsys.readouterr().out
    assert len(metrics["lr_range"]["lrs"]) <= 8
    assert (out / "lr_range.png").is_file()
    assert common.load_checkpoint(str(out / "last.pt"))["max_lr"] == metrics["max_lr"]
    # lr_range.py on its own, with the same flags and seed, sweeps the same curve
    res = run_script("lr_range.py", "--data-dir", cifar, "--limit-train", "128", "--batch-size", "32",
                     "--num-iter", "8", "--device", "cpu", "--out", tmp_path / "alone")
    assert res.returncode == 0, res.stderr
    alone = json.loads((tmp_path / "alone" / "lr_range.json").read_text())
    assert alone["lrs"] == metrics["lr_range"]["lrs"]
    assert alone["losses"] == pytest.approx(metrics["lr_range"]["losses"], rel=1e-4)
    assert alone["suggested_lr"] == metrics["max_lr"]


def test_a_second_run_into_a_locked_folder_is_refused_at_once(tmp_path):
    folder = tmp_path / "run"
    with common.FolderLock(str(folder), log=lambda *a: None):
        with pytest.raises(common.UserError, match="another train.py or gradcam.py is writing to .*run; wait"):
            with common.FolderLock(str(folder)):
                pass
    with common.FolderLock(str(folder)):  # released on exit
        pass


def test_two_runs_into_one_folder_the_second_is_refused_and_the_first_finishes(cifar, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--data-dir", str(cifar), "--device", "cpu", "--epochs", "2",
               *map(str, TINY), "--out", str(out)]
    first = subprocess.Popen(command + ["--seed", "1"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=script_env())
    for line in first.stdout:
        if line.startswith("ResNet18 on"):  # the folder is locked and no checkpoint is written yet
            break
    second = run_script(*command[1:], "--seed", "2")
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    assert second.returncode in (1, 2) and "Traceback" not in second.stderr
    assert "another train.py or gradcam.py is writing to" in second.stderr or "already holds a run" in second.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["seed"] == 1 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]


def test_a_folder_holding_only_a_killed_save_is_reused_and_cleaned(cifar, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.k2j3h4.tmp").write_bytes(b"half a checkpoint")
    res = run_script("train.py", "--data-dir", cifar, "--device", "cpu", "--epochs", "1", *TINY, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "Removed 1 temp file(s)" in res.stdout
    assert sorted(os.listdir(out)) == ["best.pt", "curves.png", "last.pt", "metrics.json"]


def test_a_folder_without_last_pt_is_not_offered_for_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"x")
    res = run_script("train.py", "--out", tmp_path / "run", timeout=120)
    message = res.stderr.splitlines()[-1]
    assert res.returncode == 2 and "already holds a run" in message and "--resume" not in message


def test_resuming_a_finished_run_changes_nothing(cifar, tmp_path):
    out = tmp_path / "run"
    tiny_fit(cifar, out, epochs=1)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    res = run_script("train.py", "--resume", out / "last.pt", "--data-dir", cifar, "--device", "cpu", "--epochs", "3",
                     "--max-lr", "0.05", "--no-tta")  # --max-lr as saved: not named
    assert res.returncode == 0, res.stderr
    assert ("--resume continues the run with the recipe it was saved with; ignored: --epochs 3 (the run's: 1), "
            "--no-tta (the run's: True)\n") in res.stdout
    assert "is a finished run (1 of 1 epochs): nothing to resume and nothing changed" in res.stdout
    assert "Resuming" not in res.stdout
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_resuming_weights_alone_is_one_sentence(tmp_path, capsys):
    """ema.pt keeps the run's arguments with the weights, app.py --export's file only whether it
    tested with TTA; neither holds where the run stood (it was a KeyError traceback)."""
    for args in (vars(train.build_parser().parse_args([])), {"tta": True}):
        torch.save({"model": ResNet18().state_dict(), "classes": list(data.CLASSES), "args": args}, tmp_path / "w.pt")
        with pytest.raises(SystemExit) as stopped:
            train.main(["--resume", str(tmp_path / "w.pt")])
        assert "w.pt holds a model's weights but not a run's state, so it cannot be resumed" in stopped.value.code


def test_resuming_an_earlier_checkpoint_needs_overwrite(cifar, tmp_path, monkeypatch):
    out = tmp_path / "run"
    end_epoch = plumbing.end_epoch

    def keep_epoch_1(state, *args):  # a copy of last.pt after epoch 1, like a best.pt from then
        end_epoch(state, *args)
        if state.epoch == 1:
            shutil.copy(out / "last.pt", out / "epoch1.pt")

    monkeypatch.setattr(plumbing, "end_epoch", keep_epoch_1)
    tiny_fit(cifar, out, epochs=2)
    last = (out / "last.pt").read_bytes()
    res = run_script("train.py", "--resume", out / "epoch1.pt", "--data-dir", cifar, "--device", "cpu")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "is epoch 1 of a run whose last.pt has reached epoch 2" in res.stderr and "--overwrite" in res.stderr
    assert (out / "last.pt").read_bytes() == last
    res = run_script("train.py", "--resume", out / "epoch1.pt", "--data-dir", cifar, "--device", "cpu",
                     "--overwrite")
    assert res.returncode == 0, res.stderr
    assert "ignored" not in res.stdout  # where to run and --overwrite are the command line's to say
    assert "at epoch 2, step 0" in res.stdout and common.load_checkpoint(str(out / "last.pt"))["epoch"] == 2


def test_one_epoch_curves_have_whole_number_ticks(tmp_path):
    history = [{"epoch": 1, "train_loss": 2.0, "test_loss": 1.9, "train_acc": 30.0, "test_acc": 31.0}]
    fig = plumbing.plot_curves(history, str(tmp_path / "curves.png"))
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [1.0]


def test_peak_lr_follows_the_batch_size(cifar, tmp_path, capsys):
    tiny_fit(cifar, tmp_path / "run", epochs=1, max_lr=None, limit_train=96)
    assert "Peak LR 0.025 = 0.4 x batch 32 / 512" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["max_lr"] == pytest.approx(0.025)


def test_adam_without_a_peak_gets_its_own_never_sgd_s(cifar, tmp_path, capsys):
    tiny_fit(cifar, tmp_path / "run", epochs=1, max_lr=None, limit_train=96, optimizer="adam")
    assert "= 0.027 x batch 32 / 512 (linear scaling, adam's default" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["max_lr"] == pytest.approx(0.027 / 16)


def test_evaluating_more_images_than_labels_is_an_error():
    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="test_sums got 4 images but 3 labels"):  # it scored 3 in silence
        train.evaluate(ResNet18(), images, labels, batch_size=4)


def test_flip_tta_accuracy_is_that_of_the_mean_of_the_two_logits():
    """Against the logits of each image and of its mirror, computed separately: labels are set to
    the mean's prediction, so TTA must score 100% while the single view scores less."""
    torch.manual_seed(0)
    model = ResNet18().eval()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        x = data.normalize(images)
        plain, mirrored = model(x), model(x.flip(-1))
    labels = ((plain + mirrored) / 2).argmax(1)
    expected_plain = 100 * (plain.argmax(1) == labels).double().mean().item()
    assert expected_plain < 100
    result = train.evaluate(model, images, labels, batch_size=16, tta=True)
    assert result["accuracy_tta"] == 100 and result["correct_tta"] == 64
    assert result["accuracy"] == pytest.approx(expected_plain)
    assert "accuracy_tta" not in train.evaluate(model, images, labels, batch_size=16, tta=False)


def test_a_class_with_no_test_images_has_no_accuracy_rather_than_zero(cifar, tmp_path, capsys):
    model = ResNet18().eval()
    labels = torch.tensor([0, 0, 1, 1, 1, 3])
    result = train.evaluate(model, torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), labels, batch_size=4)
    for per_class in (result["per_class"], result["per_class_tta"]):
        assert [a is None for a in per_class] == [c not in (0, 1, 3) for c in range(10)]
        assert per_class[0] in (0, 50, 100) and per_class[1] in (0, 100 / 3, 200 / 3, 100)
    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_test=4)  # the first four test images: cat, ship, ship, airplane
    out = capsys.readouterr().out
    assert "dog (no test images)" in out and "dog 0.0%" not in out and "ship " in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [c for c, a in metrics["per_class_test_acc"].items() if a is None] == [
        "automobile", "bird", "deer", "dog", "frog", "horse", "truck"]


def test_six_view_tta_is_that_of_airbench_s_level_2():
    """Against views made by torchvision (reflect padding by one pixel, crops at the two corners)
    and scored one forward each: half the flip mean, half the mean of the four shifted views.
    Labels are set to that prediction, so six views must score 100% while flip TTA scores less."""
    torch.manual_seed(0)
    model = ResNet18().eval()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        x = data.normalize(images)
        padded = TF.pad(x, [1], padding_mode="reflect")
        shifted = [TF.crop(padded, top, top, 32, 32) for top in (0, 2)]
        flip_mean = (model(x) + model(TF.hflip(x))) / 2
        shifted_mean = sum(model(v) + model(TF.hflip(v)) for v in shifted) / 4
    labels = ((flip_mean + shifted_mean) / 2).argmax(1)
    assert (flip_mean.argmax(1) == labels).sum() < 64
    result = train.evaluate(model, images, labels, batch_size=16, tta6=True)
    assert result["correct_tta6"] == 64 and result["accuracy_tta6"] == 100
    assert result["correct_tta"] == (flip_mean.argmax(1) == labels).sum()
    assert "accuracy_tta6" not in train.evaluate(model, images, labels, batch_size=16)


def test_tta6_scores_each_epoch_beside_the_other_columns(cifar, tmp_path, capsys):
    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96, tta6=True)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["epochs"][0]["test_acc_tta6"] <= 100
    assert metrics["final_test_acc_tta6"] == metrics["epochs"][0]["test_acc_tta6"]
    assert metrics["final_test_acc_tta"] is not None and "; six views: " in capsys.readouterr().out


def test_no_tta_leaves_the_tta_fields_empty(cifar, tmp_path):
    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96, tta=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final_test_acc_tta"] is None and metrics["epochs"][0]["test_acc_tta"] is None
    assert metrics["final_test_acc_tta6"] is None


@pytest.mark.parametrize("bn_wd", [True, False])
def test_no_bn_wd_spares_the_one_dimensional_parameters(bn_wd):
    """With zero gradients only weight decay moves a parameter: w <- w - lr * wd * w on the first
    SGD step (Nesterov adds momentum * that again). --no-bn-wd must leave BN and biases alone."""
    torch.manual_seed(0)
    model = ResNet18()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = common.make_optimizer(model, "sgd", lr=0.1, wd=0.01, bn_wd=bn_wd)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        decayed = before[name] * (1 - 0.1 * 0.01 * 1.9)
        spared = p.ndim <= 1 and not bn_wd
        torch.testing.assert_close(p.detach(), before[name] if spared else decayed, msg=name)
    assert sum(p.ndim <= 1 for p in model.parameters()) == 20 * 2 + 1  # 20 BN layers' scale and shift, 1 bias


class OverwritesItsLastOutput(torch.nn.Module):
    """As torch.compile's reduce-overhead mode (CUDA graphs) does: each call writes over the memory of
    the output it returned before, so a tensor kept from an earlier step changes under its keeper
    (pytorch/pytorch#148439)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.last = net, None

    def forward(self, x):
        if self.last is not None:
            self.last.fill_(float("nan"))
        out = self.net(x)
        self.last = out.detach()  # the same memory
        return out


def test_the_loop_keeps_nothing_a_cuda_graph_replay_overwrites():
    """An epoch's sums and the test pass's scores equal those of a model whose outputs stay put:
    both use each step's outputs before the next step runs."""
    def run(wrap):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        model = OverwritesItsLastOutput(net) if wrap else net
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
                   for _ in range(4)]
        sums, seen = train.train_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, scaler, scheduler)
        images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator)
        scored = train.evaluate(model, images, torch.randint(0, 10, (40,), generator=generator), batch_size=16,
                                tta6=True)
        return sums, scored

    (plain_sums, plain), (sums, scored) = run(wrap=False), run(wrap=True)
    assert torch.equal(sums, plain_sums) and scored == plain


def test_training_and_testing_are_compiled_apart():
    """One compiled module toggled between train() and eval() recompiles (pytorch/pytorch#110803):
    with --compile the run trains through one compiled wrapper of the weights and tests through
    another, each called in one mode only."""
    args = train.build_parser().parse_args(["--compile", "--compile-mode", "reduce-overhead"])
    run = plumbing.Run(args)
    run.device = torch.device("cpu")
    net = ResNet18()
    model, test_model = plumbing.forwards(run, net)
    assert model is not test_model and model._orig_mod is net and test_model._orig_mod is net


def test_padded_evaluation_pads_the_last_batch_and_changes_no_result():
    """Image and mirror go through the model as one batch; pad=True pads the last one to full size."""
    torch.manual_seed(0)
    model = ResNet18()
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32))  # BN running statistics that are not the identity
    shapes = []
    hook = model.conv1.register_forward_hook(lambda module, inputs, output: shapes.append(inputs[0].shape[0]))
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (100,))
    padded = train.evaluate(model, images, labels, batch_size=64, tta=True, pad=True)
    assert shapes == [128, 128]  # two batches of 64 images and their mirrors; the last padded from 36
    shapes.clear()
    plain = train.evaluate(model, images, labels, batch_size=64, tta=True, pad=False)
    assert shapes == [128, 72]
    hook.remove()
    assert padded["per_class"] == plain["per_class"] and padded["per_class_tta"] == plain["per_class_tta"]
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-5) and padded["total"] == 100


def test_ema_is_the_moving_average_of_every_step_s_weights_and_statistics():
    """Against the average computed by hand from each step's weights and BN running means: the
    first step's, then decay x the average + (1 - decay) x the step's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = train.WeightAverage(model, 0.8)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(5)]
    snapshots = []

    def keep(i, loss, sums, seen):
        snapshots.append([t.detach().clone() for t in [*model.parameters(), model[1].running_mean]])

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = torch.nn.CrossEntropyLoss()
    train.train_epoch(model, batches, criterion, optimizer, scaler, scheduler, after_step=keep, ema=ema)
    expected = snapshots[0]
    for snapshot in snapshots[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, snapshot)]
    averaged = [*ema.module.parameters(), ema.module[1].running_mean]
    for got, want in zip(averaged, expected):
        torch.testing.assert_close(got, want)
    assert not torch.equal(averaged[0], snapshots[-1][0])  # an average, not the last weights


def test_ema_and_bn_momentum_reach_the_run_and_a_resume_continues_the_average_exactly(cifar, tmp_path, monkeypatch,
                                                                                      capsys):
    """The run trains the network with --bn-momentum's BatchNorm, averages its weights after every
    step, scores the average each epoch, keeps it as ema.pt when it scored better at the end (here
    made so), and a resume from epoch 1 continues the average to the same weights."""
    end_epoch, build_model, out, nets = plumbing.end_epoch, plumbing.build_model, tmp_path / "full", []

    def keep_epoch_1(state, stats, result):
        if state.run.args.out == str(out) and state.epoch == 1:  # the last epoch: the average scores better
            result = {**result, "accuracy_ema": result["accuracy"] + 1}
        end_epoch(state, stats, result)
        if state.epoch == 1:
            shutil.copy(out / "last.pt", tmp_path / "epoch1.pt")

    monkeypatch.setattr(plumbing, "end_epoch", keep_epoch_1)
    monkeypatch.setattr(plumbing, "build_model", lambda *args: nets.append(build_model(*args)) or nets[-1])
    tiny_fit(cifar, out, epochs=2, ema=0.9, bn_momentum=0.4, tta6=True)
    assert "; weights' average: " in capsys.readouterr().out
    assert {m.momentum for m in nets[0].modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.4}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["final_test_acc_ema"] <= 100
    assert metrics["final_test_acc_tta_ema"] is not None and metrics["final_test_acc_tta6_ema"] is not None
    full = common.load_checkpoint(str(out / "last.pt"))
    assert full["ema"]["n_averaged"] == 8  # 4 steps an epoch
    model, *_ = common.model_from_checkpoint(common.load_checkpoint(str(out / "ema.pt")))  # as gradcam.py loads it
    for key, value in model.state_dict().items():
        assert torch.equal(value, full["ema"]["module"][key]), key
    assert not torch.equal(model.conv1.weight, full["model"]["conv1.weight"])  # the average, not the weights
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "resumed" / "last.pt")
    train.fit(resume=str(tmp_path / "resumed" / "last.pt"), data_dir=str(cifar))
    resumed = common.load_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert resumed["ema"]["n_averaged"] == full["ema"]["n_averaged"]
    for key, value in full["ema"]["module"].items():
        assert torch.equal(value, resumed["ema"]["module"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("ema_acc, written", [(31.0, True), (30.0, False)])
def test_the_weights_average_is_kept_as_ema_pt_when_it_scored_better(tmp_path, ema_acc, written):
    args = train.build_parser().parse_args(["--epochs", "1", "--batch-size", "8", "--limit-train", "24", "--ema",
                                            "0.9", "--out", str(tmp_path)])
    torch.manual_seed(0)
    state = train.new_state(plumbing.Run(args).start(), ResNet18(), 0.05, None, data.CLASSES)
    with torch.no_grad():  # the weights move away from their average
        for parameter in state.net.parameters():
            parameter.add_(1.0)
    state.history = [{"epoch": 1, "train_loss": 2.0, "test_loss": 1.9, "train_acc": 30.0, "test_acc": 30.0,
                      "test_acc_ema": ema_acc, "train_seconds": 1.0}]
    plumbing.finish(state)
    assert (tmp_path / "ema.pt").is_file() == written
    if written:
        model, classes, *_ = common.model_from_checkpoint(common.load_checkpoint(str(tmp_path / "ema.pt")))
        assert classes == list(data.CLASSES)
        for key, value in state.ema.module.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key
        assert not torch.equal(model.conv1.weight, state.net.conv1.weight)


def test_warm_up_leaves_no_trace(cifar):
    """The warm-up trains a few steps on the run's shapes, then restores weights, BN statistics,
    optimizer, schedule and scaler exactly; the run's augmentation generator is not touched."""
    args = train.build_parser().parse_args(["--batch-size", "8", "--epochs", "2", "--limit-train", "64"])
    images, labels, classes = data.load_cifar10(cifar, "train")
    images, labels = images[:64], labels[:64]
    torch.manual_seed(0)
    net = ResNet18().to(memory_format=torch.channels_last)
    run = plumbing.Run(args).start()
    run.dtype = torch.float16  # a GradScaler that is on, as a T4 gets it (torch.amp's CPU scaler works alike)
    state = train.new_state(run, net, 0.2, None, classes)
    assert state.scaler.is_enabled()
    before = copy.deepcopy(state.checkpoint())
    criterion = torch.nn.CrossEntropyLoss()
    batches = train.epoch_batches(images, labels, batch_size=8, epoch=0,
                                  generator=data.device_generator(images.device, 5))
    plumbing.warm_up(state, lambda: train.train_epoch(net, itertools.islice(batches, 3), criterion, state.optimizer,
                                                      state.scaler, state.scheduler, torch.float16),
                     lambda: train.evaluate(net, images[:16], labels[:16], batch_size=8))
    after = state.checkpoint()
    assert state.warmup_seconds > 0 and state.scheduler.last_epoch == before["scheduler"]["last_epoch"]
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key
    assert after["optimizer"] == before["optimizer"] and after["scheduler"] == before["scheduler"]
    assert after["scaler"] == before["scaler"] and before["scaler"]["scale"] > 0
    assert torch.equal(after["aug_generator"][0], before["aug_generator"][0])
    assert all(p.grad is None for p in net.parameters())


def watched_epoch(monkeypatch, seconds_per_step, steps=97):
    """StepWatch over one epoch of a CUDA run (on a fake clock, no GPU needed): how many progress
    lines and finite checks, each a host sync on a GPU."""
    clock = iter(itertools.count(0, seconds_per_step / 4))  # StepWatch reads the clock 2 to 4 times a step
    monkeypatch.setattr(plumbing, "time", argparse.Namespace(perf_counter=lambda: next(clock)))
    run = argparse.Namespace(rank=0, world=1, device=torch.device("cuda"), args=argparse.Namespace(epochs=20),
                             stop_agreed=lambda collective=True: False)
    state = argparse.Namespace(run=run, step=0, steps=steps, epoch=0, max_lr=0.4, partial=None,
                               scheduler=argparse.Namespace(get_last_lr=lambda: [0.1]))
    counts = {"show": 0, "check_finite": 0}
    for name in counts:
        def counted(self, *args, name=name, method=getattr(plumbing.StepWatch, name)):
            counts[name] += 1
            return method(self, *args)
        monkeypatch.setattr(plumbing.StepWatch, name, counted)
    watch = plumbing.StepWatch(state)
    for i in range(steps):
        assert not watch(i, torch.tensor(2.0), torch.tensor([2.0 * 512 * (i + 1), 100.0]), 512 * (i + 1))
    return counts


@pytest.mark.parametrize("mode", ["terminal", "notebook", "log file"])
def test_progress_waits_for_the_gpu_at_most_a_few_times_a_second(monkeypatch, capsys, mode):
    """An epoch of 97 steps of 10 ms, as on an H200: progress and the finite check are host syncs,
    so they come at most every PROGRESS_SECONDS, not every step (a terminal had 97 a second). A
    slow step (a CPU's) still shows every step on a terminal, ten lines an epoch in a log file."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: mode == "terminal")
    if mode == "notebook":
        monkeypatch.setitem(sys.modules, "ipykernel", argparse.Namespace())
        monkeypatch.setattr(plumbing.StepWatch, "show", lambda self, *args: None)
    fast = watched_epoch(monkeypatch, 0.01)
    assert 1 <= fast["show"] <= 0.97 / plumbing.PROGRESS_SECONDS + 1 and fast["check_finite"] == fast["show"]
    slow = watched_epoch(monkeypatch, 3.0)
    assert slow["show"] == (97 // 9 + 1 if mode == "log file" else 97) and slow["check_finite"] == slow["show"]


def test_the_weights_average_stays_on_its_device_and_never_reads_it():
    """WeightAverage.update_parameters on a model on the meta device (no data: any copy to or from
    the host, or a read such as .item(), would fail or show here): every operation it runs takes
    and gives meta tensors only, so on a GPU no step waits for it or copies to it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for value in itertools.chain(args, (kwargs or {}).values()):
                for tensor in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(tensor, torch.Tensor):
                        self.seen.add(tensor.device.type)
            return func(*args, **(kwargs or {}))

    model = ResNet18().to("meta")
    average = train.WeightAverage(model, 0.9)
    with Devices() as mode:
        for _ in range(3):
            average.update_parameters(model)
    assert mode.seen == {"meta"} and average.n_averaged == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_never_waits_for_the_gpu():
    """The augmentation, train_step and the weights' average queue work without a host
    synchronisation: CUDA's sync debug mode raises on any operation that would make the host wait."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    net = ResNet18().to(device, memory_format=torch.channels_last)
    optimizer = common.make_optimizer(net, "sgd", 0.1, 5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=100)
    dtype = common.amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    generator = data.device_generator(device, 0)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (512,), device=device)
    batches = list(data.batch_indices(512, 128, shuffle=True, generator=torch.Generator().manual_seed(0),
                                      drop_last=True, device=device))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    average = train.WeightAverage(net, 0.99)

    def step(idx):
        x = data.train_transform(images[idx], generator, cutout_p=0.5).contiguous(memory_format=torch.channels_last)
        loss, logits = train.train_step(net, x, labels[idx], criterion, optimizer, scaler, scheduler, dtype)
        average.update_parameters(net)
        return loss, logits

    step(batches[0])  # cuDNN's autotuning may synchronise on first sight of a shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in batches[1:]:
            loss, _ = step(idx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_with_grad_scaler_learns_on_cuda(cifar, tmp_path, monkeypatch):
    """The path a T4 (compute capability 7.5) gets: fp16 autocast with a GradScaler. Forced here on
    whatever GPU there is; a short run must choose it, keep its loss finite and learn."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    history = tiny_fit(cifar, tmp_path / "fp16", epochs=4, limit_train=2048, limit_test=1000, device="cuda")
    metrics = json.loads((tmp_path / "fp16" / "metrics.json").read_text())
    assert metrics["precision"] == "fp16 autocast + GradScaler"
    assert torch.load(tmp_path / "fp16" / "last.pt", weights_only=True)["scaler"]["scale"] > 0
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert history[-1]["test_acc"] > 20


def test_alternate_flip_reaches_the_augmentation(cifar, tmp_path, monkeypatch):
    """--alternate-flip hands each batch its images' flips for the epoch; without it, none."""
    seen = []
    transform = data.train_transform

    def recording(images, generator, **kwargs):
        seen.append(kwargs["flip_mask"])
        return transform(images, generator, **kwargs)

    monkeypatch.setattr(data, "train_transform", recording)
    tiny_fit(cifar, tmp_path / "alternate", epochs=2, limit_train=96, alternate_flip=True, tta=False)
    assert len(seen) == 6 and all(mask is not None and len(mask) == 32 for mask in seen)
    epoch1, epoch2 = torch.cat(seen[:3]).sum(), torch.cat(seen[3:]).sum()
    assert int(epoch1) + int(epoch2) == 96  # each image mirrored in exactly one of the two epochs
    seen.clear()
    tiny_fit(cifar, tmp_path / "random", epochs=1, limit_train=96, tta=False)
    assert seen == [None, None, None]


@pytest.mark.parametrize("cutout_p", [0.0, 0.5, 1.0])
def test_cutout_reaches_every_training_batch_of_a_run(cifar, tmp_path, monkeypatch, cutout_p):
    """What train_step gets in a run: with --cutout-p 1 every image has its hole (exact zeros in all
    three channels, at least 8 x 8 pixels: 16 x 16 clipped by at most half at a border; a pixel of
    the image never normalizes to exactly zero), none with 0, some but not all with 0.5."""
    holes, step = [], train.train_step

    def recording(model, x, *args):
        holes.append(((x == 0).all(1).sum(dim=(1, 2)) >= 64).tolist())
        return step(model, x, *args)

    monkeypatch.setattr(train, "train_step", recording)
    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96, cutout_p=cutout_p, tta=False)
    cut = sum(holes, [])
    assert len(cut) == 96 and {0.0: not any(cut), 1.0: all(cut)}.get(cutout_p, 0 < sum(cut) < 96)


def test_compile_mode_reaches_torch_compile(cifar, tmp_path, monkeypatch, capsys):
    """--compile --compile-mode M compiles the training and the testing model with mode M (here
    torch.compile is replaced by a recorder: a real compile on the CPU takes about a minute); the
    warm-up line names only what a CPU run does."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: modes.append(mode) or module)
    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96, compile=True, compile_mode="max-autotune")
    assert modes == ["max-autotune", "max-autotune"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    said = f"Warm-up (compilation): {metrics['warmup_seconds']:.1f} s, not counted as training"
    assert said in capsys.readouterr().out
    assert metrics["warmup_seconds"] > 0 and metrics["wall_seconds"] > metrics["train_seconds"] > 0


@pytest.mark.slow
def test_an_enabled_grad_scaler_is_saved_and_resumed(cifar, tmp_path):
    """fp16's GradScaler (its scale and growth tracker) goes into last.pt and comes back on resume;
    on the CPU torch.amp's scaler is real too, so this needs no GPU."""
    args = train.build_parser().parse_args(["--batch-size", "8", "--epochs", "2", "--limit-train", "24",
                                            "--out", str(tmp_path)])
    images, labels, classes = data.load_cifar10(cifar, "train")

    def fp16_state():
        run = plumbing.Run(args).start()
        run.dtype = torch.float16
        torch.manual_seed(0)
        return train.new_state(run, ResNet18().to(memory_format=torch.channels_last), 0.05, None, classes)

    state = fp16_state()
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=2)
    batches = train.epoch_batches(images[:24], labels[:24], batch_size=8, epoch=0, generator=state.aug_generator)
    train.train_epoch(state.net, batches, torch.nn.CrossEntropyLoss(), state.optimizer, state.scaler,
                      state.scheduler, torch.float16)
    state.epoch = 1
    state.save(["last.pt"], state.checkpoint())
    resumed = fp16_state()
    resumed.restore(common.load_checkpoint(str(tmp_path / "last.pt")))
    saved = state.scaler.state_dict()
    assert saved["scale"] != 2.0 ** 20 or saved["_growth_tracker"] > 0  # three steps moved it
    assert resumed.scaler.state_dict() == saved


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_s_shape_follows_its_formula(anneal):
    """Start at peak / div_factor, reach the peak after pct_start of the steps, end at start /
    final_div_factor; on the way down, halfway is the mean of the two ends for both shapes, and a
    quarter of the way down is 0.75 of the way (linear) or cos's (1 + cos(pi / 4)) / 2 of it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)
    schedule = train.one_cycle(optimizer, 0.4, 100, 0.2, div_factor=5, final_div_factor=100, anneal=anneal)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    start, end, peak_step = 0.4 / 5, 0.4 / 5 / 100, 19  # the peak ends the first 20 steps
    assert lrs[0] == pytest.approx(start) and lrs[-1] == pytest.approx(end) and lrs[peak_step] == pytest.approx(0.4)
    assert max(lrs) == lrs[peak_step]
    down = 99 - peak_step  # steps from the peak to the last
    quarter = 0.75 if anneal == "linear" else (1 + math.cos(math.pi / 4)) / 2
    assert lrs[peak_step + down // 2] == pytest.approx((0.4 + end) / 2, rel=1e-3)
    assert lrs[peak_step + down // 4] == pytest.approx(end + quarter * (0.4 - end), rel=1e-3)


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    torch.manual_seed(0)
    net = ResNet18(zero_init_residual=True).eval()
    x = torch.randn(2, 64, 8, 8)
    block = net.layer1[0]
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x) if len(block.shortcut) else x))
    assert all(not b.bn2.weight.detach().any() for b in net.modules() if hasattr(b, "bn2"))
    assert int(ResNet18().layer1[0].bn2.weight.detach().sum()) == 64  # off by default


def test_onecycle_and_init_flags_reach_the_run(cifar, tmp_path, monkeypatch):
    """--div-factor 5 --anneal linear --zero-init-residual, seen in the run itself: the LR of each
    of its 10 steps against OneCycle's formula with a straight descent (torch's phases: up to step
    pct_start x 10 - 1 = 1.5, then down to step 9), and the network it trains starting with every
    residual block's last BatchNorm scale at zero."""
    lrs, nets, step, build_model = [], [], train.train_step, plumbing.build_model

    def recording(model, x, y, criterion, optimizer, *args):
        lrs.append(optimizer.param_groups[0]["lr"])
        return step(model, x, y, criterion, optimizer, *args)

    def built(*args):
        nets.append(build_model(*args))
        assert all(not block.bn2.weight.detach().any() for block in nets[-1].modules() if hasattr(block, "bn2"))
        return nets[-1]

    monkeypatch.setattr(train, "train_step", recording)
    monkeypatch.setattr(plumbing, "build_model", built)
    tiny_fit(cifar, tmp_path / "run", epochs=2, limit_train=160, div_factor=5.0, anneal="linear",
             zero_init_residual=True, tta=False)
    peak, start = 0.05, 0.05 / 5
    end = start / 1e4
    up = [start + (peak - start) * s / 1.5 for s in (0, 1)]
    down = [peak + (end - peak) * (s - 1.5) / 7.5 for s in range(2, 10)]
    assert len(nets) == 1 and lrs == pytest.approx(up + down, rel=1e-6)
