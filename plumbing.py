"""What a training run needs besides its recipe (train.py): the run's context under torchrun, the state
that last.pt keeps and resuming from it, stopping, progress, the warm-up, metrics.json, curves.png.

Stopping: the first Ctrl-C or SIGTERM (what schedulers and torchrun send) lets the current step
finish; the run saves last.pt, mid-epoch if need be, prints how to resume and exits with 128 + the
signal's number. A second signal stops at once. Under torchrun the processes agree on stopping every
STOP_CHECK_EVERY steps and after each epoch, so all stop at one point, and rank 0 saves.
"""
import argparse
import copy
import itertools
import math
import os
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
from common import UserError
from resnet import ResNet18

STOP_CHECK_EVERY = 10  # steps between the processes' agreements on stopping, under torchrun
PROGRESS_SECONDS = 0.25  # the least time between progress lines: each one waits for the GPU
SCORES = ("", "_tta", "_tta6", "_ema", "_tta_ema", "_tta6_ema")  # test accuracies: views, then the weights' average's


class NonFiniteLoss(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# The run's context: arguments, device, processes, signals, log


def ranks():
    """(this process's rank, the number of processes) from torchrun's environment; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class Run:
    """What every part of a run needs: its arguments, the device and precision (after start()), this
    process's rank among torchrun's `world` processes, a log that only rank 0 prints, the stop
    signals and TensorBoard (inside `with run:`)."""

    def __init__(self, args):
        self.args, self.started = args, time.perf_counter()
        self.rank, self.world = ranks()
        self.device, self.dtype, self.signum, self.tensorboard, self.handlers = None, None, None, None, {}

    def start(self):
        """Take the device (this process's GPU under torchrun) and join torchrun's process group."""
        device = common.resolve_device(self.args.device)
        if self.args.sync_bn and self.world > 1 and device.type != "cuda":
            raise UserError("--sync-bn works only with CUDA GPUs (PyTorch's SyncBatchNorm); drop it on CPU")
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.device, self.dtype = device, common.amp_dtype(device, self.args.amp)
        return self

    def log(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.world > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    def broadcast(self, value):
        """rank 0's value, in every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def __enter__(self):
        """TensorBoard (rank 0, with --tensorboard), then the signal handlers: the first SIGINT or
        SIGTERM only records itself; a second one stops at once."""
        self.tensorboard = tensorboard_writer(self.args.tensorboard) if self.rank == 0 else None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.signum = self.signum or signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def stop_agreed(self, collective=True):
        """Whether a signal asks to stop. Under torchrun the processes share what they got, in a
        collective call that every process makes at the same points: where collective is true."""
        if self.world == 1 or not collective:
            return self.world == 1 and self.signum is not None
        flag = self.all_reduce(torch.tensor([self.signum or 0], device=self.device), dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag) or None
        return self.signum is not None

    def __exit__(self, *exc):
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        if self.tensorboard is not None:
            self.tensorboard.close()


def tensorboard_writer(folder):
    """A SummaryWriter for --tensorboard's folder; None without one."""
    if not folder:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(folder)


# ---------------------------------------------------------------------------------------------
# Setting up: arguments, data, model


def validate(args, world_size=1):
    """Checks that argparse cannot express; raises UserError with one sentence."""
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


def load_data(run):
    """Train and test images and labels on the device, cut to --limit-*; rank 0 downloads while the
    others wait."""
    args = run.args
    if run.rank != 0:
        dist.barrier()
    train_x, train_y, classes = data.load_cifar10(args.data_dir, "train", download=args.download and run.rank == 0)
    if run.world > 1 and run.rank == 0:
        dist.barrier()
    test_x, test_y, _ = data.load_cifar10(args.data_dir, "test")
    cut = [t[:args.limit_train] for t in (train_x, train_y)] + [t[:args.limit_test] for t in (test_x, test_y)]
    return [t.to(run.device) for t in cut] + [classes]


def build_model(run, num_classes):
    """ResNet18 on the device, channels_last, from the init stream, with --bn-momentum; SyncBatchNorm
    with --sync-bn."""
    torch.manual_seed(run.args.seed)  # the init stream
    net = ResNet18(num_classes=num_classes, zero_init_residual=run.args.zero_init_residual)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = run.args.bn_momentum
    net = net.to(run.device, memory_format=torch.channels_last)
    return nn.SyncBatchNorm.convert_sync_batchnorm(net) if run.args.sync_bn and run.world > 1 else net


def forwards(run, net):
    """What trains (DDP-wrapped under torchrun) and what tests (rank 0's own weights), compiled
    with --compile."""
    model = net
    if run.world > 1:
        devices = [run.device.index] if run.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=devices)
    if not run.args.compile:
        return model, net
    return torch.compile(model, mode=run.args.compile_mode), torch.compile(net, mode=run.args.compile_mode)


# ---------------------------------------------------------------------------------------------
# The state last.pt keeps, resuming from it, and stopping


def run_files(folder):
    """The folder's files, less the temp files a killed save leaves behind."""
    return [name for name in os.listdir(folder) if not common.TEMP_FILE.match(name)] if os.path.isdir(folder) else []


def restored_args(args, world=1):
    """On --resume, the saved run's recipe wins; only where and how to run come from the CLI.
    Resuming an earlier checkpoint than the folder's last.pt (best.pt, say) would rewind the run
    and overwrite last.pt, so it needs --overwrite."""
    ckpt = common.load_checkpoint(args.resume)
    saved = dict(ckpt.get("args") or {})
    if not saved or "epoch" not in ckpt:  # weights alone: ema.pt, app.py --export's file, another project's
        raise UserError(f"{args.resume} holds a model's weights but not a run's state, so it cannot be resumed; "
                        f"resume the run's last.pt")
    for key in ("device", "data_dir", "download", "tensorboard", "resume", "overwrite", "eval_batch_size"):
        saved[key] = getattr(args, key)
    saved["out"] = os.path.dirname(os.path.abspath(args.resume))
    restored = argparse.Namespace(**{**vars(args), **saved})
    if ckpt["epoch"] >= restored.epochs:
        return restored, ckpt  # a finished run: nothing to check, train.start() says so
    if len(ckpt["aug_generator"]) != world:
        raise UserError(f"{args.resume} was saved by {len(ckpt['aug_generator'])} process(es); resume it "
                        f"with the same number (torchrun --nproc_per_node)")
    last = os.path.join(saved["out"], "last.pt")
    if os.path.abspath(args.resume) != last and os.path.isfile(last) and not args.overwrite:
        later = common.load_checkpoint(last)
        if (later["epoch"], later["step"]) > (ckpt["epoch"], ckpt["step"]):
            raise UserError(f"{args.resume} is epoch {ckpt['epoch']} of a run whose last.pt has reached epoch "
                            f"{later['epoch']}; resume {last} instead, or pass --overwrite to rewind the run "
                            f"to epoch {ckpt['epoch']} (last.pt and metrics.json are overwritten)")
    return restored, ckpt


def resume_command(run):
    """The command that continues this run: the checkpoint keeps the recipe, not where the data lives."""
    args = run.args
    launcher = ["torchrun", f"--nproc_per_node={run.world}"] if run.world > 1 else ["python"]
    command = launcher + ["train.py", "--resume", os.path.join(args.out, "last.pt")]
    for flag, value, default in (("--data-dir", args.data_dir, "./data"), ("--device", args.device, "auto")):
        command += [flag, str(value)] if value != default else []
    return shlex.join(command)


def megabytes(checkpoint):
    """The size of a checkpoint's tensors (its nested dicts and lists), in MB."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size() / 1e6
    parts = checkpoint.values() if isinstance(checkpoint, dict) else checkpoint if isinstance(checkpoint, list) else ()
    return sum(megabytes(part) for part in parts)


class TrainState:
    """Everything a run needs to continue exactly: weights (and their moving average with --ema),
    optimizer, OneCycle schedule, scaler, each process's augmentation generator, where the run
    stands, and its history. checkpoint() writes it down; restore() reads it back."""

    def __init__(self, run, net, optimizer, scheduler, scaler, max_lr, lr_range=None, classes=data.CLASSES):
        self.run, self.net, self.optimizer, self.scheduler, self.scaler = run, net, optimizer, scheduler, scaler
        self.max_lr, self.lr_range, self.classes = max_lr, lr_range, list(classes)
        self.steps = scheduler.total_steps // run.args.epochs  # per epoch
        self.ema = None  # with --ema, the weights' average (train.WeightAverage)
        self.aug_generator = data.device_generator(run.device, run.args.seed * 1000 + run.rank)
        self.epoch, self.step = 0, 0  # the next step to take
        self.partial = None  # an epoch stopped midway: [loss sum, correct, images] of all processes, seconds
        self.history, self.best_acc = [], -1.0
        self.saved_epoch = None  # the epoch in the last last.pt this run wrote or resumed from
        self.warmup_seconds = 0.0

    def checkpoint(self):
        """The state as a dict; a collective call under torchrun (it gathers every process's generator)."""
        states = [self.aug_generator.get_state().cpu()]
        if self.run.world > 1:
            states = [None] * self.run.world
            dist.all_gather_object(states, self.aug_generator.get_state().cpu())
        return {**self.weights(self.net), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "aug_generator": states,
                "epoch": self.epoch, "step": self.step, "partial": self.partial,
                "history": self.history, "best_acc": self.best_acc, "max_lr": self.max_lr,
                "lr_range": self.lr_range}

    def weights(self, model):
        """What gradcam.py and app.py load of a checkpoint: a model's weights, the class names, the
        normalization and the run's arguments."""
        return {"model": model.state_dict(), "arch": "ResNet18", "classes": self.classes, "mean": list(data.MEAN),
                "std": list(data.STD), "args": vars(self.run.args)}

    def restore(self, ckpt):
        """Continue from a checkpoint (None: a new run), and say where."""
        if ckpt is None:
            return
        for part in ("net", "optimizer", "scheduler", "scaler", "ema"):
            if getattr(self, part) is not None:
                getattr(self, part).load_state_dict(ckpt["model" if part == "net" else part])
        self.aug_generator.set_state(ckpt["aug_generator"][self.run.rank])
        self.epoch, self.step, self.saved_epoch = ckpt["epoch"], ckpt["step"], ckpt["epoch"]
        self.history, self.best_acc = ckpt["history"], ckpt["best_acc"]
        self.partial = ckpt["partial"]
        self.run.log(f"Resuming {self.run.args.out} at epoch {self.epoch + 1}, step {self.step}")
        if self.run.rank == 0:
            write_metrics(self)  # a kill between last.pt and metrics.json must not part them

    def save(self, names, checkpoint):
        """Write one checkpoint to each of names in the run folder, atomically. A full disk stops
        the run in one sentence; the files saved before stay whole."""
        try:
            for name in names:
                common.save_atomic(os.path.join(self.run.args.out, name), lambda f: torch.save(checkpoint, f))
        except common.DiskFull as e:
            kept = (f"last.pt of epoch {self.saved_epoch} is intact: resume with {resume_command(self.run)}"
                    if self.saved_epoch is not None else "no checkpoint was kept")
            raise common.DiskFull(f"{e}: a checkpoint needs about {megabytes(checkpoint):.0f} MB, and room for one "
                                  f"more while it is written; {kept}") from None
        if "last.pt" in names:
            self.saved_epoch = self.epoch

    def share_statistics(self):
        """Under torchrun each process's BatchNorm statistics are its own: rank 0's go to every process
        (the weights' average's too), so all test one model and rank 0 saves what was tested."""
        if self.run.world > 1:
            averaged = () if self.ema is None else self.ema.module.buffers()
            for buffer in itertools.chain(self.net.buffers(), averaged):
                dist.broadcast(buffer, 0)

    def kept(self):
        """What the run folder holds that this run wrote or resumed from, in words."""
        if self.saved_epoch is None:
            return f"no checkpoint of this run was saved in {self.run.args.out}"
        last = os.path.join(self.run.args.out, "last.pt")
        return f"the last good checkpoint, epoch {self.saved_epoch}, is kept in {last}"

    def stop(self, where, stats=None):
        """Stop on a signal, every process at once. Mid-epoch (stats given), where the epoch stands
        and its sums so far go into a new last.pt; after an epoch, its last.pt is already saved.
        Rank 0 says how to go on; every process raises common.Stopped."""
        if stats is not None:
            self.step, self.partial = stats["next_step"], stats["totals"] + [stats["seconds"]]
            checkpoint = self.checkpoint()  # every process joins its gather
            if self.run.rank == 0:
                self.save(["last.pt"], checkpoint)
        signum = self.run.signum
        if self.run.rank == 0:
            name = "Interrupted" if signum == signal.SIGINT else f"Stopped by {signal.Signals(signum).name}"
            print(f"\n{name} {where}; saved {os.path.join(self.run.args.out, 'last.pt')}.\n"
                  f"Resume with: {resume_command(self.run)}", flush=True)
        if self.run.world > 1:
            dist.barrier()
        raise common.Stopped(signum)


# ---------------------------------------------------------------------------------------------
# During an epoch


def header(state, n_train, n_test):
    """The run's first line: where it runs, in which precision, on what, with which schedule."""
    run, args = state.run, state.run.args
    return (f"ResNet18 on {run.device} ({common.precision_name(run.dtype)}, channels_last"
            f"{', compiled' * args.compile}{f', {run.world} processes' if run.world > 1 else ''}); {n_train:,} train "
            f"/ {n_test:,} test images; {args.optimizer} OneCycle max LR {state.max_lr:.4g}, batch {args.batch_size}, "
            f"{args.epochs} epoch{'s' * (args.epochs != 1)}")


class StepWatch:
    """Called after every training step: shows progress, checks the loss stays finite (a host sync,
    so only at progress lines on a GPU), and says whether to stop (a signal came). Progress is one
    line per epoch: '\\r'-updated on a terminal, updated in place in a notebook (a saved notebook
    keeps one line per epoch), a few plain lines in a log file; at most PROGRESS_SECONDS apart, so a
    GPU's steps of a few milliseconds never wait for it."""

    def __init__(self, state):
        self.state, self.run = state, state.run
        self.first, self.started, self.finite, self.handle = state.step, time.perf_counter(), [], None
        self.lr = state.scheduler.get_last_lr()[0]  # the LR the next step uses
        self.last_lr, self.next_step = self.lr, state.steps
        self.tty = sys.stdout.isatty()
        self.notebook = not self.tty and "ipykernel" in sys.modules
        self.every = max(1, state.steps // (50 if self.tty or self.notebook else 10))
        self.shown_step, self.shown_at = state.step, self.started

    def __call__(self, i, loss, sums, seen):
        step, self.last_lr, self.lr = self.first + i, self.lr, self.state.scheduler.get_last_lr()[0]
        self.finite.append(torch.isfinite(loss))
        now = time.perf_counter()
        due = self.run.rank == 0 and (step + 1 == self.state.steps or (
            step + 1 - self.shown_step >= self.every and now - self.shown_at >= PROGRESS_SECONDS))
        stopping = self.run.stop_agreed(collective=(step + 1) % STOP_CHECK_EVERY == 0)
        if due or stopping or self.run.device.type == "cpu":
            self.check_finite(step)
        if due:
            loss_sum, correct = sums.tolist()
            self.shown_step, self.shown_at = step + 1, time.perf_counter()
            rate = seen * self.run.world / (self.shown_at - self.started)
            self.show(step, loss_sum / seen, 100 * correct / seen, rate)
        if stopping and step + 1 < self.state.steps:
            self.next_step = step + 1
        return self.stopped

    @property
    def stopped(self):
        """Whether a signal stopped the epoch before its last step."""
        return self.next_step < self.state.steps

    def check_finite(self, step):
        """Raise NonFiniteLoss naming the first non-finite step among those since the last check."""
        flags = torch.stack(self.finite)
        self.finite.clear()
        if not bool(flags.all()):
            bad = step - len(flags) + 1 + int((~flags).nonzero()[0])
            raise NonFiniteLoss(f"the training loss became non-finite at epoch {self.state.epoch + 1}, step "
                                f"{bad + 1}; {self.state.kept()}. Try a lower --max-lr (this run used "
                                f"{self.state.max_lr:.4g}).")

    def show(self, step, loss, acc, rate):
        line = (f"Epoch {self.state.epoch + 1}/{self.run.args.epochs}  step {step + 1}/{self.state.steps}  "
                f"loss {loss:.4f}  lr {self.last_lr:.5f}  acc {acc:.2f}%  {rate:,.0f} img/s")
        if self.tty:
            print("\r" + line, end="\n" if step + 1 == self.state.steps else "", flush=True)
        elif not self.notebook:
            print(line, flush=True)
        elif self.handle is None:
            from IPython.display import display
            self.handle = display({"text/plain": line}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": line}, raw=True)

    def summary(self, sums, seen):
        """The epoch so far: [summed loss, correct, images] of all processes (a collective call) and
        seconds, each with the part before a resume."""
        before = self.state.partial or [0.0, 0.0, 0, 0.0]
        totals = self.run.all_reduce(torch.cat([sums, sums.new_tensor([seen])])).tolist()
        return {"totals": [now + earlier for now, earlier in zip(totals, before)], "lr": self.last_lr,
                "seconds": before[3] + time.perf_counter() - self.started, "started": self.started - before[3],
                "next_step": self.next_step}


def warm_up(state, train_steps, test):
    """train_steps() and test() run the run's own step and test pass on its exact shapes, then every
    state is put back: cuDNN's autotuning (and torch.compile) happen before the clock starts."""
    start = time.perf_counter()
    parts = [state.net, state.optimizer, state.scheduler, state.scaler]
    saved = copy.deepcopy([part.state_dict() for part in parts])
    train_steps()
    test()
    for part, part_state in zip(parts, saved):
        part.load_state_dict(part_state)
    state.optimizer.zero_grad(set_to_none=True)
    if state.run.device.type == "cuda":
        torch.cuda.synchronize(state.run.device)
    state.warmup_seconds = time.perf_counter() - start
    cuda, compiled = state.run.device.type == "cuda", state.run.args.compile
    what = ", ".join(["cuDNN autotuning"] * cuda + ["compilation"] * compiled)
    state.run.log(f"Warm-up ({what}): {state.warmup_seconds:.1f} s, not counted as training")


# ---------------------------------------------------------------------------------------------
# After an epoch: the record, the checkpoints, metrics.json, curves.png


def test_line(result):
    line = (f"Test set: Average loss: {result['loss']:.4f}, Accuracy: {result['correct']}/{result['total']} "
            f"({result['accuracy']:.2f}%)")
    if "accuracy_tta" in result:
        line += f"; with flip TTA: {result['correct_tta']}/{result['total']} ({result['accuracy_tta']:.2f}%)"
    if "accuracy_tta6" in result:
        line += f"; six views: {result['correct_tta6']}/{result['total']} ({result['accuracy_tta6']:.2f}%)"
    if "accuracy_ema" in result:
        line += f"; weights' average: {result['accuracy_ema']:.2f}%"
    return line + "\n"


def end_epoch(state, stats, result):
    """Print the test result, record the epoch in the history, then save best.pt, last.pt,
    metrics.json (rank 0). A non-finite test loss is a diverged run too: it stops before any save."""
    if not math.isfinite(result["loss"]):
        raise NonFiniteLoss(f"the test loss became non-finite after epoch {state.epoch + 1}; {state.kept()}. "
                            f"Try a lower --max-lr (this run used {state.max_lr:.4g}).")
    state.run.log(test_line(result), flush=True)
    loss_sum, correct, seen = stats["totals"]
    state.history.append({"epoch": state.epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                          "test_loss": result["loss"], **{f"test_acc{s}": result.get(f"accuracy{s}") for s in SCORES},
                          "lr": stats["lr"],
                          "train_seconds": stats["seconds"], "seconds": time.perf_counter() - stats["started"],
                          "train_images": int(seen), "train_images_per_s": seen / stats["seconds"]})
    improved = result["accuracy"] > state.best_acc
    state.best_acc = max(state.best_acc, result["accuracy"])
    state.epoch, state.step, state.partial = state.epoch + 1, 0, None
    checkpoint = state.checkpoint()  # every process joins the gather of the generators
    if state.run.rank != 0:
        return
    state.save(["best.pt"] * improved + ["last.pt"], checkpoint)
    last = state.epoch == state.run.args.epochs
    write_metrics(state, result if last else None)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr") if state.run.tensorboard else ():
        state.run.tensorboard.add_scalar(key, state.history[-1][key], state.epoch)
    if last:
        print("Per-class test accuracy: " + ", ".join(f"{c} {a:.1f}%" if a is not None else f"{c} (no test images)"
                                                      for c, a in zip(state.classes, result["per_class"])))


def write_metrics(state, last_result=None):
    """metrics.json: the run's settings and every epoch; test_acc is a single view of each test
    image, test_acc_tta the mean of its and its mirror's logits (None with --no-tta), test_acc_tta6
    that of six views (None without --tta6); *_ema those of the weights' moving average (--ema)."""
    run, history, last = state.run, state.history, state.history[-1] if state.history else {}
    best = max(history, key=lambda h: h["test_acc"]) if history else {}
    per_class = {key: dict(zip(state.classes, (last_result or {})[key])) if key in (last_result or {}) else None
                 for key in ("per_class", "per_class_tta")}
    common.save_json(os.path.join(run.args.out, "metrics.json"), {
        "dataset": "CIFAR-10", "device": str(run.device), "device_name": common.device_name(run.device),
        "precision": common.precision_name(run.dtype), "world_size": run.world, "torch": torch.__version__,
        "max_lr": state.max_lr, "lr_range": state.lr_range, "args": vars(run.args), "epochs": history,
        "best_epoch": best.get("epoch"), "best_test_acc": best.get("test_acc"),
        **{f"final_test_acc{s}": last.get(f"test_acc{s}") for s in SCORES},
        "train_seconds": sum(h["train_seconds"] for h in history),
        "warmup_seconds": state.warmup_seconds, "wall_seconds": time.perf_counter() - run.started,
        "per_class_test_acc": per_class["per_class"], "per_class_test_acc_tta": per_class["per_class_tta"],
    })


def finish(state):
    """curves.png, ema.pt when the weights' average scored better than the weights at the end, and
    the run's last line (rank 0)."""
    history, out = state.history, state.run.args.out
    plot_curves(history, os.path.join(out, "curves.png"), state.run.args.label_smoothing)
    last = history[-1]
    if last.get("test_acc_ema") is not None and last["test_acc_ema"] > last["test_acc"]:
        state.save(["ema.pt"], state.weights(state.ema.module))
        print(f"The weights' average scored {last['test_acc_ema']:.2f}% against {last['test_acc']:.2f}%: "
              f"{os.path.join(out, 'ema.pt')} holds it (gradcam.py --ckpt takes it)")
    best, final = max(history, key=lambda h: h["test_acc"]), last.get("test_acc_tta")
    print(f"Best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']}"
          f"{f' (final, with flip TTA: {final:.2f}%)' if final is not None else ''}; "
          f"{sum(h['train_seconds'] for h in history):.1f} s of training. Outputs in {out}")


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
