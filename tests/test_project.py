"""The README's promises about set-up: two commands, and CI runs the test one verbatim."""
import re

import pytest

from conftest import REPO, run_script


def readme_commands():
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -r requirements.txt && python train.py")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_requirements_are_ranges_of_the_four_runtime_packages():
    lines = [l for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip()]
    assert sorted(re.split(r"[<>=~!]", l)[0] for l in lines) == ["matplotlib", "numpy", "torch", "torchvision"]
    assert not any("==" in l for l in lines)


def test_bench_smoke():
    res = run_script("bench.py", "--steps", "1", "--warmup", "0", "--windows", "1", "--batch-size", "4",
                     "--ref-workers", "0", "--eval-batch-size", "8")
    assert res.returncode == 0, res.stderr
    assert "speed-up:" in res.stdout and "GFLOP forward per image" in res.stdout


def test_counted_flops_match_the_spec_table():
    """Forward FLOPs from bench.py's counter against 2 x params x output pixels of every conv in
    the spec's table (plus the linear layer): about 0.56 GMAC per image."""
    import bench
    from test_resnet import SPEC, spec_table

    if not SPEC.is_file():
        pytest.skip(f"needs the spec's table in {SPEC}")
    expected = 0
    for name, (shape, params) in spec_table().items():
        if name.startswith("Conv2d"):
            expected += 2 * params * shape[2] * shape[3]
        elif name.startswith("Linear"):
            expected += 2 * (params - 10)
    assert bench.forward_flops_per_image("cpu") == expected
    assert 0.55e9 < expected / 2 < 0.57e9
