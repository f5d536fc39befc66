"""Train ResNet18 on CIFAR-10: OneCycle, RandomCrop + flip + Cutout, mixed precision, safe checkpoints.

    python train.py --epochs 20                      # the default recipe (README, Recipes)
    python train.py --resume runs/<run>/last.pt      # continue a stopped run exactly
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel; BatchNorm statistics
                                                     # stay per process (--sync-bn shares them)

Read top to bottom: the recipe (train_step, epoch_batches, train_epoch, test_sums and evaluate,
one_cycle), which needs only torch and data.py; then train(), the whole run with its epoch loop;
then the command line and fit() for a notebook (`history = train.fit(epochs=1, limit_train=2000)`).
plumbing.py holds the services a run uses besides: the state last.pt keeps, stopping on a signal,
progress, the warm-up, saving, metrics.json. The run folder gets best.pt, last.pt, metrics.json and
curves.png (and lr_range.png with --max-lr auto, ema.pt with --ema when the weights' average scores
better at the end).

Random streams, each derived from --seed alone, so a resumed run draws what an uninterrupted one
would have drawn:
    init          torch.manual_seed(seed) just before the model is built
    order         epoch e's shuffle: a CPU generator seeded with seed * 100_003 + e
    augmentation  one generator per process on the data's device, seed * 1000 + rank; kept in last.pt
    range test    seed + 1 + rank, for its batches and its augmentation (lr_range.lr_range_inputs)
    flips         with --alternate-flip, each image's first-epoch mirror: a CPU generator seeded seed + 2
"""
import argparse
import copy
import itertools
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import lr_range
import plumbing
from common import UserError

# OneCycle's peak LR at batch 512 for each optimizer, as measured (README, Results); other batch
# sizes scale it linearly.
BASE_LR, BASE_BATCH = {"sgd": 0.4, "adam": 0.027}, 512


# ---------------------------------------------------------------------------------------------
# The recipe: these need only torch and data.py


def train_step(model, x, y, criterion, optimizer, scaler, scheduler, amp_dtype=None):
    """One optimizer step on one augmented batch in mixed precision (amp_dtype torch.bfloat16, or
    torch.float16 with an enabled GradScaler; None trains in fp32). Returns the loss (detached, fp32)
    and the logits."""
    with autocast(x.device, amp_dtype):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach().float(), logits.detach()


def epoch_batches(images, labels, *, batch_size, epoch, generator, seed=0, use_flip=True, cutout_p=0.5,
                  alternate_flip=False, start=0, rank=0, world=1):
    """Epoch `epoch`'s augmented batches (x channels_last, y) of uint8 images on the device, from
    batch `start` on: shuffled by a generator seeded from `seed` and the epoch alone, whole batches
    only, each process taking its part of every batch under torchrun. The augmentation draws from
    `generator` (on the images' device); alternate_flip mirrors each image every other epoch."""
    order = torch.Generator().manual_seed(seed * 100_003 + epoch)
    flips = data.alternating_flips(len(images), seed, epoch, images.device) if alternate_flip else None
    for idx in data.batch_indices(len(images), batch_size, shuffle=True, generator=order, drop_last=True, rank=rank,
                                  world_size=world, start=start, device=images.device):
        x = data.train_transform(images[idx], generator, use_flip=use_flip, cutout_p=cutout_p,
                                 flip_mask=None if flips is None else flips[idx])
        yield x.contiguous(memory_format=torch.channels_last), labels[idx]


