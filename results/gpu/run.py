"""Run a batch of GPU measurements inside one call of the lent GPU machine (see run.sh).

    python3 results/gpu/run.py OUT --solo gpu-tests profile default --parallel default-seed1 nobnwd ...

Solo steps run one after another, alone on the GPU: their timings are speed figures. Parallel steps
then run --jobs at a time as separate processes (under CUDA MPS where the machine has it, so their
kernels overlap): their accuracies count, their seconds do not. Every step writes WORK/STEP/ with
its log in WORK/STEP/log.txt (WORK is a RAM disk when there is one: checkpoints are never fetched).
A step still running at --deadline seconds is stopped (SIGTERM, then SIGKILL after 15 s), and one
that could not finish in the time left is not started; OUT/log.txt says what each step did, and
OUT/results.tar.gz (WORK without checkpoints, remade after every step) keeps what finished.

A step is a recipe (below) with an optional -seedN, or one of the non-training steps; either with
-tty appended runs under a pseudo-terminal.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

PYTHON = shlex.quote(sys.executable)  # every step runs under the interpreter that runs this
SPEC = "--optimizer adam --label-smoothing 0 --no-flip --max-lr 0.027 --wd 0 --cutout-p 0.5"
ALL_LEVERS = "--no-bn-wd --alternate-flip --label-smoothing 0.2 --max-lr 0.4"
RECIPES = {  # train.py flags beyond --data-dir, --out and --seed
    "default": "",
    "nobnwd": "--no-bn-wd",
    "altflip": "--alternate-flip",
    "ls0.2": "--label-smoothing 0.2",
    "lr0.4": "--max-lr 0.4",
    "lr0.8": "--max-lr 0.8",  # above the default's 0.4, the highest peak measured so far
    "levers": ALL_LEVERS,
    "b256": "--batch-size 256",  # the peak LR follows the batch: 0.1
    "spec-recipe": SPEC,
    "default-compile": "--compile",
    "compile-ro": "--compile --compile-mode reduce-overhead --tta6",  # bench.py: 1.6x eager's images/s; the
                                                                        # six views scored on the candidate default
    "b1024-compile-ro": "--batch-size 1024 --compile --compile-mode reduce-overhead",  # peak LR 0.8
    "div5": "--div-factor 5",  # OneCycle from 0.2 x the peak, as the ResNet18 anchor
    "linear": "--anneal linear",
    "final-div100": "--final-div-factor 100",
    "zero-res": "--zero-init-residual",
    "ema": "--ema 0.99",  # an average of the last hundred steps or so, scored beside the weights
    "ema-fastbn": "--ema 0.99 --bn-momentum 0.4",  # airbench: the average helps with faster BN statistics
    "sgd-auto": "--max-lr auto",  # the range test's pick against the hand-set 0.4
    "spec-auto": SPEC.replace("--max-lr 0.027", "--max-lr auto"),
    "spec-lr0.01": SPEC.replace("--max-lr 0.027", "--max-lr 0.01"),  # where Adam's best peak lies
    "spec-lr0.05": SPEC.replace("--max-lr 0.027", "--max-lr 0.05"),
}
BENCH = "{python} bench.py --data-dir {data} --steps 20 --windows 5 --peak-tflops 790 --skip-reference"
OTHER_STEPS = {  # name: command, run in the repository root, with {dir} the step's folder
    "bench": BENCH.replace(" --skip-reference", " --ref-workers 8") + " --batch-size 512 --json {dir}/bench.json",
    "bench-1024": BENCH + " --batch-size 1024 --json {dir}/bench.json",
    "bench-graph": BENCH + " --batch-size 512 --cuda-graph --json {dir}/bench.json",
    "bench-graph-1024": BENCH + " --batch-size 1024 --cuda-graph --json {dir}/bench.json",
    "bench-compile": BENCH + " --batch-size 512 --compile --json {dir}/bench.json",
    "bench-compile-max": BENCH + " --batch-size 512 --compile --compile-mode max-autotune-no-cudagraphs "
                                 "--json {dir}/bench.json",
    "bench-reduce-overhead": BENCH + " --batch-size 512 --compile --compile-mode reduce-overhead "
                                     "--json {dir}/bench.json",
    "bench-reduce-overhead-1024": BENCH + " --batch-size 1024 --compile --compile-mode reduce-overhead "
                                          "--json {dir}/bench.json",
    "profile": BENCH + " --batch-size 512 --json {dir}/bench.json --profile {dir}/profile.json",
    "gpu-tests": "CIFAR10_SHARED=$PWD/.data {python} -m pytest -q tests/test_bench.py tests/test_train.py "
                 "-k 'cuda or never_waits or fit_learns'",
    "notebook": "{python} results/gpu/execute_notebook.py {dir}/cifar10_resnet18.ipynb",
}


PTY = "import os, pty, sys; sys.exit(os.waitstatus_to_exitcode(pty.spawn(sys.argv[1:])))"


def step_command(name, folder, data_dir=".data", train_args=""):
    """The shell command of a step: a recipe trains with --seed N (default 0) and train_args; STEP-tty
    runs STEP with its output through a pseudo-terminal, as a person in a terminal sees it."""
    if name.endswith("-tty"):
        inner = step_command(name.removesuffix("-tty"), folder, data_dir, train_args)
        return f"{PYTHON} -c {shlex.quote(PTY)} {inner} < /dev/null"
    if name in OTHER_STEPS:
        return OTHER_STEPS[name].format(dir=shlex.quote(folder), data=shlex.quote(data_dir), python=PYTHON)
    recipe, _, seed = name.partition("-seed")
    if recipe not in RECIPES or not (seed == "" or seed.isdigit()):
        raise SystemExit(f"unknown step {name}: use a recipe ({', '.join(RECIPES)}) with an optional -seedN, "
                         f"or one of {', '.join(OTHER_STEPS)}")
    return " ".join([PYTHON, "train.py --data-dir", shlex.quote(data_dir), "--out", shlex.quote(folder),
                     "--overwrite --seed", seed or "0", RECIPES[recipe], train_args]).replace("  ", " ").strip()


def is_training(name):
    return name.partition("-seed")[0] in RECIPES


class Batch:
    """The steps of one call, their processes and the shared deadline."""

    def __init__(self, out, work, deadline, data_dir=".data", train_args=""):
        self.out, self.work, self.start, self.deadline = out, work, time.monotonic(), deadline
        self.data_dir, self.train_args = data_dir, train_args
        self.durations = []  # seconds of each finished parallel training step
        os.makedirs(out, exist_ok=True)

    def left(self):
        return self.deadline - (time.monotonic() - self.start)

    def log(self, line):
        line = f"[{time.monotonic() - self.start:6.0f}s] {line}"
        print(line, flush=True)
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(line + "\n")

    def launch(self, name, alone, gradcam=False):
        """Start a step; its folder's step.json says whether it ran alone (its seconds are a speed
        figure) or beside others."""
        folder = os.path.join(self.work, name)
        os.makedirs(folder, exist_ok=True)
        command = step_command(name, folder, self.data_dir, self.train_args)
        with open(os.path.join(folder, "step.json"), "w") as f:
            json.dump({"step": name, "alone": alone, "command": command}, f, indent=1)
        if gradcam and is_training(name):
            command += (f" && {PYTHON} gradcam.py --ckpt {shlex.quote(os.path.join(folder, 'best.pt'))} "
                        f"--data-dir {shlex.quote(self.data_dir)}")
        log = open(os.path.join(folder, "log.txt"), "w")
        log.write(f"$ {command}\n")
        log.flush()
        process = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        process.name, process.started, process.logfile = name, time.monotonic(), log
        self.log(f"start {name}: {command}")
        return process

    def finished(self, process):
        process.logfile.close()
        seconds = time.monotonic() - process.started
        self.log(f"end {process.name}: exit {process.returncode} after {seconds:.0f}s"
                 f"{result_line(self.work, process.name)}")
        self.pack()
        return seconds

    def stop(self, process):
        """SIGTERM to the step's process group, SIGKILL if it is still there 15 s later."""
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.log(f"stopped {process.name} at the deadline")

    def solo(self, names):
        for name in names:
            if self.left() < 20:
                self.log(f"skip {name}: {self.left():.0f}s left")
                continue
            process = self.launch(name, alone=True, gradcam=True)
            try:
                process.wait(max(1.0, self.left()))
            except subprocess.TimeoutExpired:
                self.stop(process)
            self.finished(process)

    def parallel(self, names, jobs):
        pending, running = list(names), []
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                needed = max(self.durations, default=0) if is_training(name) else 0
                if self.left() < max(needed, 20):
                    self.log(f"skip {name}: {self.left():.0f}s left, a run here has taken {needed:.0f}s")
                    continue
                running.append(self.launch(name, alone=False))
            time.sleep(1)
            for process in [p for p in running if p.poll() is not None or self.left() <= 0]:
                if process.poll() is None:
                    self.stop(process)
                running.remove(process)
                seconds = self.finished(process)
                if process.returncode == 0 and is_training(process.name):
                    self.durations.append(seconds)

    def pack(self):
        """OUT/results.tar.gz: every step's folder without checkpoints; written whole, then renamed."""
        tmp = os.path.join(self.out, ".results.tar.gz")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.work, arcname="runs", filter=lambda info: None if info.name.endswith(".pt") else info)
        os.replace(tmp, os.path.join(self.out, "results.tar.gz"))


