"""Train ResNet18 on CIFAR-10: OneCycle, RandomCrop + Cutout, mixed precision, safe checkpoints.

    python train.py --epochs 20                      # the default recipe (see README)
    python train.py --resume runs/<run>/last.pt      # continue an interrupted run exactly
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, same results

From a notebook: `history = train.fit(epochs=1, limit_train=2000)` or `train.main([...])`.
The run folder gets best.pt, last.pt, metrics.json and curves.png (and lr_range.png with
--max-lr auto). Checkpoints hold only tensors and plain values and load with weights_only=True.

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
import datetime
import os
import re
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import UserError
from lr_range import lr_range_inputs, lr_range_test, plot_lr_range
from resnet import ResNet18

# The peak LR at batch 512: 0.4 beat 0.2 by 0.33 points at epoch 20 (4 and 3 seeds on an H200,
# results/gpu/h200-2026-11-30); other batches scale it linearly.
BASE_LR, BASE_BATCH = 0.4, 512
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what common.save_atomic writes before its rename


class NonFiniteLoss(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# Entry points


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    common.resolve_device(args.device, parser)
    if not args.resume:
        try:
            validate(args, distributed_env()[2])
        except UserError as e:
            parser.error(str(e))
    try:
        return run(args)
    except (UserError, data.DataError) as e:
        if distributed_env()[0] == 0:
            print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


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
    rank, local_rank, world = distributed_env()
    ckpt = None
    if args.resume:
        args, ckpt = restored_args(args, world)
        if ckpt["epoch"] >= args.epochs:
            if rank == 0:
                print(f"{args.resume} is a finished run ({ckpt['epoch']} of {args.epochs} epochs): nothing to "
                      f"resume and nothing changed. To train longer, start a new run with a larger --epochs.")
            return ckpt["history"]
    validate(args, world)
    device = start_processes(args, local_rank, world)
    try:
        return train(args, ckpt, device, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args, ckpt, device, rank, world):
    """Load the data, build the model, pick the peak LR, then train, evaluate and save each epoch."""
    started, main_process = time.perf_counter(), rank == 0
    log = print if main_process else (lambda *a, **k: None)
    args.out = args.out or broadcast_value(os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")),
                                           world)
    with RunFolder(args.out, main_process, log), TensorBoard(args.tensorboard if main_process else None) as tb:
        train_x, train_y, test_x, test_y, classes = load_data(args, device, main_process, world)
        dtype = common.amp_dtype(device, args.amp)
        net = build_model(args, len(classes), device, world)
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        max_lr, lr_range = pick_max_lr(args, ckpt, net, criterion, train_x, train_y, dtype, rank, world, log)
        state = TrainState(args, net, max_lr, lr_range, classes, len(train_x) // args.batch_size, dtype, rank, world)
        state.started = started
        if ckpt is not None:
            state.restore(ckpt)
            log(f"Resuming {args.out} at epoch {state.epoch + 1}, step {state.step}")
            if main_process:
                write_metrics(state, device, dtype)  # a kill between last.pt and metrics.json must not part them
        train_forward, eval_forward = forwards(net, args, device, world)
        log(f"ResNet18 on {device} ({common.precision_name(dtype)}, channels_last{', compiled' if args.compile else ''}"
            f"{f', {world} processes' if world > 1 else ''}); {len(train_x):,} train / {len(test_x):,} test "
            f"images; {args.optimizer} OneCycle max LR {max_lr:.4g}, batch {args.batch_size}, {args.epochs} epochs")
        if device.type == "cuda" or args.compile:
            state.warmup_seconds = warm_up(train_forward, eval_forward, state, criterion, train_x, train_y, test_x,
                                           test_y, dtype)
            log(f"Warm-up (cuDNN autotuning{', compilation' if args.compile else ''}): "
                f"{state.warmup_seconds:.1f} s, not counted as training")
        with SigintFlag() as interrupt:
            for epoch in range(state.epoch, args.epochs):
                stats = train_epoch(train_forward, state, criterion, train_x, train_y, dtype, interrupt)
                if stats["stopped"]:
                    save_mid_epoch(state, stats)
                result = evaluate(eval_forward, test_x, test_y, args.eval_batch_size, dtype, len(classes), rank, world,
                                  args.tta)
                log(test_line(result), flush=True)
                end_epoch(state, stats, result, device, dtype, tb)
                if interrupt.set and world == 1:
                    print(f"Interrupted after epoch {epoch + 1}; saved {os.path.join(args.out, 'last.pt')}.\n"
                          f"Resume with: {resume_command(args)}", flush=True)
                    raise KeyboardInterrupt
        if main_process:
            finish(state, log)
        if world > 1:
            dist.barrier()  # the others wait while rank 0 writes, then all leave the group together
    return state.history


# ---------------------------------------------------------------------------------------------
# Command line


def max_lr_value(text):
    return "auto" if text == "auto" else common.positive_float(text)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=common.positive_int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=common.positive_int, default=512,
                   help="global batch size, split evenly over torchrun processes (default 512)")
    p.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-10 into --data-dir when it is missing (default on)")
    p.add_argument("--out", default=None, help="run folder (default ./runs/<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into an existing, non-empty --out, or resuming an earlier checkpoint of a "
                        "run over its later last.pt")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in PATH (its last.pt)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd (Nesterov momentum) or adam; OneCycle cycles the momentum (or beta1) "
                        "between 0.95 and 0.85 (default sgd)")
    p.add_argument("--max-lr", type=max_lr_value, default=None,
                   help=f"OneCycle peak LR, or 'auto' to take it from an LR range test first (default "
                        f"{BASE_LR:g} x batch size / {BASE_BATCH}, the linear scaling rule: {BASE_LR:g} at "
                        f"{BASE_BATCH})")
    p.add_argument("--lr-range-steps", type=common.positive_int, default=100,
                   help="steps of the LR range test run by --max-lr auto (default 100)")
    p.add_argument("--pct-start", type=common.fraction, default=0.25,
                   help="fraction of training spent warming up to the peak (default 0.25: epoch 5 of 20)")
    p.add_argument("--wd", type=common.non_negative_float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--bn-wd", action=argparse.BooleanOptionalAction, default=True,
                   help="weight decay on BatchNorm's scales and shifts and the classifier's bias too; "
                        "--no-bn-wd decays only the conv and linear weights (default on)")
    p.add_argument("--label-smoothing", type=common.fraction, default=0.1, help="label smoothing (default 0.1)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip (the spec used none)")
    p.add_argument("--alternate-flip", action="store_true",
                   help="mirror each image in every other epoch (airbench) instead of at random")
    p.add_argument("--cutout-p", type=common.probability, default=0.5,
                   help="probability that an image gets its 16x16 Cutout hole (default 0.5, as the spec's "
                        "albumentations Cutout; 1 cuts every image, as the Cutout paper)")
    p.add_argument("--seed", type=int, default=0, help="random seed for init, order and augmentation (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bf16 on GPUs of compute capability 8.0 and later, fp16 + GradScaler "
                        "on older ones (T4, V100), bf16 on CPUs that support it; --no-amp trains in fp32 "
                        "(default on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (off by default: mode 'default' trained slower than eager on "
                        "the H100 and H200; 'reduce-overhead' stepped 1.6x faster on the H200 but has not "
                        "trained a whole run yet)")
    p.add_argument("--compile-mode", choices=common.COMPILE_MODES, default="default",
                   help="torch.compile's mode with --compile (default 'default')")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    p.add_argument("--limit-train", type=common.positive_int, default=None, help="train on the first N images only")
    p.add_argument("--limit-test", type=common.positive_int, default=None, help="test on the first N images only")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="also test each image with its mirror, averaging the logits (flip test-time "
                        "augmentation); metrics.json keeps both accuracies (default on)")
    p.add_argument("--eval-batch-size", type=common.positive_int, default=1024, help="test batch size (default 1024)")
    p.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write TensorBoard scalars to DIR (needs the tensorboard package)")
    return p


def validate(args, world_size=1):
    """Checks that argparse cannot express; raises UserError with one sentence."""
    if args.limit_train is not None and args.limit_train > data.SPLIT_SIZE["train"]:
        raise UserError(f"--limit-train {args.limit_train} is larger than the training set (50,000)")
    if args.limit_test is not None and args.limit_test > data.SPLIT_SIZE["test"]:
        raise UserError(f"--limit-test {args.limit_test} is larger than the test set (10,000)")
    n_train = args.limit_train or data.SPLIT_SIZE["train"]
    if args.batch_size > n_train:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {n_train} training images")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    total_steps = args.epochs * (n_train // args.batch_size)
    if total_steps < 3:
        raise UserError(f"only {total_steps} training steps: OneCycle needs at least 3; "
                        f"raise --epochs or --limit-train, or lower --batch-size")
    if args.resume is None and args.out is not None and run_files(args.out) and not args.overwrite:
        advice = "choose another --out or pass --overwrite"
        if os.path.isfile(os.path.join(args.out, "last.pt")):
            advice += f", or continue it with --resume {os.path.join(args.out, 'last.pt')}"
        raise UserError(f"{args.out} already holds a run; {advice}")


def run_files(folder):
    """The folder's files, less the temp files a killed save leaves behind."""
    if not os.path.isdir(folder):
        return []
    return [name for name in os.listdir(folder) if not TEMP_FILE.match(name)]


