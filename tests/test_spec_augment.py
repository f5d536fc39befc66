"""results/spec_augment.py: the spec's albumentations pipeline, checked against numpy and by hand."""
import json
import sys

import numpy as np
import torch

import data
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "results"))
import spec_augment  # noqa: E402


def test_mirror_pad_crop_is_a_window_of_the_symmetric_padding():
    """numpy's 'symmetric' padding is cv2.BORDER_REFLECT, the spec's PadIfNeeded border."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = spec_augment.mirror_pad_crop(images, torch.Generator().manual_seed(1))
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="symmetric")
    offsets = set()
    for i, crop in enumerate(crops.numpy()):
        found = [(y, x) for y in range(5) for x in range(5) if np.array_equal(padded[i, :, y:y + 32, x:x + 32], crop)]
        assert found, f"crop {i} is no 32x32 window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 10


def test_spec_transform_grays_15_percent_and_fills_holes_with_the_mean_tuple():
    """On one flat colour every pixel is the colour, the hole's mean tuple, or their luma."""
    n = 4000
    colour = torch.tensor([200, 40, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, 32, 32)
    out = spec_augment.spec_transform(colour, torch.Generator().manual_seed(0))
    v = (torch.tensor([200, 40, 90]) / 255 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
    mean = torch.tensor(data.MEAN)
    luma = torch.tensor([0.299, 0.587, 0.114])
    pixels = out.permute(0, 2, 3, 1)
    is_v, is_hole = (pixels - v).abs().amax(-1) < 1e-5, (pixels - mean).abs().amax(-1) < 1e-5
    is_gray_v = (pixels - luma @ v).abs().amax(-1) < 1e-5
    is_gray_hole = (pixels - luma @ mean).abs().amax(-1) < 1e-5
    assert bool((is_v | is_hole | is_gray_v | is_gray_hole).all())
    gray = (is_gray_v | is_gray_hole).flatten(1).all(1)
    assert abs(gray.float().mean().item() - 0.15) < 0.025  # 4.4 standard deviations of a binomial(4000, 0.15)
    cut = (is_hole | is_gray_hole).flatten(1).any(1)
    assert abs(cut.float().mean().item() - 0.5) < 0.04
    assert (is_hole | is_gray_hole).flatten(1).sum(1).max().item() == 256


def test_script_trains_with_train_py_flags(cifar, tmp_path):
    out = tmp_path / "run"
    res = run_script("results/spec_augment.py", "--data-dir", cifar, "--optimizer", "adam", "--max-lr", "0.01",
                     "--limit-train", "128", "--limit-test", "50", "--batch-size", "32", "--epochs", "1",
                     "--out", out)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["optimizer"] == "adam" and len(metrics["epochs"]) == 1
