"""The README's promises about set-up: two commands, and CI runs the test one verbatim."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_script, script_env


def readme_commands():
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


@pytest.mark.docs
def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -r requirements.txt && python train.py")
    assert "pytest" in commands[1]


@pytest.mark.docs
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


def test_bench_refuses_an_output_path_it_could_not_write_before_running():
    res = run_script("bench.py", "--steps", "1", "--profile", "no/such/folder/profile.json", timeout=60)
    assert res.returncode == 2
    assert "--profile no/such/folder/profile.json: its folder does not exist" in res.stderr
    assert "Traceback" not in res.stderr and "bench on" not in res.stdout


def test_bench_profile_sees_every_layer_of_the_spec_table(tmp_path):
    """One profiled step runs each of the spec's Conv2d and BatchNorm2d layers once forward and
    once backward, and the convolutions, nearly all of the FLOPs, top the time."""
    import bench
    from test_resnet import SPEC, spec_table

    if not SPEC.is_file():
        pytest.skip(f"needs the spec's table in {SPEC}")
    layers = [name.split("-")[0] for name in spec_table()]
    bench.main(["--device", "cpu", "--steps", "2", "--warmup", "1", "--windows", "1", "--batch-size", "16",
                "--skip-reference", "--eval-batch-size", "16", "--profile", str(tmp_path / "profile.json")])
    profile = json.loads((tmp_path / "profile.json").read_text())
    calls = {op["name"]: op["calls_per_step"] for op in profile["ops"]}
    assert calls["aten::convolution_backward"] == layers.count("Conv2d") == 20
    assert calls["aten::native_batch_norm_backward"] == layers.count("BatchNorm2d") == 20
    assert "convolution" in profile["ops"][0]["name"]
    assert [op["ms_per_step"] for op in profile["ops"]] == sorted((op["ms_per_step"] for op in profile["ops"]),
                                                                    reverse=True)
    assert sum(op["share"] for op in profile["ops"]) == pytest.approx(1)


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


def project_imports(path):
    """The project modules a script imports, read from its source (ast), at any depth."""
    import ast

    modules = {p.stem for p in REPO.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & modules


def test_imports_run_one_way():
    """resnet and data stand alone; common needs at most those; gradcam and lr_range never need
    train.py, so each copies with common.py, data.py and resnet.py; plumbing.py imports neither the
    recipe in train.py nor the range test (train.py runs it)."""
    allowed = {"resnet": set(), "data": set(), "common": {"data", "resnet"},
               "lr_range": {"common", "data", "resnet"}, "gradcam": {"common", "data", "resnet"},
               "plumbing": {"common", "data", "resnet"},
               "train": {"common", "data", "resnet", "lr_range", "plumbing"},
               "bench": {"common", "data", "resnet", "train"}, "app": {"common", "data", "resnet", "gradcam"}}
    for name, may in allowed.items():
        assert project_imports(REPO / f"{name}.py") <= may, name


def test_no_function_is_longer_than_60_lines():
    import ast

    for path in REPO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"


def readme_block(marker, language):
    """The first fenced block of `language` after `marker` in the README, as written there."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"```{language}\n", text.index(marker)) + len(f"```{language}\n")
    return textwrap.dedent(text[start:text.index("```", start)])


