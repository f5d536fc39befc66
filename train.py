"""Train ResNet18 on CIFAR-10: OneCycle, RandomCrop + flip + Cutout, mixed precision, safe checkpoints.

    python train.py --epochs 20                      # the default recipe (README, Recipes)
    python train.py --resume runs/<run>/last.pt      # continue a stopped run exactly
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel; BatchNorm statistics
                                                     # stay per process (--sync-bn shares them)

The recipe comes first and reads on its own: train_step, epoch_batches, train_epoch, test_sums and
evaluate, one_cycle. What a run needs besides (its folder, checkpoints and resume, Ctrl-C and
SIGTERM, the warm-up, torchrun, metrics.json) is in plumbing.py. From a notebook:
`history = train.fit(epochs=1, limit_train=2000)` or `train.main([...])`. The run folder gets
best.pt, last.pt, metrics.json and curves.png (and lr_range.png with --max-lr auto).

Random streams, each derived from --seed alone, so a resumed run draws what an uninterrupted one
would have drawn:
    init          torch.manual_seed(seed) just before the model is built
    order         epoch e's shuffle: a CPU generator seeded with seed * 100_003 + e
    augmentation  one generator per process on the data's device, seed * 1000 + rank; kept in last.pt
    range test    seed + 1 + rank, for its batches and its augmentation (lr_range.lr_range_inputs)
    flips         with --alternate-flip, each image's first-epoch mirror: a CPU generator seeded seed + 2
"""
import argparse
import datetime
import itertools
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import plumbing
from common import UserError

# The peak LR at batch 512: 0.4 beat 0.2 by 0.33 points at epoch 20 (4 and 3 seeds on an H200,
# results/gpu/h200-2026-11-30); other batches scale it linearly.
BASE_LR, BASE_BATCH = 0.4, 512


# ---------------------------------------------------------------------------------------------
# The recipe: these need only torch and data.py


def train_step(model, x, y, criterion, optimizer, scaler, scheduler, amp_dtype=None):
    """One optimizer step on one augmented batch in mixed precision (amp_dtype torch.bfloat16, or
    torch.float16 with an enabled GradScaler; None trains in fp32). Returns the loss (detached, fp32)
    and the logits."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach().float(), logits.detach()


def epoch_batches(images, labels, args, epoch, generator, start=0, rank=0, world=1):
    """Epoch `epoch`'s augmented batches (x channels_last, y) of uint8 images on the device, from
    batch `start` on: shuffled by a generator seeded from the seed and epoch alone, whole batches
    only, each process taking its part of every batch under torchrun. Reads args.batch_size, seed,
    no_flip, alternate_flip and cutout_p."""
    order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    flips = data.alternating_flips(len(images), args.seed, epoch, images.device) if args.alternate_flip else None
    for idx in data.batch_indices(len(images), args.batch_size, True, order, True, rank, world, start=start,
                                  device=images.device):
        x = data.train_transform(images[idx], generator, not args.no_flip, args.cutout_p,
                                 None if flips is None else flips[idx])
        yield x.contiguous(memory_format=torch.channels_last), labels[idx]


def train_epoch(model, batches, criterion, optimizer, scaler, scheduler, amp_dtype=None, after_step=None):
    """Train on every batch. Returns the summed loss and correct predictions (a tensor: no step
    waits for the GPU) and the images seen. after_step(i, loss, sums, seen) ends the epoch early
    by returning True."""
    model.train()
    sums, seen = 0, 0
    for i, (x, y) in enumerate(batches):
        loss, logits = train_step(model, x, y, criterion, optimizer, scaler, scheduler, amp_dtype)
        sums = sums + torch.stack([loss * len(y), (logits.argmax(1) == y).sum().float()])
        seen += len(y)
        if after_step is not None and after_step(i, loss, sums, seen):
            break
    return sums, seen


@torch.no_grad()
def test_sums(model, images, labels, batch_size=1024, amp_dtype=None, tta=True, pad=False, num_classes=10):
    """Per class, over uint8 test images: summed cross-entropy, correct predictions of one view,
    correct predictions with flip TTA (the mean of the logits of the image and of its mirror, both
    in one forward), and images. With pad a short last batch is padded to batch_size, so cuDNN
    meets one shape only; eval-mode BatchNorm treats each image alone, so padding changes nothing."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, num_classes, device=images.device)
    for first in range(0, len(images), batch_size):
        x, y = data.normalize(images[first:first + batch_size]), labels[first:first + batch_size]
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, batch_size - len(x)))
        views = torch.cat([x, x.flip(-1)]) if tta else x
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(views.contiguous(memory_format=torch.channels_last)).float()
        one, mirrored = logits.chunk(2) if tta else (logits, logits)
        one, mirrored = one[:len(y)], mirrored[:len(y)]
        for row, value in enumerate([F.cross_entropy(one, y, reduction="none"), one.argmax(1) == y,
                                     (one + mirrored).argmax(1) == y, torch.ones_like(y)]):
            sums[row].index_add_(0, y, value.to(sums.dtype))
    model.train(was_training)
    return sums


