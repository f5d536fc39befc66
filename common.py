"""What every script does the same way, in five parts: one-sentence errors and argument types; device
and precision; the recipe's optimizer; files (atomic saves, the output folder's lock, SIGTERM); and
checkpoints.

Imports only data.py and resnet.py, so lr_range.py, gradcam.py and bench.py can each be copied with
this file, data.py and resnet.py. Nothing here keeps state between calls.
"""
import argparse
import errno
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import threading

import torch

import data
from resnet import ResNet18


class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""


class Stopped(KeyboardInterrupt):
    """A script stopped by a signal after saving what it could and saying so; it exits with 128 + signum."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def main_guard(work, interrupted="Interrupted: the files written so far are whole; run again for the rest"):
    """Every script's exit policy: run work() and end what a user can meet in one sentence and an exit
    code, never a traceback: UserError or DataError (exit 1), running out of memory (1), Ctrl-C (130,
    after `interrupted`), a Stopped run (128 + its signal). SIGTERM exits with 143 through SystemExit,
    so open saves clean up. Under torchrun only rank 0 speaks. Anything else keeps its traceback."""
    exit_cleanly_on_sigterm()
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        return work()
    except (UserError, data.DataError) as e:
        message = f"error: {e}"
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        message = f"error: {OUT_OF_MEMORY}"
    except KeyboardInterrupt as e:
        if speaks and not isinstance(e, Stopped):
            print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    sys.exit(message if speaks else 1)


def out_of_memory(error):
    """Whether an exception is the device running out of memory: a GPU's OutOfMemoryError, or the
    RuntimeError of the CPU's allocator."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


OUT_OF_MEMORY = "out of memory on the device: run again with a smaller --batch-size"


# ---------------------------------------------------------------------------------------------
# Argument types: argparse turns their ArgumentTypeError into a one-line usage error


def int_at_least(minimum, maximum=None):
    """An argparse type: a whole number of at least minimum, and at most maximum when one is given."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum:,}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


positive_int = int_at_least(1)
SEED_MAX = 2**32 - 1  # numpy's range; train.py's streams (seed * 100_003 + epoch) stay within torch's seeds
seed = int_at_least(0, maximum=SEED_MAX)


def number_in(check, expected):
    """An argparse type: a finite number for which check(value) holds; `expected` says which."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    return parse


positive_float = number_in(lambda v: v > 0, "a positive number")
non_negative_float = number_in(lambda v: v >= 0, "zero or a positive number")
fraction = number_in(lambda v: 0 <= v < 1, "a number in [0, 1)")
probability = number_in(lambda v: 0 <= v <= 1, "a number in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name, parser=None):
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a one-line error
    (parser.error when a parser is given, UserError otherwise)."""
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


def device_name(device):
    """What a person comparing numbers needs to know of the device: the GPU's name, or the CPU's
    model (where Linux says it) and cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    model = cpu_model()
    return f"cpu ({model + ', ' if model else ''}{os.cpu_count()} cores)"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def cpu_supports_bf16():
    """Whether this CPU has bf16 arithmetic units (AVX512-BF16 or AMX). oneDNN also runs bf16 by
    emulation on plain AVX-512, where it is slower than fp32 (the README has the measurement)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def amp_dtype(device, amp=True):
    """The autocast dtype for this device, or None for fp32.

    bf16 only on GPUs with bf16 units (compute capability 8.0, Ampere, and later): on a T4 or V100
    torch.cuda.is_bf16_supported() also counts emulation, which is slow, so those get fp16 (with a
    GradScaler). CPUs get bf16 where they have bf16 units, fp32 elsewhere.
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


# ---------------------------------------------------------------------------------------------
# The recipe's optimizer: here, since train.py and lr_range.py both build it and lr_range.py copies
# without train.py


def make_optimizer(model, name, lr, wd, *, bn_wd=True):
    """SGD with Nesterov momentum, or Adam; OneCycle cycles the momentum (Adam's beta1). With
    bn_wd=False the weight decay spares the one-dimensional parameters, BatchNorm's scales and
    shifts and the classifier's bias, as airbench and hlb-CIFAR10 train."""
    params = list(model.parameters())
    groups = [{"params": params}]
    if not bn_wd:
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.Adam(groups, lr=lr, weight_decay=wd)


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints


class DiskFull(UserError):
    """The disk filled up while a file was written; what was there before is intact."""


def save_atomic(path, write):
    """write(f) into a temp file in the same folder, fsync, then os.replace: a crash at any
    moment leaves either the old file or the new one, never a torn one. A full disk is DiskFull,
    one sentence, with the temp file removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(e):
            raise DiskFull(f"no space left on the disk of {os.path.dirname(path) or '.'} while writing "
                           f"{os.path.basename(path)}; free some space there and run again") from None
        raise


def disk_full(error):
    """ENOSPC, also where torch's zip writer wraps it in a RuntimeError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def finite_or_none(obj):
    """obj with every NaN or infinity replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(value) for value in obj]
    return obj


def save_json(path, obj):
    save_atomic(path, lambda f: f.write(json.dumps(finite_or_none(obj), indent=1, allow_nan=False).encode()))


def check_writable(folder):
    """Make the folder and prove a file can be written there, before any long work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        save_atomic(os.path.join(folder, ".write-test"), lambda f: f.write(b"ok"))
        os.unlink(os.path.join(folder, ".write-test"))
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); choose another --out") from None


TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what save_atomic writes before its rename


class FolderLock:
    """An output folder, locked for as long as a train.py or gradcam.py run writes to it: a second
    run aimed at it is refused at once. The operating system drops the lock when the process dies,
    so a killed run never leaves it locked; the temp files its last save left behind are removed.
    (flock on the folder itself leaves no file; where fcntl is missing, as on Windows, no lock.)"""

    def __init__(self, path, log=print, enabled=True):
        self.path, self.log, self.enabled, self.fd = path, log, enabled, None

    def __enter__(self):
        if not self.enabled:
            return self
        check_writable(self.path)
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"another train.py or gradcam.py is writing to {self.path}; wait for it to finish, "
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


def exit_cleanly_on_sigterm():
    """SIGTERM (a scheduler's or `kill`'s) raises SystemExit(143) instead of killing the process
    on the spot, so open saves remove their temp files on the way out."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def save_png(fig, path, dpi=110):
    """A matplotlib Figure written atomically as a PNG; nothing when path is None (a notebook
    only shows it)."""
    if path is not None:
        save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: a checkpoint that asks to run code is refused."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass a checkpoint file in it, such as {os.path.join(path, 'best.pt')}")
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
        raise UserError(f"{path} is not a train.py checkpoint (no 'model' entry); weights saved as "
                        f"model.state_dict() load when saved as {{'model': model.state_dict()}}")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", path="checkpoint"):
    """(model, classes, mean, std): a ResNet18 with the checkpoint's weights and the class names and
    normalization it was trained with; another architecture or class count is refused."""
    classes = list(ckpt.get("classes") or data.CLASSES)
    if ckpt.get("arch", "ResNet18") != "ResNet18":
        raise UserError(f"{path} holds a {ckpt.get('arch')}, not a ResNet18")
    model = ResNet18(num_classes=len(classes))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        what = "shapes" if "size mismatch" in str(e) else "names"
        raise UserError(f"{path} does not fit a CIFAR ResNet18 with {len(classes)} classes (its parameter "
                        f"{what} differ); use a checkpoint written by train.py") from None
    mean, std = tuple(ckpt.get("mean") or data.MEAN), tuple(ckpt.get("std") or data.STD)
    return model.to(device, memory_format=torch.channels_last), classes, mean, std
