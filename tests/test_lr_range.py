import io
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import data
import lr_range
import train
from conftest import REPO, run_script, script_env
from lr_range import LRRangeResult, lr_range_test, plot_lr_range
from resnet import ResNet18


@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_schedule_hits_start_and_end_exactly(mode):
    lrs = scripted_run([2.0] * 100, num_iter=100, end_lr=10, step_mode=mode).lrs
    assert len(lrs) == 100 and lrs[0] == 1e-7 and lrs[-1] == 10
    if mode == "exp":
        ratios = [b / a for a, b in zip(lrs, lrs[1:])]
        assert max(ratios) == pytest.approx(min(ratios)) == pytest.approx(1e8 ** (1 / 99))
    else:
        steps = [b - a for a, b in zip(lrs, lrs[1:])]
        assert max(steps) == pytest.approx(min(steps)) == pytest.approx((10 - 1e-7) / 99)


def steepest(curve):
    result = LRRangeResult(lrs=list(range(len(curve))), smoothed=list(curve))
    return result.suggest().suggested_lr


class ScriptedLoss:
    """A criterion returning a given loss sequence (still differentiable, so the step runs)."""

    def __init__(self, values):
        self.values = iter(values)

    def __call__(self, output, target):
        return output.sum() * 0 + next(self.values)


def scripted_run(values, **kw):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.ones(4, 2), torch.zeros(4))]
    return lr_range_test(model, optimizer, ScriptedLoss(values), batches, **kw)


@pytest.mark.parametrize("batches, ran", [((b for b in [(torch.ones(4, 2), torch.zeros(4))] * 3), 3), ([], 0)])
def test_batches_that_run_out_for_good_are_an_error_not_a_short_curve(batches, ran):
    """A generator cannot start again: it gave 3 points and a suggestion as if swept (an empty list
    gave none and a NaN LR)."""
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=f"batches ran out at step {ran} of 10; pass a list or a DataLoader"):
        lr_range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), ScriptedLoss([1.0] * 10), batches,
                      num_iter=10)


def test_smoothing_matches_hand_computation():
    result = scripted_run([2.0, 1.0, 3.0, 0.5], num_iter=4, smooth=0.05)
    assert result.losses == [2.0, 1.0, 3.0, 0.5]
    # s0 = 2; s1 = .05*1 + .95*2 = 1.95; s2 = .05*3 + .95*1.95 = 2.0025; s3 = .05*.5 + .95*2.0025 = 1.927375
    assert result.smoothed == pytest.approx([2.0, 1.95, 2.0025, 1.927375])
    assert not result.diverged and len(result.lrs) == 4


def test_divergence_stops_the_sweep():
    values = [1.0] * 10 + [100.0] + [1.0] * 89
    result = scripted_run(values, num_iter=100, smooth=0.05, diverge_th=5)
    # after step 11 the smoothed loss is .05*100 + .95*1 = 5.95 > 5 * 1
    assert result.diverged and len(result.losses) == 11
    assert result.smoothed[-1] == pytest.approx(5.95)


def test_suggestion_is_the_steepest_descent_of_a_synthetic_curve():
    n = 100
    # falls like a logistic centred on step 40, bottoms out near 70, then blows up
    curve = [2.3 - 1.5 / (1 + math.exp(-(i - 40) / 4)) + (0.02 * (i - 70) ** 2 if i > 70 else 0) for i in range(n)]
    assert steepest(curve) == 40
    result = scripted_run(curve, num_iter=n, smooth=1.0, diverge_th=1e9)
    assert result.suggested_lr == result.lrs[40]
    assert result.min_loss_lr == result.lrs[curve.index(min(curve))]
    assert result.picks["minimum/10"] == pytest.approx(result.min_loss_lr / 10)
    assert result.picks["steepest"] == result.suggested_lr and result.picks["minimum"] == result.min_loss_lr


def test_late_second_descent_is_not_suggested():
    curve = [2.0 - 0.02 * i for i in range(40)] + [3.0 + 0.5 * i for i in range(20)] + [13 - 0.2 * i for i in range(40)]
    assert steepest(curve) < 40