def resume_command(args):
    """The command that continues this run: the checkpoint keeps the recipe, not where the data lives."""
    parser = build_parser()
    command = ["python", "train.py", "--resume", os.path.join(args.out, "last.pt")]
    for flag, key in (("--data-dir", "data_dir"), ("--device", "device")):
        if getattr(args, key) != parser.get_default(key):
            command += [flag, str(getattr(args, key))]
    return shlex.join(command)


# ---------------------------------------------------------------------------------------------
# Set-up: processes, run folder, data, peak LR


def distributed_env():
    """(rank, local_rank, world_size) from torchrun's environment, (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def start_processes(args, local_rank, world):
    """The device this process trains on; joins torchrun's process group when there is one."""
    device = common.resolve_device(args.device)
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn works only with CUDA GPUs (PyTorch's SyncBatchNorm); drop it on CPU")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def all_reduce(tensor, world_size):
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def broadcast_value(value, world_size):
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RunFolder:
    """The run folder, locked for as long as the run lasts: a second train.py aimed at it is
    refused at once. The operating system drops the lock when the process dies, so a killed run
    never leaves the folder locked; the temp files its last save left behind are removed.
    (flock on the folder itself leaves no file; where fcntl is missing, as on Windows, no lock.)"""

    def __init__(self, path, main_process=True, log=print):
        self.path, self.main_process, self.log, self.fd = path, main_process, log, None

    def __enter__(self):
        if not self.main_process:
            return self
        common.check_writable(self.path)
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"another train.py is writing to {self.path}; wait for it to finish, "
                            f"or choose another --out") from None
        stale = [name for name in os.listdir(self.path) if TEMP_FILE.match(name)]
        for name in stale:
            os.unlink(os.path.join(self.path, name))
        if stale:
            self.log(f"Removed {len(stale)} temp file(s) that a killed run left in {self.path}")
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


