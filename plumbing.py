"""What a training run needs besides its recipe (train.py): processes under torchrun, the state that
last.pt keeps and resuming from it, stopping on Ctrl-C or SIGTERM, the step watch (progress, finite
loss), the warm-up, metrics.json and TensorBoard.

Stopping: the first Ctrl-C or SIGTERM (what schedulers and torchrun send) lets the current step
finish; the run saves last.pt, mid-epoch if need be, prints how to resume and exits with 128 + the
signal's number (130, 143). A second signal stops at once. Under torchrun every process stops at the
same step: they agree every STOP_CHECK_EVERY steps, and rank 0 saves.
"""
import argparse
import copy
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
from lr_range import lr_range_inputs, lr_range_test, plot_lr_range
from resnet import ResNet18

STOP_CHECK_EVERY = 10  # steps between the processes' agreements on stopping, under torchrun


class NonFiniteLoss(UserError):
    pass


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal after saving; main() exits with 128 + signum."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# Processes


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


def all_reduce(tensor, world_size, op=None):
    if world_size > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def broadcast_value(value, world_size):
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


# ---------------------------------------------------------------------------------------------
# Setting up: arguments, data, model, peak LR


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


def load_data(args, device, rank, world):
    """Train and test images and labels on the device, cut to --limit-*; rank 0 downloads."""
    if world > 1 and rank != 0:
        dist.barrier()  # the others read the data only once rank 0 has downloaded it
    train_x, train_y, classes = data.load_cifar10(args.data_dir, "train", download=args.download and rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    test_x, test_y, _ = data.load_cifar10(args.data_dir, "test")
    train_x, train_y = train_x[:args.limit_train].to(device), train_y[:args.limit_train].to(device)
    test_x, test_y = test_x[:args.limit_test].to(device), test_y[:args.limit_test].to(device)
    return train_x, train_y, test_x, test_y, classes


def build_model(args, num_classes, device, world):
    """ResNet18 on the device, channels_last, from the init stream; SyncBatchNorm with --sync-bn."""
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


def pick_max_lr(args, ckpt, net, criterion, train_x, train_y, dtype, rank, world, log, base_lr, base_batch):
    """(peak LR, range-test record or None): the checkpoint's on resume, the range test's with
    'auto', --max-lr as given, or by default base_lr scaled linearly with the batch size (Goyal
    et al. 2017): batch 128 starts from a quarter of batch 512's peak."""
    if ckpt is not None:
        return ckpt["max_lr"], ckpt.get("lr_range")
    if args.max_lr is None:
        max_lr = base_lr * args.batch_size / base_batch
        log(f"Peak LR {max_lr:.4g} = {base_lr:g} x batch {args.batch_size} / {base_batch} (linear scaling; "
            f"--max-lr sets it)")
        return max_lr, None
    if args.max_lr != "auto":
        return args.max_lr, None
    log(f"LR range test ({args.optimizer}, {args.lr_range_steps} steps) to pick the OneCycle peak ...", flush=True)
    batches, augment = lr_range_inputs(train_x, train_y, args.batch_size // world, args.seed + rank,
                                       not args.no_flip, args.cutout_p)
    optimizer = common.make_optimizer(net, args.optimizer, 1e-7, args.wd, args.bn_wd)
    result = lr_range_test(net, optimizer, criterion, batches, num_iter=args.lr_range_steps, amp_dtype=dtype,
                           transform=augment)
    max_lr = broadcast_value(result.suggested_lr, world)
    if rank == 0:
        plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
    log(f"LR range test suggests max LR {max_lr:.4g} (minimum loss at {result.min_loss_lr:.4g})")
    return max_lr, result.to_dict()


# ---------------------------------------------------------------------------------------------
# Stopping on a signal


class StopSignals:
    """The first SIGINT or SIGTERM only records itself; a second one stops at once."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def agreed(self, world, device, check=True):
        """Whether to stop now. Under torchrun the processes share what they got (a collective
        call: every process must make it at the same step, so only where check is true)."""
        if world == 1 or not check:
            return world == 1 and self.signum is not None
        flag = all_reduce(torch.tensor([self.signum or 0], device=device), world, dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag) or None
        return self.signum is not None

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


LOCATION_DEFAULTS = (("--data-dir", "data_dir", "./data"), ("--device", "device", "auto"))  # train.py's


def resume_command(args, world=1):
    """The command that continues this run: the checkpoint keeps the recipe, not where the data lives."""
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    command = launcher + ["train.py", "--resume", os.path.join(args.out, "last.pt")]
    for flag, key, default in LOCATION_DEFAULTS:
        if getattr(args, key) != default:
            command += [flag, str(getattr(args, key))]
    return shlex.join(command)


def stop_now(state, stop, checkpoint, where):
    """Rank 0 writes last.pt (every process has joined the checkpoint's gather), says how to go on;
    every process then raises Stopped."""
    if state.rank == 0:
        state.save(["last.pt"], checkpoint)
        name = "Interrupted" if stop.signum == signal.SIGINT else f"Stopped by {signal.Signals(stop.signum).name}"
        print(f"\n{name} {where}; saved {os.path.join(state.args.out, 'last.pt')}.\n"
              f"Resume with: {resume_command(state.args, state.world)}", flush=True)
    if state.world > 1:
        dist.barrier()
    raise Stopped(stop.signum)


def epoch_totals(stats, world):
    """[summed loss, correct, images] of the epoch so far, all processes' together."""
    sums = stats["sums"]
    return all_reduce(torch.cat([sums, sums.new_tensor([stats["seen"]])]), world).tolist()


def stop_mid_epoch(state, stop, stats, next_step):
    """Keep where the epoch stopped and its sums so far (all processes' together) in last.pt, then stop."""
    state.step, state.partial = next_step, epoch_totals(stats, state.world) + [stats["seconds"]]
    stop_now(state, stop, state.checkpoint(), f"at epoch {state.epoch + 1}, step {state.step}/{state.steps}")


# ---------------------------------------------------------------------------------------------
# The state last.pt keeps, and resuming from it


def run_files(folder):
    """The folder's files, less the temp files a killed save leaves behind."""
    if not os.path.isdir(folder):
        return []
    return [name for name in os.listdir(folder) if not common.TEMP_FILE.match(name)]


def restored_args(args, world=1):
    """On --resume, the saved run's recipe wins; only where and how to run come from the CLI.
    Resuming an earlier checkpoint than the folder's last.pt (best.pt, say) would rewind the run
    and overwrite last.pt, so it needs --overwrite."""
    ckpt = common.load_checkpoint(args.resume)
    saved = dict(ckpt.get("args") or {})
    if not saved:
        raise UserError(f"{args.resume} holds no training arguments, so it cannot be resumed")
    for key in ("device", "data_dir", "download", "tensorboard", "resume", "overwrite", "eval_batch_size"):
        saved[key] = getattr(args, key)
    saved.setdefault("cutout_p", 1.0)  # runs saved before --cutout-p existed cut every image
    saved["out"] = os.path.dirname(os.path.abspath(args.resume))
    restored = argparse.Namespace(**{**vars(args), **saved})
    if ckpt["epoch"] >= restored.epochs:
        return restored, ckpt  # a finished run: nothing to check, train() says so
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


class TrainState:
    """Everything a run needs to continue exactly: weights, optimizer, OneCycle schedule, scaler,
    each process's augmentation generator, where the run stands, and its history. Written to a
    checkpoint by checkpoint() and loaded by restore()."""

    def __init__(self, args, net, optimizer, scheduler, scaler, max_lr, lr_range, classes, steps, rank, world):
        device = next(net.parameters()).device
        self.args, self.net, self.max_lr, self.lr_range, self.classes = args, net, max_lr, lr_range, list(classes)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.steps, self.rank, self.world = steps, rank, world
        self.aug_generator = data.device_generator(device, args.seed * 1000 + rank)
        self.epoch, self.step = 0, 0  # the next step to take
        self.partial = None  # an epoch stopped midway: [loss sum, correct, images] of all processes, seconds
        self.history, self.best_acc = [], -1.0
        self.saved_epoch = None  # the epoch in the last last.pt this run wrote or resumed from
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
        self.epoch, self.step, self.saved_epoch = ckpt["epoch"], ckpt["step"], ckpt["epoch"]
        self.history, self.best_acc = ckpt["history"], ckpt["best_acc"]
        partial = ckpt.get("partial")
        # checkpoints saved before the seconds were kept have three entries; that time is lost
        self.partial = (list(partial) + [0.0])[:4] if partial else None

    def resume(self, ckpt, log, device, dtype):
        """Continue from a checkpoint (None: a new run) and say where."""
        if ckpt is None:
            return
        self.restore(ckpt)
        log(f"Resuming {self.args.out} at epoch {self.epoch + 1}, step {self.step}")
        if self.rank == 0:
            write_metrics(self, device, dtype)  # a kill between last.pt and metrics.json must not part them

    def save(self, names, checkpoint=None):
        """Write one checkpoint (made once) to each of names in the run folder, atomically. A full
        disk stops the run in one sentence; the files saved before stay whole."""
        checkpoint = checkpoint or self.checkpoint()
        try:
            for name in names:
                common.save_atomic(os.path.join(self.args.out, name), lambda f: torch.save(checkpoint, f))
        except common.DiskFull as e:
            kept = (f"last.pt of epoch {self.saved_epoch} is intact: resume with "
                    f"{resume_command(self.args, self.world)}" if self.saved_epoch else "no checkpoint was kept")
            raise common.DiskFull(f"{e}: a checkpoint needs about 89 MB, and room for one more while it is "
                                  f"written; {kept}") from None
        if "last.pt" in names:
            self.saved_epoch = self.epoch

    def kept(self):
        """What the run folder holds that this run wrote or resumed from, in words."""
        if self.saved_epoch is None:
            return f"no checkpoint of this run was saved in {self.args.out}"
        last = os.path.join(self.args.out, "last.pt")
        return f"the last good checkpoint, epoch {self.saved_epoch}, is kept in {last}"


# ---------------------------------------------------------------------------------------------
# During an epoch


def header(state, device, dtype, n_train, n_test):
    """The run's first line: where it runs, in which precision, on what, with which schedule."""
    args, world = state.args, state.world
    return (f"ResNet18 on {device} ({common.precision_name(dtype)}, channels_last{', compiled' * args.compile}"
            f"{f', {world} processes' if world > 1 else ''}); {n_train:,} train / {n_test:,} test images; "
            f"{args.optimizer} OneCycle max LR {state.max_lr:.4g}, batch {args.batch_size}, "
            f"{args.epochs} epoch{'s' * (args.epochs != 1)}")


def share_bn_statistics(state):
    """Under torchrun each process keeps its own BatchNorm statistics (DDP syncs them only at the
    next forward): every process tests, and rank 0 saves, rank 0's."""
    if state.world > 1:
        for buffer in state.net.buffers():
            dist.broadcast(buffer, 0)


def check_test_loss(state, result):
    """A non-finite test loss is a diverged run too: stop before it is saved as best.pt."""
    if not math.isfinite(result["loss"]):
        raise NonFiniteLoss(f"the test loss became non-finite after epoch {state.epoch + 1}; {state.kept()}. "
                            f"Try a lower --max-lr (this run used {state.max_lr:.4g}).")


class StepWatch:
    """Called after every training step: shows progress, checks the loss stays finite (a host sync,
    so only at progress lines on a GPU), and says whether to stop (a signal came). Its summary()
    adds what the epoch did before a stop that the run resumed from."""

    def __init__(self, state, stop, device):
        self.state, self.stop, self.device = state, stop, device
        self.progress = Progress(state.epoch + 1, state.args.epochs, state.steps, state.rank == 0)
        self.first, self.started, self.finite = state.step, time.perf_counter(), []
        self.lr = state.scheduler.get_last_lr()[0]  # the LR the next step uses
        self.last_lr, self.next_step, self.stopped = self.lr, state.steps, False

    def __call__(self, i, loss, sums, seen):
        step, lr = self.first + i, self.lr
        self.lr = self.state.scheduler.get_last_lr()[0]
        self.finite.append(torch.isfinite(loss))
        due = self.progress.due(step)
        stopping = self.stop.agreed(self.state.world, self.device, (step + 1) % STOP_CHECK_EVERY == 0)
        if due or stopping or self.device.type == "cpu":
            self.check_finite(step)
        if due:
            loss_sum, correct = sums.tolist()
            rate = seen * self.state.world / (time.perf_counter() - self.started)
            self.progress.show(step, loss_sum / seen, lr, 100 * correct / seen, rate)
        if stopping and step + 1 < self.state.steps:
            self.next_step, self.stopped = step + 1, True
        self.last_lr = lr
        return self.stopped

    def check_finite(self, step):
        """Raise NonFiniteLoss naming the first non-finite step among those since the last check."""
        flags = torch.stack(self.finite)
        if not bool(flags.all()):
            bad = step - len(self.finite) + 1 + int((~flags).nonzero()[0])
            raise NonFiniteLoss(f"the training loss became non-finite at epoch {self.state.epoch + 1}, step "
                                f"{bad + 1}; {self.state.kept()}. Try a lower --max-lr (this run used "
                                f"{self.state.max_lr:.4g}).")
        self.finite.clear()

    def summary(self, sums, seen):
        """The epoch's sums, images and seconds, with those of the part before a resume."""
        loss_sum, correct, earlier, seconds = self.state.partial or (0.0, 0.0, 0, 0.0)
        if self.state.rank != 0:  # the sums before the stop are all processes' together: rank 0 adds them
            loss_sum, correct, earlier = 0.0, 0.0, 0
        sums = sums + torch.tensor([loss_sum, correct], device=sums.device)
        elapsed = time.perf_counter() - self.started
        return {"sums": sums, "seen": earlier + seen, "seconds": seconds + elapsed,
                "started": self.started - seconds, "lr": self.last_lr, "stopped": self.stopped}


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


def warm_up(train_steps, test, state, steps=3):
    """A few training steps and one test pass on the run's exact shapes, then every state put back:
    cuDNN's autotuning (and torch.compile) happen before the clock starts. train_steps(n) and
    test() are the run's own, on a generator of their own. Returns the seconds."""
    start = time.perf_counter()
    restored = [state.net, state.optimizer, state.scheduler, state.scaler]
    saved = copy.deepcopy([part.state_dict() for part in restored])
    train_steps(steps)
    test()
    for part, part_state in zip(restored, saved):
        part.load_state_dict(part_state)
    state.optimizer.zero_grad(set_to_none=True)
    device = next(state.net.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The run's records: metrics.json, curves.png


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


def test_line(result):
    line = (f"Test set: Average loss: {result['loss']:.4f}, Accuracy: {result['correct']}/{result['total']} "
            f"({result['accuracy']:.2f}%)")
    if "accuracy_tta" in result:
        line += f"; with flip TTA: {result['correct_tta']}/{result['total']} ({result['accuracy_tta']:.2f}%)"
    return line + "\n"


def end_epoch(state, stats, result, device, dtype, tb):
    """Record the epoch in the history, then save best.pt, last.pt, metrics.json (rank 0)."""
    loss_sum, correct, seen = epoch_totals(stats, state.world)
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


def finish(state, log):
    history = state.history
    plot_curves(history, os.path.join(state.args.out, "curves.png"), state.args.label_smoothing)
    best = max(history, key=lambda h: h["test_acc"])
    final = history[-1].get("test_acc_tta")
    log(f"Best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']}"
        f"{f' (final, with flip TTA: {final:.2f}%)' if final is not None else ''}; "
        f"{sum(h['train_seconds'] for h in history):.1f} s of training. Outputs in {state.args.out}")


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
