"""A range test closer to how OneCycle trains. OneCycle reaches its peak after epochs of
rising LR, in which the weights grow and BatchNorm makes each step smaller in effect; the plain
test sweeps from fresh weights. Here the model first trains --warm-steps steps at a constant
--warm-lr (the plain test's steepest pick, as a user who ran it has it), then the sweep runs on from
those weights and that momentum, with lr_range.py's options otherwise.

    python results/lr_range/warm_sweep.py --data-dir /tmp/cifar --no-download --warm-lr 0.0148 \\
        --out results/lr_range/cpu-sgd-warm
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import common  # noqa: E402
import data  # noqa: E402
import lr_range  # noqa: E402
import train  # noqa: E402
from resnet import ResNet18  # noqa: E402


def warm_up(model, optimizer, criterion, batches, augment, *, steps, amp_dtype):
    """`steps` of the recipe's training steps at the optimizer's LR, held constant; returns each
    step's loss."""
    losses = []

    def record(i, loss, sums, seen):
        losses.append(loss.item())
        if (i + 1) % 10 == 0 or i + 1 == steps:
            print(f"warm-up step {i + 1}/{steps}  loss {losses[-1]:.4f}", flush=True)

    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=amp_dtype == torch.float16)
    augmented = ((augment(x), y) for x, y in itertools.islice(batches, steps))
    train.train_epoch(model, augmented, criterion, optimizer, scaler, constant, amp_dtype, after_step=record)
    return losses


def main():
    parser = lr_range.build_parser()
    parser.add_argument("--warm-lr", type=common.positive_float, required=True, help="the warm-up's constant LR")
    parser.add_argument("--warm-steps", type=common.positive_int, default=97,
                        help="warm-up steps (default 97, an epoch at batch 512)")
    args = parser.parse_args()
    device = common.resolve_device(args.device, parser)
    common.check_writable(args.out)
    images, labels, _ = data.load_cifar10(args.data_dir, "train", download=args.download)
    images, labels = images[:args.limit_train].to(device), labels[:args.limit_train].to(device)
    amp_dtype = common.amp_dtype(device, args.amp)
    torch.manual_seed(args.seed)
    model = ResNet18().to(device, memory_format=torch.channels_last)
    optimizer = common.make_optimizer(model, args.optimizer, args.warm_lr, args.wd)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    batches, augment = lr_range.lr_range_inputs(images, labels, args.batch_size, seed=args.seed,
                                                use_flip=not args.no_flip, cutout_p=args.cutout_p)
    warm_losses = warm_up(model, optimizer, criterion, batches, augment, steps=args.warm_steps, amp_dtype=amp_dtype)
    result = lr_range.lr_range_test(model, optimizer, criterion, batches, start_lr=args.start_lr, end_lr=args.end_lr,
                                    num_iter=args.num_iter, step_mode=args.step_mode, amp_dtype=amp_dtype,
                                    transform=augment, progress=lr_range.progress_printer(args.num_iter),
                                    rule=args.rule)
    lr_range.plot_lr_range(result, os.path.join(args.out, "lr_range.png"))
    common.save_json(os.path.join(args.out, "lr_range.json"),
                     {"args": vars(args), "warm_losses": warm_losses, **result.to_dict()})
    print("LRs read off the smoothed curve: " + ", ".join(f"{name} {lr:.3g}" for name, lr in result.picks.items()))


if __name__ == "__main__":
    main()