class TensorBoard:
    """A SummaryWriter when a folder is given (only the main process gets one), else nothing."""

    def __init__(self, folder):
        self.writer = None
        if folder:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(folder)

    def __enter__(self):
        return self

    def add(self, record):
        if self.writer is not None:
            for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                self.writer.add_scalar(key, record[key], record["epoch"])

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()


def load_data(args, device, main_process, world):
    """Train and test images and labels on the device, cut to --limit-*; rank 0 downloads."""
    if world > 1 and not main_process:
        dist.barrier()  # the others read the data only once rank 0 has downloaded it
    train_x, train_y, classes = data.load_cifar10(args.data_dir, "train", download=args.download and main_process)
    if world > 1 and main_process:
        dist.barrier()
    test_x, test_y, _ = data.load_cifar10(args.data_dir, "test")
    train_x, train_y = train_x[:args.limit_train].to(device), train_y[:args.limit_train].to(device)
    test_x, test_y = test_x[:args.limit_test].to(device), test_y[:args.limit_test].to(device)
    return train_x, train_y, test_x, test_y, classes


def build_model(args, num_classes, device, world):
    torch.manual_seed(args.seed)  # the init stream
    net = ResNet18(num_classes=num_classes).to(device, memory_format=torch.channels_last)
    return nn.SyncBatchNorm.convert_sync_batchnorm(net) if args.sync_bn and world > 1 else net


