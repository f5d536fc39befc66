"""Learning-rate range test (Smith, "Cyclical Learning Rates", 2015/2017).

Train for a few dozen mini-batches while the LR grows from tiny to huge, and watch the loss:
it falls once the LR is large enough to learn and explodes once it is too large. OneCycle's peak
is taken from the steepest part of the fall. Conventions follow torch-lr-finder and fastai's
lr_find (exponential sweep, smoothing 0.05, stop at 5x the best loss, skip 10/5 points at the
ends when looking for the steepest slope), so the curve looks like the one users know.

    python lr_range.py --data-dir ./data --optimizer adam --end-lr 10 --num-iter 100
"""
import argparse
import copy
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import common
import data
from resnet import ResNet18


@dataclass
class LRRangeResult:
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    suggested_lr: float = float("nan")
    min_loss_lr: float = float("nan")
    min_loss_lr_div10: float = float("nan")
    diverged: bool = False
    step_mode: str = "exp"

    def to_dict(self):
        return asdict(self)


def lr_schedule(start_lr, end_lr, num_iter, step_mode="exp"):
    """The LR for each of num_iter steps; the first is start_lr and the last end_lr exactly."""
    if step_mode not in ("exp", "linear"):
        raise ValueError(f"step_mode must be 'exp' or 'linear', not {step_mode!r}")
    if num_iter < 2:
        raise ValueError("num_iter must be at least 2")
    out = []
    for i in range(num_iter):
        t = i / (num_iter - 1)
        out.append(start_lr * (end_lr / start_lr) ** t if step_mode == "exp" else start_lr + (end_lr - start_lr) * t)
    out[-1] = end_lr
    return out


def steepest_index(smoothed, skip_start=10, skip_end=5):
    """Index of the most negative slope of the smoothed curve on its way down to the minimum.

    The noisy first skip_start and last skip_end points are ignored, as in torch-lr-finder. The
    search also stops at the minimum: with label smoothing or a bounded loss, a curve that has
    blown up can drift down again at absurd LRs (never reaching diverge_th), and that second
    descent is not a usable peak LR.
    """
    smoothed = np.asarray(smoothed, dtype=np.float64)
    if len(smoothed) < skip_start + skip_end + 3:
        skip_start, skip_end = 0, 0
    stop = min(len(smoothed) - skip_end, int(np.argmin(smoothed)) + 1)
    if stop - skip_start < 2:
        return int(np.argmin(smoothed))
    return skip_start + int(np.gradient(smoothed[skip_start:stop]).argmin())


