import json
import re

import torch

from conftest import REPO, run_script
from resnet import ResNet18, format_summary, summary

# The spec's torchsummary table, copied here as an independent reference (first, a shortcut
# block and the last rows); the test also parses the whole table from the spec when present.
SPEC_ROWS = {
    "Conv2d-1": ([-1, 64, 32, 32], 1728),
    "BatchNorm2d-2": ([-1, 64, 32, 32], 128),
    "Conv2d-13": ([-1, 128, 16, 16], 73728),
    "Conv2d-17": ([-1, 128, 16, 16], 8192),
    "BasicBlock-19": ([-1, 128, 16, 16], 0),
    "Conv2d-41": ([-1, 512, 4, 4], 131072),
    "BatchNorm2d-47": ([-1, 512, 4, 4], 1024),
    "Linear-49": ([-1, 10], 5130),
}
SPEC = REPO.parent / "shared" / "spec" / "assignment-s11.md"


def spec_table():
    rows = {}
    pattern = re.compile(r"^\s*(\w+-\d+)\s+(\[[-\d, ]+\])\s+([\d,]+)\s*$")
    for line in SPEC.read_text().splitlines():
        m = pattern.match(line)
        if m:
            rows[m.group(1)] = (json.loads(m.group(2)), int(m.group(3).replace(",", "")))
    return rows


def test_parameter_count():
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_summary_matches_spec_table():
    ours = {name: (shape, params) for name, shape, params in summary(ResNet18())}
    assert len(ours) == 49
    for name, expected in SPEC_ROWS.items():
        assert ours[name] == expected, name
    if SPEC.is_file():
        table = spec_table()
        assert len(table) == 49
        assert ours == table


def test_state_dict_names_match_reference_implementation():
    keys = set(ResNet18().state_dict())
    for k in ["conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
              "layer1.0.conv1.weight", "layer1.0.bn1.bias", "layer1.1.conv2.weight",
              "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var",
              "layer4.1.bn2.weight", "linear.weight", "linear.bias"]:
        assert k in keys, k
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)
    assert len([k for k in keys if "shortcut" in k]) == 3 * 6  # conv weight + 5 BN tensors


def test_forward_shape_and_num_classes():
    out = ResNet18(num_classes=7)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_cli_prints_summary():
    res = run_script("resnet.py")
    assert res.returncode == 0, res.stderr
    assert "Trainable params: 11,173,962" in res.stdout
    assert "Linear-49" in res.stdout and "[-1, 512, 4, 4]" in res.stdout
    assert format_summary(ResNet18()).splitlines()[-3] == "Total params: 11,173,962"