def forwards(net, args, device, world):
    """What trains (DDP-wrapped under torchrun) and what tests (rank 0's own weights), compiled
    with --compile."""
    model = nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    if not args.compile:
        return model, net
    return torch.compile(model, mode=args.compile_mode), torch.compile(net, mode=args.compile_mode)


def pick_max_lr(args, ckpt, net, criterion, train_x, train_y, dtype, rank, world, log):
    """(peak LR, range-test record or None): the checkpoint's on resume, the range test's with
    'auto', --max-lr as given, or by default BASE_LR scaled linearly with the batch size (Goyal
    et al. 2017): batch 128 starts from a quarter of batch 512's peak."""
    if ckpt is not None:
        return ckpt["max_lr"], ckpt.get("lr_range")
    if args.max_lr is None:
        max_lr = BASE_LR * args.batch_size / BASE_BATCH
        log(f"Peak LR {max_lr:.4g} = {BASE_LR:g} x batch {args.batch_size} / {BASE_BATCH} (linear scaling; "
            f"--max-lr sets it)")
        return max_lr, None
    if args.max_lr != "auto":
        return args.max_lr, None
    log(f"LR range test ({args.optimizer}, {args.lr_range_steps} steps) to pick the OneCycle peak ...", flush=True)
    batches, augment = lr_range_inputs(train_x, train_y, args.batch_size // world, args.seed + rank,
                                       not args.no_flip, args.cutout_p)
    optimizer = common.make_optimizer(net, args.optimizer, 1e-7, args.wd, args.bn_wd)
    result = lr_range_test(net, optimizer, criterion, batches, num_iter=max(2, args.lr_range_steps), amp_dtype=dtype,
                           transform=augment)
    max_lr = broadcast_value(result.suggested_lr, world)
    if rank == 0:
        plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
    log(f"LR range test suggests max LR {max_lr:.4g} (minimum loss at {result.min_loss_lr:.4g})")
    return max_lr, result.to_dict()


# ---------------------------------------------------------------------------------------------
# Training state: what last.pt holds, and resuming from it


def restored_args(args, world=1):
    """On --resume, the saved run's recipe wins; only where and how to run come from the CLI.
    Resuming an earlier checkpoint than the folder's last.pt (best.pt, say) would rewind the run
    and overwrite last.pt, so it needs --overwrite."""
    ckpt = common.load_checkpoint(args.resume)
    saved = dict(ckpt.get("args") or {})
    if not saved:
        raise UserError(f"{args.resume} holds no training arguments, so it cannot be resumed")
    if len(ckpt["aug_generator"]) != world:
        raise UserError(f"{args.resume} was saved by {len(ckpt['aug_generator'])} process(es); resume it "
                        f"with the same number (torchrun --nproc_per_node)")
    for key in ("device", "data_dir", "download", "tensorboard", "resume", "overwrite", "eval_batch_size"):
        saved[key] = getattr(args, key)
    saved.setdefault("cutout_p", 1.0)  # runs saved before --cutout-p existed cut every image
    saved["out"] = os.path.dirname(os.path.abspath(args.resume))
    last = os.path.join(saved["out"], "last.pt")
    if os.path.abspath(args.resume) != last and os.path.isfile(last) and not args.overwrite \
            and ckpt["epoch"] < saved["epochs"]:
        later = common.load_checkpoint(last)
        if (later["epoch"], later["step"]) > (ckpt["epoch"], ckpt["step"]):
            raise UserError(f"{args.resume} is epoch {ckpt['epoch']} of a run whose last.pt has reached epoch "
                            f"{later['epoch']}; resume {last} instead, or pass --overwrite to rewind the run "
                            f"to epoch {ckpt['epoch']} (last.pt and metrics.json are overwritten)")
    return argparse.Namespace(**{**vars(args), **saved}), ckpt