@pytest.fixture
def newcomer(cifar, tmp_path):
    """A fresh folder holding the project's scripts and ./data, and the environment to run them in."""
    for script in REPO.glob("*.py"):
        (tmp_path / script.name).symlink_to(script)
    (tmp_path / "data").symlink_to(cifar)
    return tmp_path, {**script_env(), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


@pytest.mark.slow
def test_readme_try_it_lines_run_as_written(newcomer):
    """A newcomer's first minutes: the 'Try it' lines one after another, exactly as the README has
    them."""
    folder, env = newcomer
    lines = readme_block("## Try it in a few minutes on a CPU", "bash").splitlines()
    assert [line.split()[1] for line in lines] == ["train.py", "gradcam.py", "lr_range.py"]
    for line in lines:
        res = subprocess.run(line, shell=True, cwd=folder, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, (line, res.stderr[-3000:])
    quick = folder / "runs" / "quick"
    assert 15 <= json.loads((quick / "metrics.json").read_text())["final_test_acc"] <= 35  # the README's range
    for name in ["best.pt", "curves.png", "misclassified.png", "gradcam.png", "confusion.png", "lr_range/lr_range.png"]:
        assert (quick / name).is_file(), name


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written(newcomer):
    """The 'From Python' snippet, exactly as the README has it (apart from the 'Try it' test, so the
    two run side by side)."""
    folder, env = newcomer
    res = subprocess.run([sys.executable, "-c", readme_block("**From Python**", "python")], cwd=folder,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (folder / "runs" / "nb" / "gradcam.png").is_file()


@pytest.mark.docs
def test_readme_and_docstring_counts_match_the_code():
    """Numbers the README and gradcam.py state, counted from the code: the images the default batch
    drops each epoch, and how many of the 17 main-path convolutions layer3's map comes after."""
    import torch

    import gradcam
    from resnet import ResNet18

    dropped = 50_000 % 512
    assert f"at batch 512, {dropped} of the 50,000 images" in (REPO / "README.md").read_text()
    names = [name for name, m in ResNet18().named_modules() if isinstance(m, torch.nn.Conv2d)
             and "shortcut" not in name]
    upto_layer3 = sum(not name.startswith("layer4") for name in names)
    assert f"after {upto_layer3} of the {len(names)} convolutions on the main path" in gradcam.__doc__


@pytest.mark.docs
def test_readme_results_match_the_committed_runs():
    """Every number of the H200 table in results/README.md and of the README's two rows, the gap to
    the assignment's recipe and the auto run's accuracy, against results/gpu/summary.json and the
    run's metrics.json (epoch 20)."""
    readme, results = (REPO / "README.md").read_text(), (REPO / "results" / "README.md").read_text()
    batch = json.loads((REPO / "results/gpu/summary.json").read_text())["batches"]["h200-2026-11-30"]
    rows = {"peak LR 0.4": "lr0.4", "batch 256": "b256", "label smoothing 0.2": "ls0.2", "default of that day":
            "default", "no decay on BN": "nobnwd", "all four levers": "levers", "alternating flips": "altflip",
            "the assignment's recipe": "spec-recipe"}
    readme_rows = {"the default": "lr0.4", "the assignment's recipe": "spec-recipe"}
    for text, table in ((results, rows), (readme, readme_rows)):
        for start, recipe in table.items():
            row = next(line for line in text.splitlines() if line.startswith(("| " + start, "| **" + start)))
            for key in ("final_test_acc", "final_test_acc_tta"):
                acc = batch[recipe][key]
                assert f"{acc['mean']:.2f}%" in row and f"({acc['min']:.2f} to {acc['max']:.2f})" in row, (recipe, key)
    gap = batch["lr0.4"]["final_test_acc_tta"]["mean"] - batch["spec-recipe"]["final_test_acc"]["mean"]
    assert f"scores {gap:.2f} points above" in readme and f"tested **{gap:.2f}\npoints**" in results
    auto = json.loads((REPO / "results/gpu/h100/spec-recipe-auto/metrics.json").read_text())
    peak = f"{auto['max_lr']:.1e}".replace("e-0", "e-")  # 1.7e-4, as results/README.md writes it
    assert f"got a peak of {peak} and {auto['final_test_acc']:.2f}%" in results.replace("\n", " ")
    gap = batch["spec-recipe"]["final_test_acc"]["mean"] - auto["final_test_acc"]
    assert f"tested {gap:.1f}\npoints lower" in readme


@pytest.mark.docs
def test_results_cpu_times_match_the_committed_measurements():
    """The quick block's rows measured here, against results/cpu-fp32/ and results/cpu-avx2/ (each
    command's wall seconds in times.txt, the run's metrics.json)."""
    rows = {"AMD EPYC with AVX512-BF16, bf16": ("cpu-fp32", "default"), "the same EPYC in fp32 (": ("cpu-fp32", "fp32"),
            "the same EPYC in fp32 with AVX2": ("cpu-avx2", "fp32")}
    text = (REPO / "results" / "README.md").read_text().splitlines()
    for start, (folder, precision) in rows.items():
        row = next(line for line in text if line.startswith("| " + start)).split(" | ")
        times = dict(line.split() for line in (REPO / "results" / folder / "times.txt").read_text().splitlines())
        metrics = json.loads((REPO / "results" / folder / f"quick-{precision}-metrics.json").read_text())
        expected = [f"{float(times[f'quick-{step}-{precision}']):.0f} s" for step in ("train", "gradcam", "lr-range")]
        assert [row[-4], row[-2], row[-1].rstrip(" |")] == expected, start
        assert row[-3] == f"{metrics['final_test_acc']:.1f}%", start