def test_result(sums, tta=True):
    """Mean loss, accuracy and per-class accuracy (and with tta their flip-TTA versions) from
    test_sums, once all-reduced under torchrun."""
    loss, correct, correct_tta, count = sums.double().cpu()
    n = max(int(count.sum()), 1)
    result = {"loss": loss.sum().item() / n, "correct": int(correct.sum()), "total": int(count.sum()),
              "accuracy": 100 * correct.sum().item() / n, "per_class": (100 * correct / count.clamp(min=1)).tolist()}
    if tta:
        result.update(correct_tta=int(correct_tta.sum()), accuracy_tta=100 * correct_tta.sum().item() / n,
                      per_class_tta=(100 * correct_tta / count.clamp(min=1)).tolist())
    return result


def evaluate(model, images, labels, batch_size=1024, amp_dtype=None, tta=True, pad=False):
    """Test loss and accuracy of a model on uint8 images and their labels, in one process."""
    return test_result(test_sums(model, images, labels, batch_size, amp_dtype, tta, pad), tta)


def one_cycle(optimizer, max_lr, total_steps, pct_start=0.25):
    """OneCycle: up to max_lr over pct_start of the steps, then cosine down to nearly 0, momentum
    cycled inversely (0.95 to 0.85). Very short runs keep one step of warm-up and one of descent."""
    pct_start = min(max(pct_start, 2 / total_steps), 1 - 1 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total_steps, pct_start=pct_start)


# ---------------------------------------------------------------------------------------------
# Entry points


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    common.resolve_device(args.device, parser)
    rank, _, world = plumbing.distributed_env()
    if not args.resume:
        try:
            plumbing.validate(args, world)
        except UserError as e:
            parser.error(str(e))
    try:
        return run(args)
    except (UserError, data.DataError) as e:
        if rank == 0:
            print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Stopped after saving, or a second signal
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


def fit(**overrides):
    """Notebook entry: fit(epochs=1, data_dir='./data', limit_train=2000) -> history.

    Keyword names are the CLI's options with underscores; unknown names raise TypeError.
    """
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"fit() got an unknown option {key!r}")
        setattr(args, key, value)
    return run(args)


def run(args):
    """Train with parsed arguments; returns the history (a list of per-epoch dicts)."""
    rank, local_rank, world = plumbing.distributed_env()
    ckpt = None
    if args.resume:
        args, ckpt = plumbing.restored_args(args, world)
        if ckpt["epoch"] >= args.epochs:
            if rank == 0:
                print(f"{args.resume} is a finished run ({ckpt['epoch']} of {args.epochs} epochs): nothing to "
                      f"resume and nothing changed. To train longer, start a new run with a larger --epochs.")
            return ckpt["history"]
    plumbing.validate(args, world)
    device = plumbing.start_processes(args, local_rank, world)
    try:
        return train(args, ckpt, device, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Command line


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
        help=f"OneCycle's peak LR, or 'auto': the LR range test's pick (default {BASE_LR:g} x batch size / "
             f"{BASE_BATCH}, the linear scaling rule)")
    add("--lr-range-steps", type=common.int_at_least(2), default=100, help="steps of --max-lr auto's test (100)")
    add("--pct-start", type=common.fraction, default=0.25, help="share of training rising to the peak (0.25)")
    add("--wd", type=common.non_negative_float, default=5e-4, help="weight decay (default 5e-4)")
    add("--bn-wd", action=argparse.BooleanOptionalAction, default=True,
        help="decay BatchNorm's scales and shifts and the classifier's bias too (default on)")
    add("--label-smoothing", type=common.fraction, default=0.1, help="label smoothing (default 0.1)")
    add("--no-flip", action="store_true", help="no random horizontal flip (the spec used none)")
    add("--alternate-flip", action="store_true", help="mirror each image every other epoch (airbench)")
    add("--cutout-p", type=common.probability, default=0.5,
        help="chance of an image's 16x16 Cutout hole (default 0.5, the spec's; 1: the Cutout paper's)")
    add("--seed", type=int, default=0, help="random seed for init, order and augmentation (default 0)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: bf16 on GPUs from compute capability 8.0 and on CPUs with bf16 units, fp16 + "
             "GradScaler on older GPUs (T4, V100); --no-amp: fp32")
    add("--compile", action="store_true",
        help="torch.compile the model (off: mode 'default' trained slower than eager on the H100 and H200)")
    add("--compile-mode", choices=common.COMPILE_MODES, default="default", help="torch.compile's mode")
    add("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes (CUDA)")
    add("--limit-train", type=common.positive_int, default=None, help="train on the first N images only")
    add("--limit-test", type=common.positive_int, default=None, help="test on the first N images only")
    add("--tta", action=argparse.BooleanOptionalAction, default=True,
        help="also score each test image with its mirror, averaging the logits (default on)")
    add("--eval-batch-size", type=common.positive_int, default=1024, help="test batch size (default 1024)")
    add("--tensorboard", metavar="DIR", default=None, help="also write TensorBoard scalars to DIR")
    return p


