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
import signal
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import common
import data
from resnet import ResNet18


RULES = ("steepest", "minimum", "minimum/3", "minimum/10", "valley")  # ways to read a peak LR off the curve


@dataclass
class LRRangeResult:
    """The sweep: each step's LR and loss, the loss smoothed, and the LRs read off the smoothed
    curve by suggest(): `picks` holds every rule's, `suggested_lr` the one of `rule`."""
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    rule: str = "steepest"
    suggested_lr: float = float("nan")
    min_loss_lr: float = float("nan")
    picks: dict = field(default_factory=dict)
    diverged: bool = False
    loss_fell: bool = False  # some step's loss below the first's: a sweep that only rose suggests nothing
    step_mode: str = "exp"

    def add(self, lr, loss, smooth):
        """Record a step; returns the loss smoothed exponentially with weight smooth."""
        smoothed = loss if not self.smoothed else smooth * loss + (1 - smooth) * self.smoothed[-1]
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smoothed)
        return smoothed

    def suggest(self, rule=None, skip_start=10, skip_end=5):
        """Every rule's LR on the smoothed curve, and the suggestion by `rule` (default self.rule):
        steepest, the steepest slope on the way down to the minimum (torch-lr-finder's; the noisy
        first skip_start and last skip_end points ignored, and nothing past the minimum, where a
        blown-up curve with label smoothing can drift down again); minimum, the lowest loss, and a
        third and a tenth of it; valley, fastai's: the longest falling run of the curve, read at the
        middle of its second third."""
        self.rule = rule or self.rule
        if not self.lrs:
            return self
        curve = np.array([s if math.isfinite(s) else math.inf for s in self.smoothed])
        lowest = int(np.argmin(curve))
        if len(curve) < skip_start + skip_end + 3:
            skip_start, skip_end = 0, 0
        stop = min(len(curve) - skip_end, lowest + 1)
        steepest = lowest if stop - skip_start < 2 else skip_start + int(np.gradient(curve[skip_start:stop]).argmin())
        low = self.lrs[lowest]
        self.picks = {"steepest": self.lrs[steepest], "minimum": low, "minimum/3": low / 3, "minimum/10": low / 10,
                      "valley": self.lrs[self.valley(curve)]}
        self.suggested_lr, self.min_loss_lr = self.picks[self.rule], low
        raw = self.raw()
        self.loss_fell = min(raw[1:], default=math.inf) < raw[0]
        return self

    def raw(self):
        """Each step's loss; the smoothed ones for a curve read back from a file that keeps only those."""
        return self.losses or self.smoothed

    def no_fall(self):
        """Why a curve whose loss never fell suggests nothing, in words."""
        return (f"the loss never fell below its first value ({self.raw()[0]:.4g} at LR {self.lrs[0]:.3g}) "
                f"in {len(self.lrs)} steps, so the range test suggests no LR")

    @staticmethod
    def valley(curve):
        """fastai's valley: the longest run of ever lower losses (a decreasing subsequence, by
        dynamic programming), taken at its start + 1/3 + 1/6 of its length."""
        length, best_end = [1] * len(curve), 0
        for i in range(1, len(curve)):
            length[i] = 1 + max([length[j] for j in range(i) if curve[j] > curve[i]], default=0)
            best_end = i if length[i] > length[best_end] else best_end
        start = best_end - length[best_end] + 1
        third = (best_end - start) / 3
        return start + int(third) + int(third / 2)

    def to_dict(self):
        return asdict(self)


DEFAULT_RULE = LRRangeResult.rule  # train.py --max-lr auto's (the README's Recipes say why)