def lr_range_test(model, optimizer, criterion, batches, start_lr=1e-7, end_lr=10, num_iter=100,
                  step_mode="exp", smooth=0.05, diverge_th=5, amp_dtype=None, transform=None):
    """Sweep the LR over num_iter training steps and return the curve and a suggested peak LR.

    `batches` is an iterable of (inputs, targets), iterated again when it runs out; `transform`
    is applied to each input batch (e.g. the training augmentation). The model's parameters and
    buffers (BN running stats included), its train/eval mode and the optimizer's state are put
    back afterwards, so the test leaves no trace.
    """
    lrs = lr_schedule(start_lr, end_lr, num_iter, step_mode)
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    result = LRRangeResult(step_mode=step_mode)
    best = math.inf
    iterator = iter(batches)
    try:
        model.train()
        for lr in lrs:
            try:
                inputs, targets = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                try:
                    inputs, targets = next(iterator)
                except StopIteration:
                    break
            if transform is not None:
                inputs = transform(inputs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            # written out rather than common.autocast, so that this function copies alone
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = criterion(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = loss.item()
            result.lrs.append(lr)
            result.losses.append(value)
            current = value if not result.smoothed else smooth * value + (1 - smooth) * result.smoothed[-1]
            result.smoothed.append(current)
            if not math.isfinite(current) or current > diverge_th * best:
                result.diverged = True
                break
            best = min(best, current)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    if result.lrs:
        finite = [s if math.isfinite(s) else math.inf for s in result.smoothed]
        result.min_loss_lr = result.lrs[int(np.argmin(finite))]
        result.min_loss_lr_div10 = result.min_loss_lr / 10
        result.suggested_lr = result.lrs[steepest_index(finite)]
    return result


def plot_lr_range(result, path=None):
    """Loss against LR (log axis for the exponential sweep) with the suggestion marked; returns the
    Figure (a notebook shows it) and writes it to path as a PNG when one is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    if result.lrs:
        i = result.lrs.index(result.suggested_lr)
        ax.plot(result.suggested_lr, result.smoothed[i], "o", color="C3", ms=8,
                label=f"steepest slope: {result.suggested_lr:.2e}")
        ax.axvline(result.min_loss_lr, color="C2", ls="--", lw=1, label=f"minimum loss: {result.min_loss_lr:.2e}")
        finite = [s for s in result.smoothed if math.isfinite(s)]
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), 2.5 * finite[0]) * 1.05)
    if result.step_mode == "exp":
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning rate range test")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    common.save_png(fig, path, dpi=120)
    return fig


def lr_range_inputs(images, labels, batch_size, seed, use_flip, cutout_p):
    """The range test's endless shuffled batches and their augmentation (train.py's), both seeded
    with seed + 1: apart from training's draws, and the same for train.py --max-lr auto and here."""
    order = torch.Generator().manual_seed(seed + 1)
    generator = data.device_generator(images.device, seed + 1)

    def batches():
        while True:
            yield from data.batches(images, labels, batch_size, True, order, drop_last=True)

    def augment(x):
        return data.train_transform(x, generator, use_flip, cutout_p).contiguous(memory_format=torch.channels_last)

    return batches(), augment


def build_parser():
    """Defaults are train.py's (a test checks it), so the curve is the one --max-lr auto sees."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-10 into --data-dir if it is missing (default on)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="optimizer type (default sgd)")
    p.add_argument("--wd", type=common.non_negative_float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--label-smoothing", type=common.fraction, default=0.1,
                   help="label smoothing of the loss (default 0.1)")
    p.add_argument("--batch-size", type=common.positive_int, default=512, help="batch size (default 512)")
    p.add_argument("--start-lr", type=common.positive_float, default=1e-7, help="first LR (default 1e-7)")
    p.add_argument("--end-lr", type=common.positive_float, default=10.0, help="last LR (default 10)")
    p.add_argument("--num-iter", type=common.positive_int, default=100, help="steps in the sweep (default 100)")
    p.add_argument("--step-mode", choices=["exp", "linear"], default="exp", help="LR spacing (default exp)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip in the augmentation")
    p.add_argument("--cutout-p", type=common.probability, default=0.5,
                   help="probability of the Cutout hole per image (default 0.5)")
    p.add_argument("--limit-train", type=common.positive_int, default=None,
                   help="use only the first N training images")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision where supported (default on)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the sweep is the one train.py --max-lr auto runs with this --seed (default 0)")
    p.add_argument("--out", default="lr_range", help="folder for lr_range.png and lr_range.json (default ./lr_range)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_iter < 2:
        parser.error("--num-iter must be at least 2")
    if args.end_lr <= args.start_lr:
        parser.error("--end-lr must be larger than --start-lr")
    device = common.resolve_device(args.device, parser)
    try:
        common.check_writable(args.out)
        images, labels, _ = data.load_cifar10(args.data_dir, "train", download=args.download)
    except (data.DataError, common.UserError) as e:
        sys.exit(f"error: {e}")
    images, labels = images[:args.limit_train], labels[:args.limit_train]
    if args.batch_size > len(images):
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(images)} training images")
    amp_dtype = common.amp_dtype(device, args.amp)
    torch.manual_seed(args.seed)
    model = ResNet18().to(device, memory_format=torch.channels_last)
    optimizer = common.make_optimizer(model, args.optimizer, args.start_lr, args.wd)
    print(f"LR range test: {args.optimizer}, {args.start_lr:g} to {args.end_lr:g} over {args.num_iter} steps "
          f"on {device} ({common.precision_name(amp_dtype)})")
    batches, augment = lr_range_inputs(images.to(device), labels.to(device), args.batch_size, args.seed,
                                       not args.no_flip, args.cutout_p)
    result = lr_range_test(model, optimizer, torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                           batches, args.start_lr, args.end_lr, args.num_iter, args.step_mode,
                           amp_dtype=amp_dtype, transform=augment)
    plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
    common.save_json(os.path.join(args.out, "lr_range.json"), {"args": vars(args), **result.to_dict()})
    print(f"suggested max LR (steepest slope): {result.suggested_lr:.3g}; minimum loss at {result.min_loss_lr:.3g}, "
          f"a tenth of that is {result.min_loss_lr_div10:.3g}")
    print(f"wrote {os.path.join(args.out, 'lr_range.png')} and lr_range.json")
    return result


if __name__ == "__main__":
    main()