class TrainState:
    """Everything a run needs to continue exactly: weights, optimizer, OneCycle schedule, scaler,
    each process's augmentation generator, where the run stands, and its history. Written to a
    checkpoint by checkpoint() and loaded by restore(); restored_args (above) reads only the recipe
    and the position, to check a resume before anything is built."""

    def __init__(self, args, net, max_lr, lr_range, classes, steps, dtype, rank, world):
        device = next(net.parameters()).device
        self.args, self.net, self.max_lr, self.lr_range, self.classes = args, net, max_lr, lr_range, list(classes)
        self.steps, self.rank, self.world = steps, rank, world
        self.optimizer = common.make_optimizer(net, args.optimizer, max_lr, args.wd, args.bn_wd)
        total = args.epochs * steps
        # OneCycle's warm-up must end at step 1 or later and leave a step to anneal; this moves
        # pct_start only for runs of a few steps, such as `--epochs 1 --limit-train 2000`.
        pct_start = min(max(args.pct_start, 2 / total), 1 - 1 / total)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr, total_steps=total,
                                                             pct_start=pct_start)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.aug_generator = data.device_generator(device, args.seed * 1000 + rank)
        self.epoch, self.step = 0, 0  # the next step to take
        self.partial = None  # [loss sum, correct, images, seconds] of an epoch stopped midway
        self.history, self.best_acc = [], -1.0
        # this process's clock, not saved: when train() started here, and the warm-up's seconds
        self.started, self.warmup_seconds = time.perf_counter(), 0.0

    def checkpoint(self):
        states = [self.aug_generator.get_state().cpu()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, self.aug_generator.get_state().cpu())
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "aug_generator": states, "epoch": self.epoch, "step": self.step, "partial": self.partial,
                "history": self.history, "best_acc": self.best_acc, "max_lr": self.max_lr,
                "lr_range": self.lr_range, "arch": "ResNet18", "classes": self.classes,
                "mean": list(data.MEAN), "std": list(data.STD), "args": vars(self.args)}

    def restore(self, ckpt):
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.aug_generator.set_state(ckpt["aug_generator"][self.rank])
        self.epoch, self.step, self.history, self.best_acc = ckpt["epoch"], ckpt["step"], ckpt["history"], \
            ckpt["best_acc"]
        partial = ckpt.get("partial")
        # checkpoints saved before the seconds were kept have three entries; that time is lost
        self.partial = (list(partial) + [0.0])[:4] if partial else None

    def save(self, names, checkpoint=None):
        """Write one checkpoint (made once) to each of names in the run folder, atomically."""
        checkpoint = checkpoint or self.checkpoint()
        for name in names:
            common.save_atomic(os.path.join(self.args.out, name), lambda f: torch.save(checkpoint, f))


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def train_step(model, x, y, criterion, optimizer, scaler, scheduler, dtype):
    """One optimizer step on one augmented batch; returns the loss (detached fp32) and the logits."""
    with common.autocast(x.device, dtype):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach().float(), logits.detach()


def warm_up(model, eval_model, state, criterion, train_x, train_y, test_x, test_y, dtype, steps=3):
    """A few training steps and one test pass on the run's exact shapes, then every state put back:
    cuDNN's autotuning (and torch.compile) happen before the clock starts. Returns the seconds."""
    start = time.perf_counter()
    saved = copy.deepcopy([state.net.state_dict(), state.optimizer.state_dict(), state.scheduler.state_dict(),
                           state.scaler.state_dict()])
    local = state.args.batch_size // state.world
    generator = data.device_generator(train_x.device, 0)  # not the run's: its draws stay untouched
    for _ in range(steps):
        x = data.train_transform(train_x[:local], generator, not state.args.no_flip, state.args.cutout_p)
        train_step(model, x.contiguous(memory_format=torch.channels_last), train_y[:local], criterion,
                   state.optimizer, state.scaler, state.scheduler, dtype)
    evaluate(eval_model, test_x, test_y, state.args.eval_batch_size, dtype, len(state.classes), state.rank,
             state.world, state.args.tta)
    state.net.load_state_dict(saved[0])
    state.optimizer.load_state_dict(saved[1])
    state.scheduler.load_state_dict(saved[2])
    state.scaler.load_state_dict(saved[3])
    state.optimizer.zero_grad(set_to_none=True)
    if train_x.device.type == "cuda":
        torch.cuda.synchronize(train_x.device)
    return time.perf_counter() - start