def lr_range_test(model, optimizer, criterion, batches, *, start_lr=1e-7, end_lr=10, num_iter=100, step_mode="exp",
                  smooth=0.05, diverge_th=5, amp_dtype=None, transform=None, progress=None, mean_loss=None,
                  rule=None, result=None):
    """Sweep the LR from start_lr to end_lr (exactly) over num_iter training steps, exponentially or
    linearly; stop once the smoothed loss passes diverge_th x its best. Returns an LRRangeResult.

    `batches` yields (inputs, targets, ...) of any length and on any device (a DataLoader, a list);
    it is iterated again when it runs out, and each batch is moved to the model's device and passed
    through `transform` (e.g. the training augmentation). amp_dtype (torch.bfloat16 or float16)
    trains in mixed precision. progress(step, lr, loss), if given, is called after every step. Under
    torchrun, mean_loss(loss) averages a step's loss over the processes (an all-reduce): every process
    then follows one curve and stops at the same step, so no collective call is left waiting. The
    suggestion is read off the curve by `rule` (LRRangeResult.suggest; None: the steepest slope). The
    model's weights and buffers, its train/eval mode and the optimizer's state are put back after.
    `result`, an empty LRRangeResult to fill, keeps the curve for a caller if the sweep is interrupted.
    """
    if num_iter < 2 or step_mode not in ("exp", "linear") or not 0 < start_lr < end_lr:
        raise ValueError("lr_range_test needs num_iter >= 2, step_mode 'exp' or 'linear' and 0 < start_lr < end_lr")
    lrs = [start_lr * (end_lr / start_lr) ** t if step_mode == "exp" else start_lr + (end_lr - start_lr) * t
           for t in (i / (num_iter - 1) for i in range(num_iter - 1))] + [end_lr]
    saved = copy.deepcopy([model.state_dict(), optimizer.state_dict()])
    was_training, device = model.training, next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    result, best, iterator = result if result is not None else LRRangeResult(), math.inf, iter(batches)
    result.step_mode = step_mode
    try:
        model.train()
        for step, lr in enumerate(lrs):
            batch = next(iterator, None)
            if batch is None:  # once more from the start
                iterator = iter(batches)
                batch = next(iterator, None)
            if batch is None:  # a used-up generator: a short curve would suggest an LR in silence
                raise ValueError(f"batches ran out at step {step} of {num_iter}; pass a list or a DataLoader")
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("batches must yield (inputs, targets) pairs, or tuples that start with them")
            inputs, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            inputs = transform(inputs) if transform is not None else inputs
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = criterion(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = (mean_loss(loss.detach().float()) if mean_loss is not None else loss).item()
            smoothed = result.add(lr, value, smooth)
            if progress is not None:
                progress(step, lr, value)
            if not math.isfinite(smoothed) or smoothed > diverge_th * best:
                result.diverged = True
                break
            best = min(best, smoothed)
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return result.suggest(rule)


def plot_lr_range(result, path=None):
    """Loss against LR (log axis for the exponential sweep) with every rule's LR marked and the pick
    ringed; returns the Figure (a notebook shows it) and writes it to path as a PNG when one is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    if result.lrs:
        finite = [s for s in result.smoothed if math.isfinite(s)]
        scale = np.log if result.step_mode == "exp" else (lambda v: v)
        for n, (name, lr) in enumerate(result.picks.items()):
            on_curve = np.interp(scale(lr), scale(np.array(result.lrs)), np.nan_to_num(result.smoothed, posinf=1e9))
            pick = name == result.rule
            ax.plot(lr, on_curve, "o" if pick else "x", color=f"C{n + 1}", ms=10 if pick else 7,
                    mfc="none" if pick else None, mew=2, label=f"{name}: {lr:.2e}" + " (the pick)" * pick)
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


def lr_range_inputs(images, labels, batch_size, *, seed=0, use_flip=True, cutout_p=0.5):
    """The range test's endless shuffled batches and their augmentation (train.py's), both seeded
    with seed + 1: apart from training's draws, and the same for train.py --max-lr auto and here."""
    order = torch.Generator().manual_seed(seed + 1)
    generator = data.device_generator(images.device, seed + 1)

    def batches():
        while True:
            yield from data.batches(images, labels, batch_size, shuffle=True, generator=order, drop_last=True)

    def augment(x):
        x = data.train_transform(x, generator, use_flip=use_flip, cutout_p=cutout_p)
        return x.contiguous(memory_format=torch.channels_last)

    return batches(), augment