def _snapshot(model, optimizer):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_model_and_optimizer_are_restored_byte_for_byte(opt):
    torch.manual_seed(0)
    model = ResNet18()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()  # give the optimizer some state first
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    before = _snapshot(model, optimizer)
    result = lr_range_test(model, optimizer, nn.CrossEntropyLoss(), [(x, y)], start_lr=1e-4, end_lr=1, num_iter=4)
    assert len(result.lrs) == 4 and result.losses[0] != result.losses[-1]
    assert _snapshot(model, optimizer) == before
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_plot_written(tmp_path):
    result = scripted_run([2.3 - 0.01 * i for i in range(30)], num_iter=30)
    plot_lr_range(result, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    assert isinstance(result, LRRangeResult) and set(result.to_dict()) >= {"lrs", "losses", "smoothed", "suggested_lr"}


def test_cli_writes_plot_and_json(cifar, tmp_path):
    res = run_script("lr_range.py", "--data-dir", cifar, "--limit-train", "128", "--batch-size", "32",
                     "--num-iter", "8", "--end-lr", "1", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "suggested max LR" in res.stdout and "step 8/8  lr 1  loss" in res.stdout
    curve = json.loads((tmp_path / "lr_range.json").read_text())
    assert len(curve["lrs"]) == len(curve["losses"]) <= 8 and curve["lrs"][0] == 1e-7
    assert (tmp_path / "lr_range.png").is_file()


def test_a_curve_whose_loss_never_fell_suggests_nothing():
    assert scripted_run([2.0, 2.5, 1.9], num_iter=3).loss_fell  # one step below the first is enough
    rose = scripted_run([2.0, 3.0, 2.0], num_iter=3)
    assert not rose.loss_fell and "never fell below its first value (2 at LR 1e-07) in 3 steps" in rose.no_fall()
    read_back = LRRangeResult(lrs=[0.1, 1.0, 10.0], smoothed=[2.0, 2.5, 3.0]).suggest()  # no raw losses kept
    assert not read_back.loss_fell and "(2 at LR 0.1) in 3 steps" in read_back.no_fall()


def test_cli_says_a_sweep_that_only_rose_suggests_no_lr(cifar, tmp_path, capsys):
    """From LR 100 the first update blows the loss up: before, it printed 'suggested max LR 100'."""
    with pytest.raises(SystemExit) as stopped:
        lr_range.main(["--data-dir", str(cifar), "--limit-train", "64", "--batch-size", "16", "--num-iter", "5",
                       "--start-lr", "100", "--end-lr", "1e6", "--device", "cpu", "--out", str(tmp_path)])
    assert "the loss never fell below its first value" in str(stopped.value.code)
    out = capsys.readouterr().out
    assert "lower --start-lr" in str(stopped.value.code) and "suggested" not in out
    curve = json.loads((tmp_path / "lr_range.json").read_text())
    assert curve["diverged"] and f"the loss diverged at step {len(curve['lrs'])} of 5 (LR " in out
    assert json.loads((tmp_path / "lr_range.json").read_text())["loss_fell"] is False  # the curve is kept


def test_ctrl_c_during_the_sweep_keeps_the_curve_so_far(cifar, tmp_path, monkeypatch, capsys):
    def stop_at_step_3(num_iter):
        def show(step, lr, loss):
            if step == 2:
                raise KeyboardInterrupt
        return show

    monkeypatch.setattr(lr_range, "progress_printer", stop_at_step_3)
    with pytest.raises(SystemExit) as stopped:
        lr_range.main(["--data-dir", str(cifar), "--limit-train", "64", "--batch-size", "16", "--num-iter", "20",
                       "--device", "cpu", "--out", str(tmp_path)])
    assert stopped.value.code == 130 and "Stopped at step 3 of 20" in capsys.readouterr().out
    curve = json.loads((tmp_path / "lr_range.json").read_text())
    assert len(curve["lrs"]) == len(curve["losses"]) == len(curve["smoothed"]) == 3
    assert curve["smoothed"][1] == pytest.approx(0.05 * curve["losses"][1] + 0.95 * curve["losses"][0])
    assert (tmp_path / "lr_range.png").is_file()


def test_ctrl_c_before_the_first_step_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):  # Ctrl-C while the images load: it was a KeyboardInterrupt traceback
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_cifar10", interrupted)
    with pytest.raises(SystemExit) as stopped:
        lr_range.main(["--device", "cpu", "--out", str(tmp_path)])
    assert stopped.value.code == 130
    assert "Interrupted: the files written so far are whole; run again for the rest" in capsys.readouterr().err
    assert not (tmp_path / "lr_range.json").exists()


def test_sigterm_during_the_sweep_keeps_the_curve_so_far(cifar, tmp_path):
    """A scheduler's SIGTERM, sent for real once the first progress line is out."""
    proc = subprocess.Popen([sys.executable, "lr_range.py", "--data-dir", str(cifar), "--limit-train", "256",
                             "--batch-size", "64", "--num-iter", "100", "--device", "cpu", "--out", str(tmp_path)],
                            cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out = line + proc.stdout.read()
    assert proc.wait(timeout=120) == 143 and "Traceback" not in out, out
    steps = len(json.loads((tmp_path / "lr_range.json").read_text())["lrs"])
    assert 10 <= steps < 100 and f"Stopped at step {steps} of 100; the curve so far is saved" in out


@pytest.mark.parametrize("flag", [["--wd", "-1"], ["--label-smoothing", "1"]])
def test_cli_refuses_bad_values_in_one_line(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # in-process: any other exception fails the test
        lr_range.main([*flag, "--out", str(tmp_path)])
    assert stopped.value.code == 2 and f"argument {flag[0]}: must" in capsys.readouterr().err


def test_cli_defaults_are_train_py_defaults():
    """lr_range.py writes its defaults as literals (it does not import train.py); they must stay
    the recipe train.py --max-lr auto sweeps with."""
    mine, theirs = lr_range.build_parser(), train.build_parser()
    for key in ("optimizer", "wd", "label_smoothing", "batch_size", "cutout_p", "no_flip", "seed", "data_dir",
                "device", "amp", "download", "limit_train"):
        assert mine.get_default(key) == theirs.get_default(key), key


class CountingLoader:
    """A DataLoader's shape of batches: (images, labels, indices) on the CPU, a new pass per iter()."""

    def __init__(self, n_batches):
        self.n_batches, self.passes = n_batches, 0

    def __iter__(self):
        self.passes += 1
        for i in range(self.n_batches):
            yield torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.arange(4) + 4 * i


def test_batches_with_extra_items_run_out_and_start_again():
    model = nn.Linear(2, 3)
    loader = CountingLoader(2)
    result = lr_range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), loader,
                           num_iter=5, end_lr=1e-3)
    assert len(result.lrs) == 5 and loader.passes == 3  # 2 + 2 + 1 batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_batches_reach_a_cuda_model():
    model = nn.Linear(2, 3).cuda()
    result = lr_range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                           CountingLoader(2), num_iter=3, end_lr=1e-3)
    assert len(result.lrs) == 3