def train_epoch(model, state, criterion, train_x, train_y, dtype, interrupt):
    """Train epoch state.epoch from step state.step on; writes no files. Returns the epoch's loss
    and correct sums, images and seconds (the interrupted part included), the last LR, and whether
    a Ctrl-C stopped it before its last step (then 'step' is the next step to take); 'started' is
    when the epoch would have started had it run without a break."""
    args, device, epoch = state.args, train_x.device, state.epoch
    state.net.train()
    progress = Progress(epoch + 1, args.epochs, state.steps, state.rank == 0)
    order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    loss_sum, correct, seen, elapsed = state.partial or (0.0, 0.0, 0, 0.0)
    flips = data.alternating_flips(len(train_x), args.seed, epoch, device) if args.alternate_flip else None
    sums, finite = torch.tensor([loss_sum, correct], device=device), []
    first_step, resumed_at = state.step, time.perf_counter()
    lr, stopped = state.scheduler.get_last_lr()[0], False
    for step, idx in enumerate(data.batch_indices(len(train_x), args.batch_size, True, order, True, state.rank,
                                                  state.world, start=first_step, device=device), start=first_step):
        x = data.train_transform(train_x[idx], state.aug_generator, not args.no_flip, args.cutout_p,
                                 None if flips is None else flips[idx])
        lr = state.scheduler.get_last_lr()[0]
        loss, logits = train_step(model, x.contiguous(memory_format=torch.channels_last), train_y[idx], criterion,
                                  state.optimizer, state.scaler, state.scheduler, dtype)
        sums += torch.stack([loss * len(idx), (logits.argmax(1) == train_y[idx]).sum().float()])
        seen += len(idx)
        finite.append(torch.isfinite(loss))
        if progress.due(step) or interrupt.set or device.type == "cpu":  # a host sync: not every GPU step
            check_finite(finite, step, state)
        if progress.due(step):
            rate = (step + 1 - first_step) * args.batch_size / (time.perf_counter() - resumed_at)
            loss_sum, correct = sums.tolist()
            progress.show(step, loss_sum / seen, lr, 100 * correct / seen, rate)
        if interrupt.set and state.world == 1 and step + 1 < state.steps:
            stopped, first_step = True, step + 1
            break
    if state.world > 1:  # DDP syncs BN statistics only at the next forward: test what rank 0 saves
        for buffer in state.net.buffers():
            dist.broadcast(buffer, 0)
    return {"sums": sums, "seen": seen, "started": resumed_at - elapsed, "seconds": elapsed + time.perf_counter()
            - resumed_at, "lr": lr, "stopped": stopped, "step": first_step}


def check_finite(flags, step, state):
    """Raise NonFiniteLoss naming the first non-finite step among the last len(flags) steps."""
    flags_tensor = torch.stack(flags)
    if not bool(flags_tensor.all()):
        bad = step - len(flags) + 1 + int((~flags_tensor).nonzero()[0])
        raise NonFiniteLoss(f"the training loss became non-finite at epoch {state.epoch + 1}, step {bad + 1}; the "
                            f"last good checkpoint is kept in {state.args.out}. Try a lower --max-lr (this run used "
                            f"{state.max_lr:.4g}).")
    flags.clear()


def save_mid_epoch(state, stats):
    """After a Ctrl-C mid-epoch: keep the epoch's sums and seconds in last.pt, say how to go on."""
    state.step = stats["step"]
    state.partial = stats["sums"].tolist() + [stats["seen"], stats["seconds"]]
    state.save(["last.pt"])
    print(f"\nInterrupted at epoch {state.epoch + 1}, step {state.step}/{state.steps}; saved "
          f"{os.path.join(state.args.out, 'last.pt')}.\nResume with: {resume_command(state.args)}", flush=True)
    raise KeyboardInterrupt


