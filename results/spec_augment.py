"""train.py with the spec run's own augmentation, to measure its share of the gap to the spec's 91.97%.

train.py copies two of the spec's augmentation choices (RandomCrop with padding, Cutout 16x16 with
p=0.5) but not the rest of its albumentations pipeline (github.com/prarthanats/torch_wrapper,
utils/data_augmentation.py). This script swaps in that whole pipeline, batched on the device, in
the spec's order: Normalize; PadIfNeeded(36, 36, cv2.BORDER_REFLECT), 2 pixels mirrored on each
side with the edge pixel repeated; RandomCrop(32, 32); Cutout(1 hole, 16x16, p=0.5) filled with
the mean tuple in normalized units (its fill_value=mean); ToGray(p=0.15) on the normalized values.
No flip; train.py's --no-flip and --cutout-p have no effect here. Every other flag is train.py's:

    python results/spec_augment.py --data-dir /tmp/cf --optimizer adam --max-lr 0.027 --wd 0 \
        --label-smoothing 0 --no-flip --cutout-p 0.5 --out results/cpu-full/spec-augment
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402

LUMA = (0.299, 0.587, 0.114)  # cv2's RGB2GRAY weights, which albumentations' ToGray uses


def mirror_pad_crop(images, generator=None, padding=2):
    """PadIfNeeded(h + 2 * padding, border reflect, edge repeated: 'ba|abcd|dc') + RandomCrop(h, w)."""
    n, _, h, w = images.shape
    x = torch.cat([images[..., :padding].flip(-1), images, images[..., -padding:].flip(-1)], -1)
    x = torch.cat([x[..., :padding, :].flip(-2), x, x[..., -padding:, :].flip(-2)], -2)
    windows = x.unfold(2, h, 1).unfold(3, w, 1)  # n, c, offsets y, offsets x, h, w
    dy = data._randint(2 * padding + 1, n, generator, images.device)
    dx = data._randint(2 * padding + 1, n, generator, images.device)
    return windows[torch.arange(n, device=images.device), :, dy, dx]


def spec_transform(images, generator=None, *, use_flip=False, cutout_p=0.5, flip_mask=None):
    """The spec's training augmentation for a uint8 batch; same signature as data.train_transform
    (the spec used no flip, so use_flip and flip_mask are ignored, and its Cutout p is 0.5)."""
    x = mirror_pad_crop(data.normalize(images), generator)
    hole = data.cutout(torch.ones_like(x[:, :1]), 16, 0.0, generator, p=0.5) == 0
    mean, _ = data._channel_stats(data.MEAN, data.STD, x.device)  # made once, not copied to the device per batch
    x = torch.where(hole, mean, x)
    gray = sum(weight * x[:, c:c + 1] for c, weight in enumerate(LUMA)).expand_as(x)
    to_gray = (data._uniform(len(x), generator, x.device) < 0.15)[:, None, None, None]
    return torch.where(to_gray, gray, x)


if __name__ == "__main__":
    data.train_transform = spec_transform
    train.main()
