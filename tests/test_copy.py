"""Every piece the README's Files table calls copyable, copied as a student would: exactly what the
table names (a file, or named definitions with the import lines they use) into an empty folder,
then used from a fresh interpreter with a model and data of the student's own."""
import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO


def files_table():
    """{file: its 'copy into coursework' cell} from the README."""
    rows = [line.split(" | ") for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| `") and line.count(" | ") == 2]
    return {row[0].strip("| `"): row[2].rstrip(" |") for row in rows}


def named_copy(source_file, names):
    """The named top-level definitions of a file, with the import statements whose names they use."""
    source = (REPO / source_file).read_text()
    tree, lines = ast.parse(source), source.splitlines()
    definitions = [node for node in tree.body if getattr(node, "name", None) in names]
    assert sorted(node.name for node in definitions) == sorted(names), f"{source_file} lacks some of {names}"
    used = {n.id for d in definitions for n in ast.walk(d) if isinstance(n, ast.Name)}
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and {(a.asname or a.name).split(".")[0] for a in node.names} & used]

    def text(node):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(lines[first - 1:node.end_lineno])

    return "\n".join(map(text, imports)) + "\n\n\n" + "\n\n\n".join(map(text, definitions)) + "\n"


def copy_piece(file, folder):
    """Copy what the README names for `file` into folder; returns the module name to import."""
    cell = files_table()[file].split("; the script:")[0]
    names = re.findall(r"`([^`]+)`", cell)
    for name in [n for n in names if n.endswith(".py")]:
        (folder / name).write_text((REPO / name).read_text())
    definitions = [n for n in names if not n.endswith(".py")]
    if not definitions:
        assert cell == f"`{file}` alone", cell
        return file[:-3]
    assert "with the imports they use" in cell, cell
    (folder / "piece.py").write_text(named_copy(file, definitions))
    return "piece"


STUDENT = {  # what a student's own code does with each piece; `piece` is the copied module
    "resnet.py": """
        model = piece.ResNet18(num_classes=100)
        assert sum(p.numel() for p in piece.ResNet18().parameters()) == 11_173_962
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    """,
    "data.py": """
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        gen = torch.Generator().manual_seed(0)
        batch = piece.train_transform(images, gen, use_flip=True, cutout_p=0.5)
        assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
        one = piece.cutout(piece.random_crop(images[0], 4, gen).float(), 16, (0.4, 0.5, 0.6), gen)
        assert one.shape == (3, 32, 32)
        assert [len(y) for _, y in piece.batches(images, torch.arange(8), 3)] == [3, 3, 2]
    """,
    "train.py": """
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 10))
        images, labels = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        scheduler = piece.one_cycle(optimizer, 0.1, total_steps=8)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for epoch in range(2):
            batches = piece.epoch_batches(images, labels, batch_size=16, epoch=epoch,
                                          generator=torch.Generator().manual_seed(1), cutout_p=0.5)
            sums, seen = piece.train_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, scaler, scheduler)
            assert seen == 64 and sums.shape == (2,)
        result = piece.evaluate(model, images, labels, batch_size=32)
        assert result["total"] == 64 and 0 <= result["accuracy"] <= 100 and "accuracy_tta" in result
    """,
    "lr_range.py": """
        class Indexed(torch.utils.data.Dataset):  # a student's dataset that also returns the index
            def __len__(self):
                return 64
            def __getitem__(self, i):
                return torch.randn(3, 8, 8), i % 10, i
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
        loader = torch.utils.data.DataLoader(Indexed(), batch_size=8, shuffle=True)
        result = piece.lr_range_test(model, torch.optim.SGD(model.parameters(), lr=1e-7), nn.CrossEntropyLoss(),
                                     loader, num_iter=20, end_lr=1)
        assert len(result.lrs) >= 2 and result.suggested_lr in result.lrs and result.to_dict()["losses"]
    """,
    "gradcam.py": """
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
        maps, logits = piece.GradCAM(model, "2")(torch.randn(4, 3, 16, 16))
        assert maps.shape == (4, 16, 16) and logits.shape == (4, 10) and maps.min() >= 0 and maps.max() <= 1
        one, _ = piece.GradCAM(model, model[2])(torch.randn(3, 16, 16), 7)
        assert one.shape == (16, 16)
    """,
}


@pytest.mark.parametrize("file", sorted(STUDENT))
def test_the_piece_the_readme_names_works_alone(file, tmp_path):
    module = copy_piece(file, tmp_path)
    script = f"import torch\nimport torch.nn as nn\nimport {module} as piece\n" + textwrap.dedent(STUDENT[file])
    (tmp_path / "student.py").write_text(script + "print('ok')\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "student.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
    copied = sorted(path.name for path in tmp_path.glob("*.py") if path.name != "student.py")
    assert not set(copied) & {"common.py", "plumbing.py"}, copied  # nothing beyond what the README named