# ---------------------------------------------------------------------------------------------
# The run


def train(args, ckpt, device, rank, world):
    """Load the data, build the model, pick the peak LR, then train, test and save each epoch."""
    started, log = time.perf_counter(), print if rank == 0 else (lambda *a, **k: None)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or plumbing.broadcast_value(os.path.join("runs", stamp), world)
    with common.FolderLock(args.out, log, rank == 0), plumbing.StopSignals() as stop, \
            plumbing.TensorBoard(args.tensorboard if rank == 0 else None) as tb:
        train_x, train_y, test_x, test_y, classes = plumbing.load_data(args, device, rank, world)
        dtype = common.amp_dtype(device, args.amp)
        net = plumbing.build_model(args, len(classes), device, world)
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        max_lr, lr_range = plumbing.pick_max_lr(args, ckpt, net, criterion, train_x, train_y, dtype, rank, world, log,
                                                BASE_LR, BASE_BATCH)
        state = new_state(args, net, max_lr, lr_range, classes, len(train_x) // args.batch_size, dtype, rank, world)
        state.started = started
        state.resume(ckpt, log, device, dtype)
        model, test_model = plumbing.forwards(net, args, device, world)
        log(plumbing.header(state, device, dtype, len(train_x), len(test_x)))

        def test():
            return run_test(test_model, test_x, test_y, args, dtype, rank, world)

        if device.type == "cuda" or args.compile:
            warm_batches = epoch_batches(train_x, train_y, args, 0, data.device_generator(device, 0), 0, rank, world)
            state.warmup_seconds = plumbing.warm_up(lambda n: train_epoch(
                model, itertools.islice(warm_batches, n), criterion, state.optimizer, state.scaler, state.scheduler,
                dtype), test, state)
            what = ", ".join(["cuDNN autotuning"] * (device.type == "cuda") + ["compilation"] * args.compile)
            log(f"Warm-up ({what}): {state.warmup_seconds:.1f} s, not counted as training")
        for _ in range(state.epoch, args.epochs):
            run_epoch(state, model, criterion, train_x, train_y, test, dtype, stop, tb, log)
        if rank == 0:
            plumbing.finish(state, log)
        if world > 1:
            dist.barrier()  # the others wait while rank 0 writes, then all leave the group together
    return state.history


def run_epoch(state, model, criterion, train_x, train_y, test, dtype, stop, tb, log):
    """Train epoch state.epoch (from state.step, after a resume), test, record and save it; stop
    and save on a signal; refuse to go on or save once the train or test loss is not finite."""
    args, device = state.args, train_x.device
    watch = plumbing.StepWatch(state, stop, device)
    batches = epoch_batches(train_x, train_y, args, state.epoch, state.aug_generator, state.step, state.rank,
                            state.world)
    sums, seen = train_epoch(model, batches, criterion, state.optimizer, state.scaler, state.scheduler, dtype, watch)
    stats = watch.summary(sums, seen)
    if stats["stopped"]:
        plumbing.stop_mid_epoch(state, stop, stats, watch.next_step)
    plumbing.share_bn_statistics(state)
    result = test()
    plumbing.check_test_loss(state, result)
    log(plumbing.test_line(result), flush=True)
    plumbing.end_epoch(state, stats, result, device, dtype, tb)
    if state.epoch < args.epochs and stop.agreed(state.world, device):  # a finished run just finishes
        plumbing.stop_now(state, stop, None, f"after epoch {state.epoch}")


def run_test(model, test_x, test_y, args, dtype, rank, world):
    """The run's test pass: each process scores its share of the test set, in batches of one
    shape on CUDA; the sums are all-reduced."""
    share = -(-args.eval_batch_size // world)
    images, labels = test_x.tensor_split(world)[rank], test_y.tensor_split(world)[rank]
    sums = test_sums(model, images, labels, share, dtype, args.tta, pad=test_x.device.type == "cuda")
    return test_result(plumbing.all_reduce(sums, world), args.tta)


def new_state(args, net, max_lr, lr_range, classes, steps, dtype, rank, world):
    """The optimizer, the OneCycle schedule over the whole run and the GradScaler (on for fp16),
    in the state that last.pt keeps."""
    optimizer = common.make_optimizer(net, args.optimizer, max_lr, args.wd, args.bn_wd)
    scheduler = one_cycle(optimizer, max_lr, args.epochs * steps, args.pct_start)
    scaler = torch.amp.GradScaler(next(net.parameters()).device.type, enabled=dtype == torch.float16)
    return plumbing.TrainState(args, net, optimizer, scheduler, scaler, max_lr, lr_range, classes, steps, rank,
                               world)


if __name__ == "__main__":
    main()