def result_line(work, name):
    """'; final 89.50% (90.01% TTA), 23.4 s of training' from a finished run's metrics.json."""
    try:
        with open(os.path.join(work, name, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return ""
    if len(m["epochs"]) < m["args"]["epochs"]:
        return f"; stopped after {len(m['epochs'])} epochs"
    columns = (("final_test_acc_tta", "TTA"), ("final_test_acc_tta6", "six views"), ("final_test_acc_ema", "EMA"))
    views = ", ".join(f"{m[key]:.2f}% {name}" for key, name in columns if m.get(key) is not None)
    return f"; final {m['final_test_acc']:.2f}%{f' ({views})' if views else ''}, {m['train_seconds']:.1f} s of training"


def start_mps(batch):
    """CUDA MPS lets the parallel steps' kernels share the GPU at once instead of taking turns;
    kept only if a CUDA program runs under it within 30 s. Returns whether it runs."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        batch.log("no nvidia-cuda-mps-control: parallel steps share the GPU by time-slicing")
        return False
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY="/tmp/mps-pipe", CUDA_MPS_LOG_DIRECTORY="/tmp/mps-log")
    for folder in ("/tmp/mps-pipe", "/tmp/mps-log"):
        os.makedirs(folder, exist_ok=True)
    subprocess.run([control, "-d"], check=False)
    probe = "import torch; print(torch.ones(1, device='cuda').add(1).item())"
    try:
        ok = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        stop_mps()
        batch.log("CUDA MPS did not answer: parallel steps share the GPU by time-slicing")
        return False
    batch.log("CUDA MPS runs: parallel steps' kernels share the GPU")
    return True


def stop_mps():
    subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", check=False, timeout=30)
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        os.environ.pop(key, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where log.txt and results.tar.gz go")
    parser.add_argument("--solo", nargs="*", default=[], metavar="STEP", help="steps run alone, in order")
    parser.add_argument("--parallel", nargs="*", default=[], metavar="STEP", help="steps run --jobs at a time")
    parser.add_argument("--jobs", type=int, default=8, help="parallel steps at once (default 8)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds from the start (default 540)")
    parser.add_argument("--data-dir", default=".data", help="CIFAR-10 root for every step (default .data)")
    parser.add_argument("--train-args", default="", help="appended to every train.py command, e.g. '--epochs 1'")
    parser.add_argument("--work", default=None, help="run folders (default /dev/shm/gpu-runs, else OUT/runs)")
    parser.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True,
                        help="run the parallel steps under CUDA MPS when the machine has it (default on)")
    args = parser.parse_args(argv)
    for name in args.solo + args.parallel:
        step_command(name, "check")  # an unknown step stops the call before anything runs
    work = args.work or ("/dev/shm/gpu-runs" if os.path.isdir("/dev/shm") else os.path.join(args.out, "runs"))
    os.makedirs(work, exist_ok=True)
    batch = Batch(args.out, work, args.deadline, args.data_dir, args.train_args)
    batch.solo(args.solo)
    mps = args.parallel and args.mps and start_mps(batch)
    try:
        batch.parallel(args.parallel, args.jobs)
    finally:
        if mps:
            stop_mps()
    batch.pack()
    batch.log("done")


if __name__ == "__main__":
    main()