def progress_printer(num_iter, lines=10):
    """A progress callback for lr_range_test: about `lines` lines over the sweep."""
    every = max(1, num_iter // lines)

    def show(step, lr, loss):
        if (step + 1) % every == 0 or step + 1 == num_iter:
            print(f"step {step + 1}/{num_iter}  lr {lr:.3g}  loss {loss:.4f}", flush=True)

    return show


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
    p.add_argument("--num-iter", type=common.int_at_least(2), default=100, help="steps in the sweep (default 100)")
    p.add_argument("--step-mode", choices=["exp", "linear"], default="exp", help="LR spacing (default exp)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip in the augmentation")
    p.add_argument("--cutout-p", type=common.probability, default=0.5,
                   help="probability of the Cutout hole per image (default 0.5)")
    p.add_argument("--limit-train", type=common.int_at_least(1, maximum=data.SPLIT_SIZE["train"]), default=None,
                   help="use only the first N training images")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision where supported (default on)")
    p.add_argument("--seed", type=common.seed, default=0,
                   help="random seed; the sweep is the one train.py --max-lr auto runs with this --seed (default 0)")
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                   help=f"how the suggestion is read off the curve (default {DEFAULT_RULE}, as train.py --max-lr auto)")
    p.add_argument("--out", default="lr_range", help="folder for lr_range.png and lr_range.json (default ./lr_range)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.end_lr <= args.start_lr:
        parser.error("--end-lr must be larger than --start-lr")
    images = args.limit_train or data.SPLIT_SIZE["train"]
    if args.batch_size > images:
        parser.error(f"--batch-size {args.batch_size} is larger than the {images} training images")
    device = common.resolve_device(args.device, parser)
    return common.main_guard(lambda: run(args, device))


def run(args, device):
    """lr_range.py's work: the data, the sweep, lr_range.png and lr_range.json. Stopped by Ctrl-C or
    SIGTERM during the sweep, it saves the curve so far."""
    common.check_writable(args.out)
    images, labels, _ = data.load_cifar10(args.data_dir, "train", download=args.download)
    images, labels = images[:args.limit_train], labels[:args.limit_train]
    amp_dtype = common.amp_dtype(device, args.amp)
    torch.manual_seed(args.seed)
    model = ResNet18().to(device, memory_format=torch.channels_last)
    optimizer = common.make_optimizer(model, args.optimizer, args.start_lr, args.wd)
    print(f"LR range test: {args.optimizer}, {args.start_lr:g} to {args.end_lr:g} over {args.num_iter} steps "
          f"on {device} ({common.precision_name(amp_dtype)})")
    batches, augment = lr_range_inputs(images.to(device), labels.to(device), args.batch_size, seed=args.seed,
                                       use_flip=not args.no_flip, cutout_p=args.cutout_p)
    so_far = LRRangeResult()
    try:
        result = lr_range_test(model, optimizer, torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                               batches, start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter,
                               step_mode=args.step_mode, amp_dtype=amp_dtype, transform=augment,
                               progress=progress_printer(args.num_iter), rule=args.rule, result=so_far)
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, or SIGTERM through common.main_guard
        if not so_far.lrs:
            raise
        save_curve(so_far.suggest(args.rule), args)
        print(f"Stopped at step {len(so_far.lrs)} of {args.num_iter}; the curve so far is saved (run again for "
              f"the whole sweep)")
        raise common.Stopped(signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM) from None
    if result.diverged:
        print(f"the loss diverged at step {len(result.lrs)} of {args.num_iter} (LR {result.lrs[-1]:.3g}); the sweep "
              f"stopped there")
    save_curve(result, args)
    if not result.loss_fell:
        raise common.UserError(f"{result.no_fall()}; sweep from a lower --start-lr if it rose at once, or further "
                               f"(--end-lr, --num-iter) if it stayed flat")
    print("LRs read off the smoothed curve: " + ", ".join(f"{name} {lr:.3g}" for name, lr in result.picks.items()))
    print(f"suggested max LR ({result.rule}): {result.suggested_lr:.3g}")
    return result


def save_curve(result, args):
    """lr_range.png and lr_range.json (the curve, every rule's LR and the arguments) in --out."""
    plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
    common.save_json(os.path.join(args.out, "lr_range.json"), {"args": vars(args), **result.to_dict()})
    print(f"wrote {os.path.join(args.out, 'lr_range.png')} and lr_range.json")


if __name__ == "__main__":
    main()