def train_epoch(model, batches, criterion, optimizer, scaler, scheduler, amp_dtype=None, after_step=None, ema=None):
    """Train on every batch. Returns the summed loss and correct predictions (a tensor: no step
    waits for the GPU) and the images seen. after_step(i, loss, sums, seen) ends the epoch early
    by returning True; ema, a WeightAverage, averages the weights after every step."""
    model.train()
    sums, seen = 0, 0
    for i, (x, y) in enumerate(batches):
        loss, logits = train_step(model, x, y, criterion, optimizer, scaler, scheduler, amp_dtype)
        if ema is not None:
            ema.update_parameters(model)
        # summed now, not kept: the next step's CUDA graph replay (reduce-overhead) writes over the logits
        sums = sums + torch.stack([loss * len(y), (logits.argmax(1) == y).sum().float()])
        seen += len(y)
        if after_step is not None and after_step(i, loss, sums, seen):
            break
    return sums, seen


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics (`module`, a copy
    of the model): the first update copies them, each later one moves every float tensor a share
    1 - decay of the way to the model's, in place on its device, so no step waits for the GPU."""

    def __init__(self, model, decay):
        self.module, self.decay, self.n_averaged = copy.deepcopy(model), decay, 0

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()])
        for average, current in pairs:
            if average.is_floating_point() and self.n_averaged > 0:
                average.lerp_(current, 1 - self.decay)
            else:
                average.copy_(current)  # the first update, and BatchNorm's step counters
        self.n_averaged += 1

    def state_dict(self):
        return {"module": self.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.n_averaged = state["n_averaged"]


@torch.no_grad()
def test_sums(model, images, labels, *, batch_size=1024, amp_dtype=None, tta=True, tta6=False, pad=False,
              num_classes=10):
    """Per class, over uint8 test images: summed cross-entropy, correct predictions of one view,
    correct predictions with flip TTA (the mean of the logits of the image and of its mirror), with
    six views (tta6: half that mean, half the mean of the image and its mirror each shifted by one
    pixel along the diagonal, both ways, as airbench's TTA level 2), and images. All views go in one
    forward. With pad a short last batch is padded to batch_size, so cuDNN meets one shape only;
    eval-mode BatchNorm treats each image alone, so padding changes nothing."""
    if len(images) != len(labels):  # each batch's logits are cut to its labels: it scored fewer in silence
        raise ValueError(f"test_sums got {len(images)} images but {len(labels)} labels")
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, num_classes, device=images.device)
    for first in range(0, len(images), batch_size):
        x, y = data.normalize(images[first:first + batch_size]), labels[first:first + batch_size]
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, batch_size - len(x)))
        views = [x, x.flip(-1)] if tta or tta6 else [x]
        if tta6:
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = (padded[..., :-2, :-2], padded[..., 2:, 2:])
            views += [view for image in shifted for view in (image, image.flip(-1))]
        with autocast(x.device, amp_dtype):
            logits = model(torch.cat(views).contiguous(memory_format=torch.channels_last)).float()
        logits = logits.unflatten(0, (len(views), -1))[:, :len(y)]
        flip = logits[:2].mean(0)
        six = (flip + logits[2:].mean(0)) / 2 if tta6 else flip
        for row, value in enumerate([F.cross_entropy(logits[0], y, reduction="none"), logits[0].argmax(1) == y,
                                     flip.argmax(1) == y, six.argmax(1) == y, torch.ones_like(y)]):
            sums[row].index_add_(0, y, value.to(sums.dtype))
    model.train(was_training)
    return sums


def test_result(sums, tta=True, tta6=False):
    """Mean loss, accuracy and per-class accuracy (None for a class with no test images; and with
    tta or tta6 those of flip TTA or six views) from test_sums, once all-reduced under torchrun."""
    loss, *corrects, count = sums.double().cpu()
    n = max(int(count.sum()), 1)
    result = {"loss": loss.sum().item() / n, "total": int(count.sum())}
    for suffix, correct, scored in zip(("", "_tta", "_tta6"), corrects, (True, tta, tta6)):
        if scored:
            per_class = [100 * c / k if k else None for c, k in zip(correct.tolist(), count.tolist())]
            result.update({f"correct{suffix}": int(correct.sum()), f"accuracy{suffix}": 100 * correct.sum().item() / n,
                           f"per_class{suffix}": per_class})
    return result


def evaluate(model, images, labels, *, batch_size=1024, amp_dtype=None, tta=True, tta6=False, pad=False):
    """Test loss and accuracy of a model on uint8 images and their labels, in one process."""
    sums = test_sums(model, images, labels, batch_size=batch_size, amp_dtype=amp_dtype, tta=tta, tta6=tta6, pad=pad)
    return test_result(sums, tta, tta6)