@torch.no_grad()
def evaluate(model, images, labels, batch_size, dtype=None, num_classes=10, rank=0, world_size=1, tta=False,
             fixed_shape=None):
    """Test loss (plain cross-entropy), accuracy and per-class accuracy; with tta also the accuracy
    of the mean of each image's logits and its mirror's (flip test-time augmentation, Page's "How
    to train your ResNet"). Each process takes a disjoint part of every batch; sums are all-reduced.
    With fixed_shape (default on CUDA) a short last batch is padded with zeros, so cuDNN meets no
    new shape to autotune mid-run; eval-mode BatchNorm treats every image alone, so padding
    changes no result."""
    was_training = model.training
    model.eval()
    device = images.device
    fixed_shape = device.type == "cuda" if fixed_shape is None else fixed_shape
    shape = -(-batch_size // world_size)
    sums = torch.zeros(1 + 3 * num_classes, device=device)  # loss, correct, correct with TTA, count
    loss_sum, correct, correct_tta, count = sums[:1], *sums[1:].view(3, num_classes)
    for idx in data.batch_indices(len(images), batch_size, rank=rank, world_size=world_size, device=device):
        x, y = data.normalize(images[idx]), labels[idx]
        if fixed_shape:
            x = torch.cat([x, x.new_zeros(shape - len(y), *x.shape[1:])])
        x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(device, dtype):
            logits = model(x).float()[:len(y)]
            mirrored = model(x.flip(-1).contiguous(memory_format=torch.channels_last)).float()[:len(y)] if tta \
                else logits
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct.index_add_(0, y, (logits.argmax(1) == y).float())  # no boolean mask: no host sync
        correct_tta.index_add_(0, y, ((logits + mirrored).argmax(1) == y).float())
        count.index_add_(0, y, torch.ones_like(y, dtype=count.dtype))
    loss_sum, correct, correct_tta, count = all_reduce(sums, world_size).cpu().split([1] + [num_classes] * 3)
    model.train(was_training)
    n = int(count.sum())
    result = {"loss": loss_sum.item() / max(n, 1), "correct": int(correct.sum()), "total": n,
              "accuracy": 100.0 * float(correct.sum()) / max(n, 1),
              "per_class": (100.0 * correct / count.clamp(min=1)).tolist()}
    if tta:
        result.update(correct_tta=int(correct_tta.sum()), accuracy_tta=100.0 * float(correct_tta.sum()) / max(n, 1),
                      per_class_tta=(100.0 * correct_tta / count.clamp(min=1)).tolist())
    return result


# ---------------------------------------------------------------------------------------------
# Per-epoch records and files


def test_line(result):
    line = (f"Test set: Average loss: {result['loss']:.4f}, Accuracy: {result['correct']}/{result['total']} "
            f"({result['accuracy']:.2f}%)")
    if "accuracy_tta" in result:
        line += f"; with flip TTA: {result['correct_tta']}/{result['total']} ({result['accuracy_tta']:.2f}%)"
    return line + "\n"


def end_epoch(state, stats, result, device, dtype, tb):
    """Record the epoch in the history, then save best.pt, last.pt, metrics.json (rank 0)."""
    loss_sum, correct, seen = all_reduce(torch.cat([stats["sums"], stats["sums"].new_tensor([stats["seen"]])]),
                                         state.world).tolist()
    state.history.append({"epoch": state.epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                          "test_loss": result["loss"], "test_acc": result["accuracy"],
                          "test_acc_tta": result.get("accuracy_tta"), "lr": stats["lr"],
                          "train_seconds": stats["seconds"], "seconds": time.perf_counter() - stats["started"],
                          "train_images": int(seen), "train_images_per_s": seen / stats["seconds"]})
    improved = result["accuracy"] > state.best_acc
    state.best_acc = max(state.best_acc, result["accuracy"])
    state.epoch, state.step, state.partial = state.epoch + 1, 0, None
    checkpoint = state.checkpoint()  # every process joins the gather of the generators
    if state.rank != 0:
        return
    state.save((["best.pt"] if improved else []) + ["last.pt"], checkpoint)
    last = state.epoch == state.args.epochs
    write_metrics(state, device, dtype, result if last else None)
    tb.add(state.history[-1])
    if last:
        print("Per-class test accuracy: " + ", ".join(f"{c} {a:.1f}%" for c, a in zip(state.classes,
                                                                                       result["per_class"])))


def write_metrics(state, device, dtype, last_result=None):
    """metrics.json: the run's settings and every epoch; test_acc is a single view of each test
    image, test_acc_tta the mean of its and its mirror's logits (None with --no-tta)."""
    history = state.history
    best = max(history, key=lambda h: h["test_acc"]) if history else None
    per_class = {key: dict(zip(state.classes, last_result[key])) if last_result and key in last_result else None
                 for key in ("per_class", "per_class_tta")}
    common.save_json(os.path.join(state.args.out, "metrics.json"), {
        "dataset": "CIFAR-10", "device": str(device), "device_name": common.device_name(device),
        "precision": common.precision_name(dtype), "world_size": state.world, "torch": torch.__version__,
        "max_lr": state.max_lr, "lr_range": state.lr_range, "args": vars(state.args),
        "epochs": history, "best_epoch": best and best["epoch"], "best_test_acc": best and best["test_acc"],
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "final_test_acc_tta": history[-1].get("test_acc_tta") if history else None,
        "train_seconds": sum(h["train_seconds"] for h in history),
        "warmup_seconds": state.warmup_seconds, "wall_seconds": time.perf_counter() - state.started,
        "per_class_test_acc": per_class["per_class"], "per_class_test_acc_tta": per_class["per_class_tta"],
    })


def finish(state, log):
    history = state.history
    plot_curves(history, os.path.join(state.args.out, "curves.png"), state.args.label_smoothing)
    best = max(history, key=lambda h: h["test_acc"])
    final = history[-1].get("test_acc_tta")
    log(f"Best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']}"
        f"{f' (final, with flip TTA: {final:.2f}%)' if final is not None else ''}; "
        f"{sum(h['train_seconds'] for h in history):.1f} s of training. Outputs in {state.args.out}")


class Progress:
    """One live line per epoch: '\\r'-updated on a terminal, updated in place in a notebook (so a
    saved notebook keeps one line per epoch), a few plain lines in a log file."""

    def __init__(self, epoch, epochs, steps, enabled=True):
        self.prefix, self.steps, self.enabled = f"Epoch {epoch}/{epochs}", steps, enabled
        self.tty = sys.stdout.isatty()
        self.notebook = not self.tty and "ipykernel" in sys.modules
        self.every = max(1, steps // 10) if not (self.tty or self.notebook) else max(1, steps // 50)
        self.handle = None  # the notebook's display of this epoch's line

    def due(self, step):
        return self.enabled and ((step + 1) % self.every == 0 or step + 1 == self.steps)

    def show(self, step, loss, lr, acc, rate):
        line = (f"{self.prefix}  step {step + 1}/{self.steps}  loss {loss:.4f}  lr {lr:.5f}  "
                f"acc {acc:.2f}%  {rate:,.0f} img/s")
        if self.tty:
            print("\r" + line, end="\n" if step + 1 == self.steps else "", flush=True)
        elif self.notebook:
            from IPython.display import display
            if self.handle is None:
                self.handle = display({"text/plain": line}, raw=True, display_id=True)
            else:
                self.handle.update({"text/plain": line}, raw=True)
        else:
            print(line, flush=True)


class SigintFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.set, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def plot_curves(history, path=None, label_smoothing=0.0):
    """Loss and accuracy per epoch, train vs test, like the spec's 'Accuracy and Loss Plots';
    returns the Figure (a notebook shows it) and writes it to path as a PNG when one is given.
    The train loss is against smoothed targets when label smoothing is on, so the legend says so."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    train_label = f"train (targets smoothed by {label_smoothing:g})" if label_smoothing else "train"
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label=train_label)
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (log scale)", yscale="log")
    ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 2, not 2 x 10^0
    ax_loss.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [h["test_acc"] for h in history], "o-", label="test")
    if all(h.get("test_acc_tta") is not None for h in history):
        ax_acc.plot(epochs, [h["test_acc_tta"] for h in history], "o--", label="test, flip TTA")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # a one-epoch run still gets a whole-number tick
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    common.save_png(fig, path)
    return fig


if __name__ == "__main__":
    main()
