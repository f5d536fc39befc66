"""ResNet18 for 32x32 CIFAR images (He et al. 2016, CIFAR variant).

A 3x3 stem with no max-pool keeps the full 32x32 resolution for layer1; the four stages then
halve it to 4x4. Parameter names follow kuangliu/pytorch-cifar (`conv1`, `layer2.0.shortcut.0`,
`linear`, ...) so checkpoints trained with that code load here without renaming.

    python resnet.py        # prints the layer-by-layer summary for a 1x3x32x32 input
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity shortcut, or a 1x1 conv+BN where the shape changes."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, zero_init_residual=False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        if zero_init_residual:  # each block starts as its shortcut (Goyal et al. 2017)
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def ResNet18(num_classes=10, zero_init_residual=False):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, zero_init_residual)


def summary(model, input_size=(1, 3, 32, 32)):
    """Rows of (layer, output shape, own parameter count), in the order the layers finish.

    Same convention as torchsummary, which produced the spec's table: every module except the
    model itself and containers gets a row, and a row counts only that module's own parameters.
    """
    rows, hooks = [], []

    def record(module, inputs, output):
        name = f"{type(module).__name__}-{len(rows) + 1}"
        shape = [-1] + list(output.shape[1:])
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((name, shape, params))

    for module in model.modules():
        if module is not model and not isinstance(module, (nn.Sequential, nn.ModuleList)):
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def format_summary(model, input_size=(1, 3, 32, 32)):
    rows = summary(model, input_size)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"{'Layer (type)':>20}  {'Output Shape':>25}  {'Param #':>15}", "=" * 64]
    lines += [f"{name:>20}  {str(shape):>25}  {params:>15,}" for name, shape, params in rows]
    lines += ["=" * 64, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_summary(ResNet18()))