def autocast(device, amp_dtype):
    """Mixed precision in amp_dtype, or a no-op context for fp32 (None)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def one_cycle(optimizer, max_lr, total_steps, pct_start=0.25, *, div_factor=25.0, final_div_factor=1e4,
              anneal="cos"):
    """OneCycle: from max_lr / div_factor up to max_lr over pct_start of the steps, then down (cosine
    or linear) to max_lr / div_factor / final_div_factor, momentum cycled inversely (0.95 to 0.85).
    Very short runs keep one step of warm-up and one of descent."""
    pct_start = min(max(pct_start, 2 / total_steps), 1 - 1 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total_steps, pct_start=pct_start,
                                               div_factor=div_factor, final_div_factor=final_div_factor,
                                               anneal_strategy=anneal)


# ---------------------------------------------------------------------------------------------
# The run: one epoch after another


def train(run, ckpt=None):
    """A whole run, top to bottom: the data, the model, the peak LR and the state (or the checkpoint's),
    then each epoch: train on its batches, test, record and save. A signal stops the run mid-epoch or
    after an epoch, saving first (state.stop); a non-finite loss stops it before any save."""
    args = run.args
    train_x, train_y, test_x, test_y, classes = plumbing.load_data(run)
    net = plumbing.build_model(run, len(classes))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    max_lr, lr_range = pick_max_lr(run, ckpt, net, criterion, train_x, train_y)
    state = new_state(run, net, max_lr, lr_range, classes)
    state.restore(ckpt)
    model, test_model = plumbing.forwards(run, net)
    run.log(plumbing.header(state, len(train_x), len(test_x)))
    test_x, test_y = (t.tensor_split(run.world)[run.rank] for t in (test_x, test_y))  # this process's share
    scoring = dict(batch_size=-(-args.eval_batch_size // run.world), amp_dtype=run.dtype, tta=args.tta,
                   tta6=args.tta6, pad=run.device.type == "cuda")  # on CUDA, batches of one shape
    batching = dict(batch_size=args.batch_size, seed=args.seed, use_flip=not args.no_flip, cutout_p=args.cutout_p,
                    alternate_flip=args.alternate_flip, rank=run.rank, world=run.world)
    if run.device.type == "cuda" or args.compile:  # cuDNN's autotuning (and compilation) before the clock starts
        warm = epoch_batches(train_x, train_y, epoch=0, generator=data.device_generator(run.device, 0), **batching)
        plumbing.warm_up(state, lambda: train_epoch(model, itertools.islice(warm, 3), criterion, state.optimizer,
                                                    state.scaler, state.scheduler, run.dtype),
                         lambda: test_sums(test_model, test_x, test_y, **scoring))
    for epoch in range(state.epoch, args.epochs):
        batches = epoch_batches(train_x, train_y, epoch=epoch, generator=state.aug_generator, start=state.step,
                                **batching)
        watch = plumbing.StepWatch(state)  # after each step: progress, the finite check, a signal's stop
        sums, seen = train_epoch(model, batches, criterion, state.optimizer, state.scaler, state.scheduler,
                                 run.dtype, after_step=watch, ema=state.ema)
        stats = watch.summary(sums, seen)
        if watch.stopped:
            state.stop(f"at epoch {epoch + 1}, step {stats['next_step']}/{state.steps}", stats)
        state.share_statistics()  # under torchrun: every process tests rank 0's BatchNorm statistics
        result = test_result(run.all_reduce(test_sums(test_model, test_x, test_y, **scoring)), args.tta, args.tta6)
        if state.ema is not None:  # the weights' average, scored beside them
            average = test_result(run.all_reduce(test_sums(state.ema.module, test_x, test_y, **scoring)),
                                  args.tta, args.tta6)
            result.update({f"{key}_ema": value for key, value in average.items() if key.startswith("accuracy")})
        plumbing.end_epoch(state, stats, result)
        if epoch + 1 < args.epochs and run.stop_agreed():  # a finished run just finishes
            state.stop(f"after epoch {epoch + 1}")
    if run.rank == 0:
        plumbing.finish(state)
    return state.history


def new_state(run, net, max_lr, lr_range, classes):
    """The optimizer, the OneCycle schedule over the whole run, the GradScaler (on for fp16) and
    the weights' average (--ema), in the state that last.pt keeps."""
    args = run.args
    optimizer = common.make_optimizer(net, args.optimizer, max_lr, args.wd, bn_wd=args.bn_wd)
    steps = (args.limit_train or data.SPLIT_SIZE["train"]) // args.batch_size
    scheduler = one_cycle(optimizer, max_lr, args.epochs * steps, args.pct_start, div_factor=args.div_factor,
                          final_div_factor=args.final_div_factor, anneal=args.anneal)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    state = plumbing.TrainState(run, net, optimizer, scheduler, scaler, max_lr, lr_range, classes)
    state.ema = None if args.ema is None else WeightAverage(net, args.ema)
    return state


def pick_max_lr(run, ckpt, net, criterion, train_x, train_y):
    """(peak LR, range-test record or None): the checkpoint's on resume, --max-lr as given, the
    range test's pick with 'auto', or by default the optimizer's BASE_LR scaled linearly with the
    batch size (Goyal et al. 2017): batch 128 starts from a quarter of batch 512's peak."""
    args = run.args
    if ckpt is not None:
        return ckpt["max_lr"], ckpt.get("lr_range")
    default = BASE_LR[args.optimizer] * args.batch_size / BASE_BATCH
    if args.max_lr is None:
        run.log(f"Peak LR {default:.4g} = {BASE_LR[args.optimizer]:g} x batch {args.batch_size} / {BASE_BATCH} "
                f"(linear scaling, {args.optimizer}'s default; --max-lr sets it)")
        return default, None
    if args.max_lr != "auto":
        return args.max_lr, None
    result = sweep(run, net, criterion, train_x, train_y)
    if run.rank == 0:
        lr_range.plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
    if not result.loss_fell:
        raise UserError(f"{result.no_fall()} (lr_range.png in {args.out} shows it); give --max-lr a number "
                        f"({args.optimizer}'s default here: {default:.4g}) or more --lr-range-steps")
    ratio = result.suggested_lr / default
    run.log(f"LR range test: max LR {result.suggested_lr:.4g} by the {result.rule} rule (" +
            ", ".join(f"{name} {lr:.3g}" for name, lr in result.picks.items()) + "); that is " +
            (f"{1 / ratio:.3g}x below" if ratio < 1 else f"{ratio:.3g}x above") +
            f" {args.optimizer}'s hand-set default, {default:.4g} (the README's Recipes say how such picks trained)")
    return result.suggested_lr, result.to_dict()


def sweep(run, net, criterion, train_x, train_y):
    """The LR range test of --max-lr auto, its progress shown by rank 0. A signal during it stops the
    run before anything is trained or saved, every process at the same step."""
    args = run.args
    run.log(f"LR range test ({args.optimizer}, {args.lr_range_steps} steps) to pick the OneCycle peak ...",
            flush=True)
    batches, augment = lr_range.lr_range_inputs(train_x, train_y, args.batch_size // run.world,
                                                seed=args.seed + run.rank, use_flip=not args.no_flip,
                                                cutout_p=args.cutout_p)
    optimizer = common.make_optimizer(net, args.optimizer, 1e-7, args.wd, bn_wd=args.bn_wd)
    show = lr_range.progress_printer(args.lr_range_steps)

    def progress(step, lr, loss):
        if run.rank == 0:
            show(step, lr, loss)
        if run.stop_agreed():
            run.log(f"\nStopped during the LR range test, at step {step + 1}; nothing was trained or saved: run "
                    f"the same command again", flush=True)
            raise common.Stopped(run.signum)

    return lr_range.lr_range_test(net, optimizer, criterion, batches, num_iter=args.lr_range_steps,
                                  amp_dtype=run.dtype, transform=augment, progress=progress,
                                  mean_loss=lambda loss: run.all_reduce(loss) / run.world, rule=args.lr_range_rule)


# ---------------------------------------------------------------------------------------------
# The command line, and fit() for a notebook


def max_lr_value(text):
    return "auto" if text == "auto" else common.positive_float(text)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--epochs", type=common.positive_int, default=20, help="training epochs (default 20)")
    add("--batch-size", type=common.positive_int, default=512, help="global batch, split over torchrun's processes")
    add("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    add("--download", action=argparse.BooleanOptionalAction, default=True, help="fetch CIFAR-10 when it is missing")
    add("--out", default=None, help="run folder (default ./runs/<timestamp>)")
    add("--overwrite", action="store_true",
        help="write into a non-empty --out, or resume an earlier checkpoint of a run over its later last.pt")
    add("--resume", metavar="PATH", help="continue the run saved in PATH (its last.pt)")
    add("--optimizer", choices=["sgd", "adam"], default="sgd",
        help="sgd (Nesterov) or adam; OneCycle cycles momentum or beta1 between 0.95 and 0.85 (default sgd)")
    add("--max-lr", type=max_lr_value, default=None,
        help=f"OneCycle's peak LR, or 'auto': the LR range test's pick (default: sgd {BASE_LR['sgd']:g}, adam "
             f"{BASE_LR['adam']:g}, x batch size / {BASE_BATCH}, the linear scaling rule)")
    add("--lr-range-steps", type=common.int_at_least(2), default=100, help="steps of --max-lr auto's test (100)")
    add("--lr-range-rule", choices=lr_range.RULES, default=lr_range.DEFAULT_RULE,
        help=f"how --max-lr auto reads the peak off the range test's curve (default {lr_range.DEFAULT_RULE})")
    add("--pct-start", type=common.fraction, default=0.25, help="share of training rising to the peak (0.25)")
    add("--div-factor", type=common.positive_float, default=25.0,
        help="OneCycle starts at the peak / this (default 25, torch's; 5 starts at 0.2 x the peak)")
    add("--final-div-factor", type=common.positive_float, default=1e4,
        help="OneCycle ends at the start / this (default 1e4, torch's)")
    add("--anneal", choices=["cos", "linear"], default="cos", help="OneCycle's shape on the way down (default cos)")
    add("--ema", type=common.fraction, default=None, metavar="DECAY",
        help="also keep a moving average of the weights and BatchNorm statistics, DECAY per step (0.99, say), "
             "and score it each epoch beside them")
    add("--bn-momentum", type=common.number_in(lambda v: 0 < v <= 1, "a number in (0, 1]"), default=0.1,
        help="BatchNorm's running statistics take this share of each batch's (default 0.1, PyTorch's)")
    add("--zero-init-residual", action="store_true",
        help="start each residual block's last BatchNorm scale at zero (Goyal et al. 2017)")
    add("--wd", type=common.non_negative_float, default=5e-4, help="weight decay (default 5e-4)")
    add("--bn-wd", action=argparse.BooleanOptionalAction, default=True,
        help="decay BatchNorm's scales and shifts and the classifier's bias too (default on)")
    add("--label-smoothing", type=common.fraction, default=0.1, help="label smoothing (default 0.1)")
    add("--no-flip", action="store_true", help="no random horizontal flip (the spec used none)")
    add("--alternate-flip", action="store_true", help="mirror each image every other epoch (airbench)")
    add("--cutout-p", type=common.probability, default=0.5,
        help="chance of an image's 16x16 Cutout hole (default 0.5, the spec's; 1: the Cutout paper's)")
    add("--seed", type=common.seed, default=0, help="random seed for init, order and augmentation (default 0)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: bf16 on GPUs from compute capability 8.0 and on CPUs with bf16 units, fp16 + "
             "GradScaler on older GPUs (T4, V100); --no-amp: fp32")
    add("--compile", action="store_true",
        help="torch.compile the model (off by default: the README's Results say when it pays)")
    add("--compile-mode", choices=common.COMPILE_MODES, default="default", help="torch.compile's mode")
    add("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes (CUDA)")
    add("--limit-train", type=common.int_at_least(1, maximum=data.SPLIT_SIZE["train"]), default=None,
        help="train on the first N images only")
    add("--limit-test", type=common.int_at_least(1, maximum=data.SPLIT_SIZE["test"]), default=None,
        help="test on the first N images only")
    add("--tta", action=argparse.BooleanOptionalAction, default=True,
        help="also score each test image with its mirror, averaging the logits (default on)")
    add("--tta6", action="store_true",
        help="also score six views: the image, its mirror and one-pixel shifts of both (airbench's TTA level 2)")
    add("--eval-batch-size", type=common.positive_int, default=1024, help="test batch size (default 1024)")
    add("--tensorboard", metavar="DIR", default=None, help="also write TensorBoard scalars to DIR")
    return p


def parse_args(parser, argv):
    """The command line's arguments, with the checks between options that argparse cannot express."""
    args = parser.parse_args(argv)
    common.resolve_device(args.device, parser)
    if not args.resume:
        try:
            plumbing.validate(args, plumbing.ranks()[1])
        except UserError as e:
            parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(build_parser(), argv)
    return common.main_guard(lambda: start(args))


def fit(**options):
    """Notebook entry: fit(epochs=1, data_dir='./data', limit_train=2000) -> history (a list of
    per-epoch dicts). The keywords are the command line's options with underscores (True or False
    for a switch), parsed by its parser: a value it refuses raises UserError with its sentence."""
    parser = build_parser()
    flags = {action.dest: action.option_strings for action in parser._actions if action.option_strings}
    argv = []
    for key, value in options.items():
        if key not in flags or key == "help":
            raise TypeError(f"fit() got an unknown option {key!r}")
        if isinstance(value, bool):
            argv += flags[key][:1] if value else flags[key][1:]  # --tta or --no-tta; --compile or nothing
        elif value is not None:  # None: the default
            argv.append(f"{flags[key][0]}={value}")

    def refuse(message):
        raise UserError(f"fit(): {message}")

    parser.error = refuse
    return start(parse_args(parser, argv))


def start(args):
    """Train with parsed arguments, or resume the run they name, in the run folder (locked while the
    run writes to it); returns the history."""
    run = plumbing.Run(args)
    ckpt = None
    if args.resume:
        run.args, ckpt = plumbing.restored_args(args, run.world)
        say_what_resume_ignores(run, args)
        if ckpt["epoch"] >= run.args.epochs:
            run.log(f"{args.resume} is a finished run ({ckpt['epoch']} of {run.args.epochs} epochs): nothing to "
                    f"resume and nothing changed. To train longer, start a new run with a larger --epochs.")
            return ckpt["history"]
    run.start()
    try:
        run.args.out = run.args.out or run.broadcast(os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
        with common.FolderLock(run.args.out, run.log, enabled=run.rank == 0), run:
            history = train(run, ckpt)
            if run.world > 1:
                dist.barrier()  # the others wait while rank 0 writes, then all leave the group together
        return history
    finally:
        if run.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def say_what_resume_ignores(run, given):
    """--resume continues the recipe the checkpoint keeps: name each option given that it overrides
    (a value unlike both the default and the run's), so a changed flag is never dropped in silence."""
    defaults = vars(build_parser().parse_args([]))
    ignored = []
    for key, value in vars(given).items():
        if value != defaults.get(key) and value != getattr(run.args, key):
            name = key.replace("_", "-")
            flag = f"--{name}" if value is True else f"--no-{name}" if value is False else f"--{name} {value}"
            ignored.append(f"{flag} (the run's: {getattr(run.args, key)})")
    if ignored:
        run.log(f"--resume continues the run with the recipe it was saved with; ignored: {', '.join(ignored)}")


if __name__ == "__main__":
    main()
