"""Does the CPU train faster in the default NCHW layout than in train.py's channels_last?
ResNet18 in fp32, one SGD step at a time on random data, each layout timed in alternation.

    python results/cpu-avx2/layout.py                       # this CPU's own kernels
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python results/cpu-avx2/layout.py   # as without AVX-512
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from resnet import ResNet18  # noqa: E402

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def rates(layout, batch_size=64, steps=6, eval_batch_size=512):
    """(training images/s over `steps` steps after one untimed step, eval images/s of one batch)."""
    torch.manual_seed(0)
    net = ResNet18().to(memory_format=layout)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=layout), torch.randint(0, 10, (batch_size,))

    def step():
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train = steps * batch_size / (time.perf_counter() - start)
    net.eval()
    x = torch.randn(eval_batch_size, 3, 32, 32).contiguous(memory_format=layout)
    with torch.no_grad():
        net(x)
        start = time.perf_counter()
        net(x)
    return train, eval_batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    found = {name: [] for name in LAYOUTS}
    for _ in range(3):
        for name, layout in LAYOUTS.items():
            found[name].append([round(r, 1) for r in rates(layout)])
    print(json.dumps({"kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "batch": 64, "train_and_eval_images_per_s": found}))
