"""Train ResNet18 on CIFAR-10: OneCycle, RandomCrop + Cutout, mixed precision, safe checkpoints.

    python train.py --epochs 20                      # the default recipe (see README)
    python train.py --resume runs/<run>/last.pt      # continue an interrupted run exactly
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, same results

From a notebook: `history = train.fit(epochs=1, limit_train=2000)` or `train.main([...])`.
The run folder gets best.pt, last.pt, metrics.json and curves.png (and lr_range.png with
--max-lr auto). Checkpoints hold only tensors and plain values and load with weights_only=True.
"""
import argparse
import datetime
import json
import math
import os
import pickle
import re
import shlex
import signal
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from lr_range import lr_range_test, plot_lr_range
from resnet import ResNet18


class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""


class NonFiniteLoss(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# Command line


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def max_lr_value(text):
    return "auto" if text == "auto" else positive_float(text)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=positive_int, default=512,
                   help="global batch size, split evenly over torchrun processes (default 512)")
    p.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-10 into --data-dir when it is missing (default on)")
    p.add_argument("--out", default=None, help="run folder (default ./runs/<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing, non-empty --out")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in PATH (its last.pt)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd (Nesterov momentum) or adam; OneCycle cycles the momentum (or beta1) "
                        "between 0.95 and 0.85 (default sgd)")
    p.add_argument("--max-lr", type=max_lr_value, default=0.2,
                   help="OneCycle peak LR, or 'auto' to take it from an LR range test first (default 0.2)")
    p.add_argument("--lr-range-steps", type=positive_int, default=100,
                   help="steps of the LR range test run by --max-lr auto (default 100)")
    p.add_argument("--pct-start", type=fraction, default=0.25,
                   help="fraction of training spent warming up to the peak (default 0.25: epoch 5 of 20)")
    p.add_argument("--wd", type=non_negative_float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--label-smoothing", type=fraction, default=0.1, help="label smoothing (default 0.1)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip (the spec used none)")
    p.add_argument("--cutout-p", type=probability, default=0.5,
                   help="probability that an image gets its 16x16 Cutout hole (default 0.5, as the spec's "
                        "albumentations Cutout; 1 cuts every image, as the Cutout paper)")
    p.add_argument("--seed", type=int, default=0, help="random seed for init, order and augmentation (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bf16 (fp16 + GradScaler on older GPUs), bf16 on CPUs that "
                        "support it; --no-amp trains in fp32 (default on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (off by default: it trained slower than eager on the H100 and H200)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    p.add_argument("--limit-train", type=positive_int, default=None, help="train on the first N images only")
    p.add_argument("--limit-test", type=positive_int, default=None, help="test on the first N images only")
    p.add_argument("--eval-batch-size", type=positive_int, default=1024, help="test batch size (default 1024)")
    p.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write TensorBoard scalars to DIR (needs the tensorboard package)")
    return p


def resolve_device(name, parser=None):
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a one-line error."""
    def fail(message):
        if parser is None:
            raise UserError(message)
        parser.error(message)

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name} asks for CUDA but no CUDA GPU is available; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        fail(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


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
    if args.resume is None and args.out is not None and os.path.isdir(args.out) and os.listdir(args.out) \
            and not args.overwrite:
        raise UserError(f"{args.out} already holds a run; choose another --out, pass --overwrite, "
                        f"or continue it with --resume {os.path.join(args.out, 'last.pt')}")


# ---------------------------------------------------------------------------------------------
# Precision, model, optimizer


def device_name(device):
    """What a person comparing numbers needs to know of the device: the GPU's name, or the cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def cpu_supports_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device, amp=True):
    """The autocast dtype for this device, or None for fp32."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]


def make_optimizer(model, name, lr, wd):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)


def device_generator(device, seed):
    """A generator on the data's device, so augmentation draws never leave it."""
    return torch.Generator(device=device).manual_seed(seed)


def lr_range_inputs(images, labels, batch_size, seed, use_flip, cutout_p):
    """The LR range test's endless shuffled batches and their augmentation, both seeded with
    seed + 1: apart from training's draws, and the same for --max-lr auto and lr_range.py."""
    order = torch.Generator().manual_seed(seed + 1)
    generator = device_generator(images.device, seed + 1)

    def batches():
        while True:
            yield from data.batches(images, labels, batch_size, True, order, drop_last=True)

    def augment(x):
        return data.train_transform(x, generator, use_flip, cutout_p).contiguous(memory_format=torch.channels_last)

    return batches(), augment


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints


def save_atomic(path, write):
    """write(f) into a temp file in the same folder, fsync, then os.replace: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path, obj):
    save_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        save_atomic(os.path.join(folder, ".write-test"), lambda f: f.write(b"ok"))
        os.unlink(os.path.join(folder, ".write-test"))
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); choose another --out") from None


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: a checkpoint that asks to run code is refused."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
        if unsafe:
            raise UserError(f"{path} asks to run {unsafe.group(1)} when loaded and was refused; "
                            f"only load checkpoints written by train.py") from None
        raise UserError(f"{path} is truncated or corrupt (not a PyTorch checkpoint); use another "
                        f"checkpoint (best.pt or last.pt) or train again") from None
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}); use another checkpoint "
                        f"(best.pt or last.pt) or train again") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a train.py checkpoint (no model state)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", path="checkpoint"):
    """A ResNet18 with the checkpoint's weights; another architecture or class count is refused."""
    classes = list(ckpt.get("classes") or data.CLASSES)
    if ckpt.get("arch", "ResNet18") != "ResNet18":
        raise UserError(f"{path} holds a {ckpt.get('arch')}, not a ResNet18")
    model = ResNet18(num_classes=len(classes))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path} does not fit a CIFAR ResNet18 with {len(classes)} classes ({first[:160]})") from None
    return model.to(device, memory_format=torch.channels_last), classes


# ---------------------------------------------------------------------------------------------
# Distributed


def distributed_env():
    """(rank, local_rank, world_size) from torchrun's environment, (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


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


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(model, images, labels, batch_size, dtype=None, num_classes=10, rank=0, world_size=1):
    """Test loss (plain cross-entropy), accuracy and per-class accuracy; each process takes a
    disjoint part of every batch and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(num_classes, device=device)
    count = torch.zeros(num_classes, device=device)
    for idx in data.batch_indices(len(images), batch_size, rank=rank, world_size=world_size, device=device):
        x = data.normalize(images[idx]).contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct.index_add_(0, y, (logits.argmax(1) == y).float())  # no boolean mask: no host sync
        count.index_add_(0, y, torch.ones_like(y, dtype=count.dtype))
    totals = all_reduce(torch.cat([loss_sum.view(1), correct, count]), world_size).cpu()
    model.train(was_training)
    loss_sum, correct, count = totals[0].item(), totals[1:1 + num_classes], totals[1 + num_classes:]
    n = int(count.sum())
    return {"loss": loss_sum / max(n, 1), "correct": int(correct.sum()), "total": n,
            "accuracy": 100.0 * float(correct.sum()) / max(n, 1),
            "per_class": (100.0 * correct / count.clamp(min=1)).tolist()}


class Progress:
    """One live line per epoch: '\\r'-updated on a terminal, a few plain lines in a log file."""

    def __init__(self, epoch, epochs, steps, enabled=True):
        self.prefix, self.steps, self.enabled = f"Epoch {epoch}/{epochs}", steps, enabled
        self.tty = sys.stdout.isatty()
        self.every = max(1, steps // 10) if not self.tty else max(1, steps // 50)

    def due(self, step):
        return self.enabled and ((step + 1) % self.every == 0 or step + 1 == self.steps)

    def show(self, step, loss, lr, acc, rate):
        line = (f"{self.prefix}  step {step + 1}/{self.steps}  loss {loss:.4f}  lr {lr:.5f}  "
                f"acc {acc:.2f}%  {rate:,.0f} img/s")
        if self.tty:
            print("\r" + line, end="\n" if step + 1 == self.steps else "", flush=True)
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


def plot_curves(history, path, label_smoothing=0.0):
    """Loss and accuracy per epoch, train vs test, like the spec's 'Accuracy and Loss Plots'.
    The train loss is against smoothed targets when label smoothing is on, so the legend says so."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    train_label = f"train (targets smoothed by {label_smoothing:g})" if label_smoothing else "train"
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label=train_label)
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (log scale)", yscale="log")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [h["test_acc"] for h in history], "o-", label="test")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return fig


def resume_command(args):
    """The command that continues this run: the checkpoint keeps the recipe, not where the data lives."""
    parser = build_parser()
    command = ["python", "train.py", "--resume", os.path.join(args.out, "last.pt")]
    for flag, key in (("--data-dir", "data_dir"), ("--device", "device")):
        if getattr(args, key) != parser.get_default(key):
            command += [flag, str(getattr(args, key))]
    return shlex.join(command)


def _restored_args(args):
    """On --resume, the saved run's recipe wins; only where and how to run come from the CLI."""
    ckpt = load_checkpoint(args.resume)
    saved = dict(ckpt.get("args") or {})
    if not saved:
        raise UserError(f"{args.resume} holds no training arguments, so it cannot be resumed")
    for key in ("device", "data_dir", "download", "tensorboard", "resume", "overwrite", "eval_batch_size"):
        saved[key] = getattr(args, key)
    saved.setdefault("cutout_p", 1.0)  # runs saved before --cutout-p existed cut every image
    saved["out"] = os.path.dirname(os.path.abspath(args.resume))
    merged = argparse.Namespace(**{**vars(args), **saved})
    return merged, ckpt


def run(args):
    """Train with parsed arguments; returns the history (a list of per-epoch dicts)."""
    rank, local_rank, world = distributed_env()
    ckpt = None
    if args.resume:
        args, ckpt = _restored_args(args)
    validate(args, world)
    device = resolve_device(args.device)
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn works only with CUDA GPUs (PyTorch's SyncBatchNorm); drop it on CPU")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, ckpt, device, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, ckpt, device, rank, world):
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)
    if args.out is None:
        args.out = broadcast_value(os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")), world)
    if main_process:
        check_writable(args.out)
    tb = None
    if args.tensorboard and main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        tb = SummaryWriter(args.tensorboard)

    if world > 1 and not main_process:
        dist.barrier()  # the others read the data only once rank 0 has downloaded it
    train_x, train_y, classes = data.load_cifar10(args.data_dir, "train", download=args.download and main_process)
    if world > 1 and main_process:
        dist.barrier()
    test_x, test_y, _ = data.load_cifar10(args.data_dir, "test")
    train_x, train_y = train_x[:args.limit_train].to(device), train_y[:args.limit_train].to(device)
    test_x, test_y = test_x[:args.limit_test].to(device), test_y[:args.limit_test].to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(device, args.amp)
    local_batch = args.batch_size // world
    steps = len(train_x) // args.batch_size

    torch.manual_seed(args.seed)
    net = ResNet18(num_classes=len(classes)).to(device, memory_format=torch.channels_last)
    if args.sync_bn and world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    lr_range = None
    if ckpt is not None:
        max_lr = ckpt["max_lr"]
        lr_range = ckpt.get("lr_range")
    elif args.max_lr == "auto":
        log(f"LR range test ({args.optimizer}, {args.lr_range_steps} steps) to pick the OneCycle peak ...",
            flush=True)
        batches, augment = lr_range_inputs(train_x, train_y, local_batch, args.seed + rank, not args.no_flip,
                                           args.cutout_p)
        result = lr_range_test(net, make_optimizer(net, args.optimizer, 1e-7, args.wd), criterion, batches,
                               num_iter=max(2, args.lr_range_steps), amp_dtype=dtype, transform=augment)
        max_lr = broadcast_value(result.suggested_lr, world)
        lr_range = result.to_dict()
        if main_process:
            plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
        log(f"LR range test suggests max LR {max_lr:.4g} (minimum loss at {result.min_loss_lr:.4g})")
    else:
        max_lr = args.max_lr

    optimizer = make_optimizer(net, args.optimizer, max_lr, args.wd)
    total_steps = args.epochs * steps
    if total_steps < 3:
        raise UserError(f"only {total_steps} training steps: OneCycle needs at least 3; "
                        f"raise --epochs or --limit-train, or lower --batch-size")
    # OneCycle's warm-up must end at step 1 or later and leave a step to anneal; this moves
    # pct_start only for runs of a few steps, such as `--epochs 1 --limit-train 2000`.
    pct_start = min(max(args.pct_start, 2 / total_steps), 1 - 1 / total_steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total_steps, pct_start=pct_start)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    aug_generator = device_generator(device, args.seed * 1000 + rank)
    history, best_acc, start_epoch, start_step, partial = [], -1.0, 0, 0, None
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["aug_generator"]) != world:
            raise UserError(f"{args.resume} was saved by {len(ckpt['aug_generator'])} process(es); resume it "
                            f"with the same number (torchrun --nproc_per_node)")
        aug_generator.set_state(ckpt["aug_generator"][rank])
        history, best_acc = ckpt["history"], ckpt["best_acc"]
        start_epoch, start_step, partial = ckpt["epoch"], ckpt["step"], ckpt.get("partial")
        log(f"Resuming {args.out} at epoch {start_epoch + 1}, step {start_step}")

    model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else net
    train_forward = torch.compile(model) if args.compile else model
    eval_forward = torch.compile(net) if args.compile else net

    log(f"ResNet18 on {device} ({precision_name(dtype)}, channels_last{', compiled' if args.compile else ''}"
        f"{f', {world} processes' if world > 1 else ''}); {len(train_x):,} train / {len(test_x):,} test images; "
        f"{args.optimizer} OneCycle max LR {max_lr:.4g}, batch {args.batch_size}, {args.epochs} epochs")

    def checkpoint(epoch, step, partial_sums=None):
        states = [aug_generator.get_state().cpu()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, aug_generator.get_state().cpu())
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "aug_generator": states, "epoch": epoch, "step": step, "partial": partial_sums,
                "history": history, "best_acc": best_acc, "max_lr": max_lr, "lr_range": lr_range,
                "arch": "ResNet18", "classes": list(classes), "mean": list(data.MEAN), "std": list(data.STD),
                "args": vars(args)}

    def write_metrics(per_class=None):
        best = max(history, key=lambda h: h["test_acc"]) if history else None
        save_json(os.path.join(args.out, "metrics.json"), {
            "dataset": "CIFAR-10", "device": str(device),
            "device_name": device_name(device),
            "precision": precision_name(dtype), "world_size": world, "torch": torch.__version__,
            "max_lr": max_lr, "lr_range": lr_range, "args": vars(args),
            "epochs": history, "best_epoch": best and best["epoch"], "best_test_acc": best and best["test_acc"],
            "final_test_acc": history[-1]["test_acc"] if history else None,
            "train_seconds": sum(h["train_seconds"] for h in history),
            "per_class_test_acc": per_class,
        })

    if main_process and ckpt is not None:
        write_metrics()  # a kill between last.pt and metrics.json must not leave them out of step
    with SigintFlag() as interrupt:
        for epoch in range(start_epoch, args.epochs):
            net.train()
            progress = Progress(epoch + 1, args.epochs, steps, main_process)
            order_generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
            # partial: sums, images and training seconds of the interrupted epoch so far (checkpoints
            # saved before the seconds were kept have three entries; their time before the stop is lost)
            loss_sum, correct, seen, elapsed = (list(partial) + [0.0])[:4] if partial else (0.0, 0.0, 0, 0.0)
            sums = torch.tensor([loss_sum, correct], device=device)
            finite = []
            first_step, partial = start_step, None
            start_step = 0
            resumed_at = time.perf_counter()
            started = resumed_at - elapsed
            for step, idx in enumerate(data.batch_indices(len(train_x), args.batch_size, True, order_generator, True,
                                                          rank, world, start=first_step, device=device),
                                       start=first_step):
                x = data.train_transform(train_x[idx], aug_generator, not args.no_flip, args.cutout_p)
                x = x.contiguous(memory_format=torch.channels_last)
                y = train_y[idx]
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = train_forward(x)
                    loss = criterion(logits, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                loss = loss.detach().float()
                sums += torch.stack([loss * len(y), (logits.argmax(1) == y).sum().float()])
                seen += len(y)
                finite.append(torch.isfinite(loss))
                if progress.due(step) or interrupt.set or device.type == "cpu":
                    flags = torch.stack(finite)
                    if not bool(flags.all()):
                        bad = step - len(finite) + 1 + int((~flags).nonzero()[0])
                        raise NonFiniteLoss(
                            f"the training loss became non-finite at epoch {epoch + 1}, step {bad + 1}; the last "
                            f"good checkpoint is kept in {args.out}. Try a lower --max-lr (this run used {max_lr:.4g}).")
                    finite.clear()
                if progress.due(step):
                    loss_sum, correct = sums.tolist()
                    rate = (step + 1 - first_step) * args.batch_size / (time.perf_counter() - resumed_at)
                    progress.show(step, loss_sum / seen, lr, 100 * correct / seen, rate)
                if interrupt.set and world == 1 and step + 1 < steps:
                    partial = sums.tolist() + [seen, time.perf_counter() - started]
                    save_atomic(os.path.join(args.out, "last.pt"),
                                lambda f: torch.save(checkpoint(epoch, step + 1, partial), f))
                    print(f"\nInterrupted at epoch {epoch + 1}, step {step + 1}/{steps}; saved "
                          f"{os.path.join(args.out, 'last.pt')}.\nResume with: {resume_command(args)}", flush=True)
                    raise KeyboardInterrupt
            train_seconds = time.perf_counter() - started
            if world > 1:  # DDP syncs BN statistics only at the next forward: test what rank 0 saves
                for buffer in net.buffers():
                    dist.broadcast(buffer, 0)
            loss_sum, correct, seen = all_reduce(torch.cat([sums, sums.new_tensor([seen])]), world).tolist()
            result = evaluate(eval_forward, test_x, test_y, args.eval_batch_size, dtype, len(classes), rank, world)
            log(f"Test set: Average loss: {result['loss']:.4f}, Accuracy: {result['correct']}/{result['total']} "
                f"({result['accuracy']:.2f}%)\n", flush=True)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                            "test_loss": result["loss"], "test_acc": result["accuracy"],
                            "lr": lr, "train_seconds": train_seconds,
                            "seconds": time.perf_counter() - started, "train_images": int(seen),
                            "train_images_per_s": seen / train_seconds})
            improved = result["accuracy"] > best_acc
            best_acc = max(best_acc, result["accuracy"])
            state = checkpoint(epoch + 1, 0)
            if main_process:
                if improved:
                    save_atomic(os.path.join(args.out, "best.pt"), lambda f: torch.save(state, f))
                save_atomic(os.path.join(args.out, "last.pt"), lambda f: torch.save(state, f))
                last = epoch + 1 == args.epochs
                write_metrics(dict(zip(classes, result["per_class"])) if last else None)
                if tb is not None:
                    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                        tb.add_scalar(key, history[-1][key], epoch + 1)
                if last:
                    log("Per-class test accuracy: " + ", ".join(f"{c} {a:.1f}%" for c, a in zip(classes, result["per_class"])))
            if interrupt.set and world == 1:
                print(f"Interrupted after epoch {epoch + 1}; saved {os.path.join(args.out, 'last.pt')}.\n"
                      f"Resume with: {resume_command(args)}", flush=True)
                raise KeyboardInterrupt
    if main_process:
        plot_curves(history, os.path.join(args.out, "curves.png"), args.label_smoothing)
        if tb is not None:
            tb.close()
        best = max(history, key=lambda h: h["test_acc"])
        log(f"Best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']}; "
            f"{sum(h['train_seconds'] for h in history):.1f} s of training. Outputs in {args.out}")
    if world > 1:
        dist.barrier()  # the others wait while rank 0 writes, then all leave the group together
    return history


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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_device(args.device, parser)
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


if __name__ == "__main__":
    main()