@pytest.mark.parametrize("kwargs", [{"num_iter": 1}, {"num_iter": 0}, {"step_mode": "cos"}, {"end_lr": 1e-8}])
def test_impossible_sweeps_are_one_sentence(kwargs):
    with pytest.raises(ValueError, match="lr_range_test needs num_iter >= 2"):
        scripted_run([1.0] * 5, **{"num_iter": 5, **kwargs})


def test_progress_is_called_after_every_step():
    seen = []
    scripted_run([2.0, 1.5, 1.0], num_iter=3, progress=lambda step, lr, loss: seen.append((step, loss)))
    assert seen == [(0, 2.0), (1, 1.5), (2, 1.0)]


@pytest.mark.parametrize("value", ["0", "1"])
def test_cli_num_iter_below_two_is_one_message(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        lr_range.main(["--num-iter", value, "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "argument --num-iter: must be at least 2" in capsys.readouterr().err


def _sweep_in_a_process(rank, world, out):
    """One torchrun-like process: rank 1's loss explodes at step 6, rank 0's never does."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
    values = [2.0] * 6 + ([1e6] * 14 if rank == 1 else [1.5] * 14)

    def mean_loss(loss):
        dist.all_reduce(loss)
        return loss / world

    result = scripted_run(values, num_iter=20, mean_loss=mean_loss)
    (out / f"rank{rank}.json").write_text(json.dumps(result.to_dict()))
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_processes_that_average_their_loss_take_the_same_number_of_steps(tmp_path):
    """Alone, rank 1 would stop at its explosion and rank 0 sweep on, leaving rank 0's next
    collective call waiting; with mean_loss both follow one curve and stop at the same step."""
    torch.multiprocessing.spawn(_sweep_in_a_process, args=(2, tmp_path), nprocs=2)  # a file store: no port to race for
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0["lrs"]) == len(rank1["lrs"]) == 7 and rank0["diverged"] and rank1["diverged"]
    assert rank0["losses"] == rank1["losses"]


def test_every_rule_is_read_off_the_curve():
    """A flat start, a steady fall over 30 steps, a climb: fastai's valley lands in the middle of
    the fall, the minimum at its end, and a third and a tenth of it are just that."""
    curve = [3.0] * 10 + [3.0 - 0.05 * (i + 1) for i in range(30)] + [1.5 + 0.2 * i for i in range(20)]
    lrs = [10 ** (-6 + 7 * i / 59) for i in range(60)]
    result = LRRangeResult(lrs=lrs, smoothed=curve).suggest("valley")
    assert result.min_loss_lr == lrs[39] and result.picks["minimum/3"] == pytest.approx(lrs[39] / 3)
    valley = lrs.index(result.picks["valley"])
    assert 10 + 30 // 3 <= valley <= 10 + 2 * 30 // 3 and result.suggested_lr == result.picks["valley"]
    assert set(result.to_dict()["picks"]) == set(lr_range.RULES)


@pytest.mark.docs
@pytest.mark.parametrize("path", ["results/gpu/h100/spec-recipe-auto/metrics.json",
                                  "results/lr_range/cpu-adam-100/lr_range.json"])
def test_on_the_committed_adam_curves_the_minimum_lies_near_the_best_peak_and_the_steepest_far_below(path):
    """The spec's recipe (Adam, all 50,000 images, batch 512, 100 steps; on an H100 and on the CPU):
    its best measured peak is 2.7e-2 (87.86%, 3 seeds), while the steepest slope's 1.7e-4 trained
    to 84.03%."""
    best = 0.027
    record = json.loads((REPO / path).read_text())
    curve = record.get("lr_range", record)
    picks = LRRangeResult(lrs=curve["lrs"], smoothed=curve["smoothed"]).suggest().picks
    assert best / 2 <= picks["minimum"] <= best * 2
    assert picks["steepest"] < best / 100


@pytest.mark.docs
def test_on_the_committed_adam_curves_the_100_step_minimum_is_a_plateau_and_300_steps_put_it_4x_below():
    """The spec's recipe swept over 300 steps (cpu-adam-300, diverged at step 273) has a clear
    minimum at 6.2e-3, and every rule more than 2x below 2.7e-2; over 100 steps (CPU, H100) the
    smoothed loss is flat within 0.014 from 0.005 to 0.03, so their minimum near 2.7e-2 is noise."""
    best = 0.027
    curve = json.loads((REPO / "results/lr_range/cpu-adam-300/lr_range.json").read_text())
    picks = LRRangeResult(lrs=curve["lrs"], smoothed=curve["smoothed"]).suggest().picks
    assert curve["args"]["num_iter"] == 300 and curve["diverged"] and len(curve["lrs"]) == 273
    assert picks["minimum"] == pytest.approx(0.00616, rel=0.01)
    assert picks["steepest"] == pytest.approx(7.76e-5, rel=0.01)
    assert max(picks.values()) < best / 2
    for path in ("results/gpu/h100/spec-recipe-auto/metrics.json", "results/lr_range/cpu-adam-100/lr_range.json"):
        record = json.loads((REPO / path).read_text())
        record = record.get("lr_range", record)
        plateau = [loss for lr, loss in zip(record["lrs"], record["smoothed"]) if 0.005 <= lr <= 0.03]
        assert len(plateau) >= 8 and max(plateau) - min(plateau) < 0.014


@pytest.mark.docs
@pytest.mark.parametrize("folder", ["cpu-sgd-100", "cpu-sgd-300", "cpu-sgd-warm"])
def test_on_the_committed_sgd_curves_no_rule_comes_within_2x_of_the_best_peak(folder):
    """The default recipe's sweeps (SGD, all 50,000 images, batch 512, seed 0; CPU bf16): from fresh
    weights over 100 steps (cpu-sgd-100) and 300 (cpu-sgd-300), and over 100 after an epoch at the
    first one's steepest pick, 0.0148 (cpu-sgd-warm, results/lr_range/warm_sweep.py). On each every
    rule picks more than 2x below 0.4, the best measured peak (0.33 points above 0.2 over 4 and 3
    seeds on an H200). The README says so; this keeps it true."""
    curve = json.loads((REPO / "results/lr_range" / folder / "lr_range.json").read_text())
    picks = LRRangeResult(lrs=curve["lrs"], smoothed=curve["smoothed"]).suggest().picks
    steps, steepest, minimum = {"cpu-sgd-100": (100, 0.0148, 0.0313), "cpu-sgd-300": (300, 0.00788, 0.0325),
                                "cpu-sgd-warm": (100, 7.74e-7, 0.0179)}[folder]
    assert len(curve["lrs"]) == steps and curve["args"]["limit_train"] is None and curve["args"]["batch_size"] == 512
    assert picks["steepest"] == pytest.approx(steepest, rel=0.01)
    assert picks["minimum"] == pytest.approx(minimum, rel=0.01)
    assert max(picks.values()) < 0.4 / 2
