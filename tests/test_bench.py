"""bench.py's timing paths: the CUDA-graph lever computes what the eager step computes."""
import pytest
import torch

import bench
from conftest import run_script
from resnet import ResNet18


def test_cuda_graph_without_a_gpu_is_one_line():
    res = run_script("bench.py", "--device", "cpu", "--cuda-graph", "--steps", "1", "--windows", "1")
    assert res.returncode == 2 and "--cuda-graph needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("flag", ["--json", "--profile"])
def test_an_output_file_that_is_a_folder_is_refused_before_measuring(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # in-process: it was an IsADirectoryError after the measurement
        bench.main(["--device", "cpu", "--steps", "1", "--windows", "1", flag, str(tmp_path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"{flag} {tmp_path} is a folder; name a file in it" in err


@pytest.mark.parametrize("flag", ["--ref-workers", "--warmup"])
def test_a_negative_count_is_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as stopped:  # --ref-workers -1 was DataLoader's traceback after the measurement
        bench.main(["--device", "cpu", flag, "-1"])
    assert stopped.value.code == 2 and f"argument {flag}: must be at least 0, got -1" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_trains_as_the_eager_step_does():
    """Three warm-up steps on the capture's zero inputs, then two steps on a real batch: the replayed
    graph and eager PyTorch end with the same weights (fp32, so only kernel choice differs)."""
    device = torch.device("cuda")
    x = torch.randn(64, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device=device)
    criterion = torch.nn.CrossEntropyLoss()
    weights = []
    for graphed in (False, True):
        torch.manual_seed(0)
        net = ResNet18().to(device, memory_format=torch.channels_last)
        initial = torch.cat([p.detach().flatten() for p in net.parameters()])
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        if graphed:
            replay = bench.graphed_step(net, criterion, optimizer, 64, None, device)
        else:
            def replay(images, labels):
                optimizer.zero_grad(set_to_none=True)
                criterion(net(images), labels).backward()
                optimizer.step()
            for _ in range(3):
                replay(torch.zeros_like(x), torch.zeros_like(y))
        for _ in range(2):
            replay(x, y)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        assert (weights[-1] - initial).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-3, atol=1e-4)
