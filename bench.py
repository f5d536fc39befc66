"""Training throughput of train.py's path against a DataLoader pipeline like the spec's.

    python bench.py                         # this machine's default device, batch 128
    python bench.py --device cuda --batch-size 512 --compile --peak-tflops 790

Both pipelines train the same ResNet18 at the same batch size on the same device:
- default: the data as one uint8 tensor on the device, batched random_crop/flip/cutout there,
  autocast (bf16 where supported), channels_last, optional torch.compile; no host sync per step.
- reference: torch.utils.data.DataLoader over a Dataset with per-sample transforms (ToTensor,
  RandomCrop(32, padding=4), Normalize, Cutout) in fp32, as the spec's notebook did.
Images/s is the median over --windows timed windows of --steps steps, after --warmup steps.
A benchmark, not a test: the numbers go to the terminal and, with --json, to a file.
--profile PATH also records where the default step's time goes, op by op (torch.profiler):
device time on CUDA, CPU time elsewhere.
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

import common
import data
import train
from resnet import ResNet18


class PerSampleCutout:
    """The reference pipeline's Cutout: one 16x16 hole per image tensor, centre uniform, clipped."""

    def __init__(self, size=16):
        self.size = size

    def __call__(self, image):
        _, h, w = image.shape
        cy, cx = np.random.randint(h), np.random.randint(w)
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        image = image.clone()
        image[:, y0:y1, x0:x1] = 0
        return image


class ReferenceDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).numpy()  # H x W x C, like the PIL/numpy datasets
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.RandomCrop(32, padding=4),
                                             transforms.Normalize(data.MEAN, data.STD), PerSampleCutout(16)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_windows(step, batch_size, warmup, steps, windows, device):
    """Images/s of each window of `steps` calls to step(), after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates


def profile_ops(step, steps, device):
    """Self time of every op over `steps` calls to step(), most expensive first, per step.

    On CUDA an op's time is that of the kernels it launched, so the total is the GPU's busy time:
    well below the step's wall time means launch-bound, close to it means the kernels must shrink.
    """
    import torch.profiler
    from torch.autograd import DeviceType

    on_cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    self_us = [(e.key, e.count, e.self_device_time_total if on_cuda else e.self_cpu_time_total)
               for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    total = sum(us for _, _, us in self_us)
    ops = [{"name": name, "calls_per_step": count / steps, "ms_per_step": us / steps / 1e3, "share": us / total}
           for name, count, us in sorted(self_us, key=lambda op: -op[2]) if us > 0]
    return {"time": "device" if on_cuda else "cpu", "steps": steps, "ms_per_step": total / steps / 1e3, "ops": ops}


def print_profile(profile, top=15):
    print(f"profile: {profile['ms_per_step']:.2f} ms of {profile['time']} time in ops per step of "
          f"{profile['wall_ms_per_step']:.2f} ms (timed, unprofiled); the top {top} ops:")
    for op in profile["ops"][:top]:
        print(f"  {100 * op['share']:5.1f}%  {op['ms_per_step']:8.3f} ms  {op['calls_per_step']:6.1f} calls  "
              f"{op['name'][:90]}")


def graphed_step(net, criterion, optimizer, batch_size, dtype, device):
    """Forward, backward and SGD step captured once as a CUDA graph, then replayed on each batch: what
    launching ~500 kernels a step from Python costs. torch's SGD reads the LR and momentum as Python
    numbers, so the capture freezes them: this times the lever, train.py does not use it."""
    static_x = torch.zeros(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    static_y = torch.zeros(batch_size, dtype=torch.long, device=device)

    def forward_backward_step():
        with train.autocast(device, dtype):
            loss = criterion(net(static_x), static_y)
        loss.backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # cuDNN's autotuning and the optimizer's state, before the capture
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            forward_backward_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        forward_backward_step()

    def replay(x, y):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return replay


def default_path(images, labels, args, device):
    """train.py's training step; returns (train rates, eval rates, precision, profile or None)."""
    dtype = common.amp_dtype(device, not args.no_amp)
    torch.backends.cudnn.benchmark = True  # as train.py runs
    torch.manual_seed(0)
    net = ResNet18().to(device, memory_format=torch.channels_last)
    model = torch.compile(net, mode=args.compile_mode) if args.compile else net
    optimizer = common.make_optimizer(net, "sgd", 0.05, 5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.05, total_steps=10**9)  # as train.py steps it
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = data.device_generator(device, 0)
    cutout_p = train.build_parser().get_default("cutout_p")
    images, labels = images.to(device), labels.to(device)

    def batches():
        while True:
            yield from train.epoch_batches(images, labels, batch_size=args.batch_size, epoch=0, generator=generator,
                                           cutout_p=cutout_p)

    order = batches()

    replay = graphed_step(model, criterion, optimizer, args.batch_size, dtype, device) if args.cuda_graph else None

    def step():
        x, y = next(order)
        if replay:
            replay(x, y)
        else:
            train.train_step(model, x, y, criterion, optimizer, scaler, scheduler, dtype)

    net.train()
    train_rates = timed_windows(step, args.batch_size, args.warmup, args.steps, args.windows, device)
    profile = profile_ops(step, args.steps, device) if args.profile else None
    eval_x = data.normalize(images[:args.eval_batch_size]).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def eval_step():
        with train.autocast(device, dtype):
            model(eval_x).argmax(1)

    net.eval()
    eval_rates = timed_windows(eval_step, len(eval_x), 1, max(1, args.steps // 4), args.windows, device)
    return train_rates, eval_rates, common.precision_name(dtype), profile


def reference_path(images, labels, args, device):
    torch.manual_seed(0)
    model = ResNet18().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    loader = torch.utils.data.DataLoader(ReferenceDataset(images, labels), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.ref_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.ref_workers > 0)

    def batches():
        while True:
            yield from loader

    order = batches()

    def step():
        x, y = next(order)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    return timed_windows(step, args.batch_size, args.warmup, args.steps, args.windows, device)


def forward_flops_per_image(device):
    from torch.utils.flop_counter import FlopCounterMode

    model = ResNet18().to(device).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=device))
    return counter.get_total_flops()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=common.int_at_least(1, maximum=data.SPLIT_SIZE["train"]), default=128,
                        help="training batch size (default 128)")
    parser.add_argument("--eval-batch-size", type=common.positive_int, default=1024,
                        help="batch size for the eval timing (default 1024)")
    parser.add_argument("--steps", type=common.positive_int, default=10, help="steps per timed window (default 10)")
    parser.add_argument("--warmup", type=common.int_at_least(0), default=3, help="untimed steps first (default 3)")
    parser.add_argument("--windows", type=common.positive_int, default=3, help="timed windows (default 3)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the default path's model")
    parser.add_argument("--compile-mode", choices=common.COMPILE_MODES, default="default",
                        help="torch.compile's mode with --compile (default 'default')")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the default path's forward, backward and optimizer step as one CUDA graph "
                             "(LR and momentum frozen: a timing of the lever, not a training path)")
    parser.add_argument("--no-amp", action="store_true", help="fp32 in the default path too")
    parser.add_argument("--ref-workers", type=common.int_at_least(0), default=2,
                        help="DataLoader workers of the reference (default 2)")
    parser.add_argument("--skip-reference", action="store_true", help="time only the default path")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 root; synthetic images of the same shape if not given")
    parser.add_argument("--peak-tflops", type=common.positive_float, default=None,
                        help="the device's peak TFLOP/s, to print the fraction achieved")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--profile", metavar="PATH", default=None,
                        help="profile --steps more steps of the default path; write the time per op to this JSON file")
    return parser


def bench_data(args):
    """(images, labels, what they are): CIFAR-10's train set, or enough seeded random images."""
    if args.data_dir:
        images, labels, _ = data.load_cifar10(args.data_dir, "train")
        return images, labels, "CIFAR-10 train set"
    gen = torch.Generator().manual_seed(0)
    needed = args.batch_size * max(args.warmup + args.steps * args.windows, 8)
    n = min(max(needed, args.eval_batch_size), data.SPLIT_SIZE["train"])
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return images, labels, f"{n:,} synthetic images"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, path in (("--json", args.json), ("--profile", args.profile)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{flag} {path}: its folder does not exist; create it or choose another path")
        if path and os.path.isdir(path):  # found before the measuring, not after it
            parser.error(f"{flag} {path} is a folder; name a file in it, such as "
                         f"{os.path.join(path, flag[2:] + '.json')}")
    device = common.resolve_device(args.device, parser)
    if args.cuda_graph and (device.type != "cuda" or args.compile or common.amp_dtype(device, not args.no_amp)
                            == torch.float16):
        parser.error("--cuda-graph needs a CUDA GPU with bf16 or fp32 (no GradScaler) and no --compile")
    return common.main_guard(lambda: bench(args, device))


def bench(args, device):
    """bench.py's work: the data, the measurements, and --json's file."""
    images, labels, source = bench_data(args)
    print(f"bench on {device} ({torch.get_num_threads()} CPU threads), batch {args.batch_size}, {source}", flush=True)
    result = measure(images, labels, source, args, device)
    if args.json:
        common.save_json(args.json, {"args": vars(args), **result})
    return result


def measure(images, labels, source, args, device):
    """The default path's training and test rates (and its profile), the reference's, and what
    they mean in TFLOP/s and seconds for 20 epochs, printed as they come."""
    train_rates, eval_rates, precision, profile = default_path(images, labels, args, device)
    result = {"device": str(device), "device_name": common.device_name(device),
              "torch": torch.__version__, "batch_size": args.batch_size, "precision": precision,
              "compile": args.compile and args.compile_mode, "cuda_graph": args.cuda_graph, "data": source,
              "date": time.strftime("%Y-%m-%d"),
              "default_images_per_s": statistics.median(train_rates), "default_windows": train_rates,
              "eval_images_per_s": statistics.median(eval_rates)}
    print(f"default   ({precision}, channels_last{f', compiled ({args.compile_mode})' if args.compile else ''}"
          f"{', CUDA graph' if args.cuda_graph else ''}): "
          f"{result['default_images_per_s']:10,.0f} img/s train   {result['eval_images_per_s']:,.0f} img/s eval",
          flush=True)
    if profile:
        profile["wall_ms_per_step"] = 1e3 * args.batch_size / result["default_images_per_s"]
        print_profile(profile)
        run = {key: result[key] for key in ("device", "device_name", "torch", "batch_size", "precision", "compile")}
        common.save_json(args.profile, {**run, **profile})
    if not args.skip_reference:
        ref_rates = reference_path(images, labels, args, device)
        result["reference_images_per_s"] = statistics.median(ref_rates)
        result["reference_windows"] = ref_rates
        result["speedup"] = result["default_images_per_s"] / result["reference_images_per_s"]
        print(f"reference (DataLoader, per-sample transforms, fp32): {result['reference_images_per_s']:10,.0f} img/s "
              f"train\nspeed-up: {result['speedup']:.2f}x")
    flops = forward_flops_per_image(device)
    result["forward_gflops_per_image"] = flops / 1e9
    result["train_tflops"] = 3 * flops * result["default_images_per_s"] / 1e12
    result["estimated_20_epoch_train_seconds"] = 20 * data.SPLIT_SIZE["train"] / result["default_images_per_s"]
    line = (f"model: {flops / 1e9:.2f} GFLOP forward per image; training at {result['train_tflops']:.2f} TFLOP/s "
            f"(3x forward)")
    if args.peak_tflops:
        result["fraction_of_peak"] = result["train_tflops"] / args.peak_tflops
        line += f", {100 * result['fraction_of_peak']:.1f}% of {args.peak_tflops:g}"
    print(line)
    print(f"20 epochs of 50,000 images at this rate: {result['estimated_20_epoch_train_seconds']:,.0f} s of training")
    return result


if __name__ == "__main__":
    main()
