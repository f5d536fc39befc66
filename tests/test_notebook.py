"""The notebook runs top to bottom as a Colab user runs it, on a small setting, in a real kernel."""
import http.server
import re
import subprocess
import sys
import threading

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "cifar10_resnet18.ipynb"
FIGURES = 5  # LR range test, curves, misclassified images, Grad-CAM, confusion matrix


def settings_cell(nb):
    return next(cell for cell in nb.cells if cell.cell_type == "code")


def with_settings(source, **values):
    for name, value in values.items():
        source, found = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
        assert found == 1, name
    return source


def pngs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if "image/png" in o.get("data", {})]


@pytest.mark.docs
def test_first_cell_holds_the_assignment_settings():
    source = settings_cell(nbformat.read(NOTEBOOK, as_version=4)).source
    for line in ["EPOCHS = 20", "LIMIT_TRAIN = None", "LIMIT_TEST = None", 'DATA_DIR = "./data"']:
        assert re.search(rf"^{re.escape(line)}(\s|$)", source, flags=re.M), line


@pytest.mark.docs
def test_committed_notebook_shows_the_figures_of_a_real_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert len(pngs(nb)) == FIGURES
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "Best test accuracy" in text and "EPOCHS=20, LIMIT_TRAIN=None, LIMIT_TEST=None" in text
    progress = [o["data"]["text/plain"] for o in outputs if o.get("data", {}).get("text/plain", "").startswith("Epoch")]
    assert [line.split("  ")[0] for line in progress] == [f"Epoch {e}/20" for e in range(1, 21)]
    assert not [line for line in text.splitlines() if "/work/" in line or "/tmp/" in line or "/dev/" in line]


class AskForPassword(http.server.BaseHTTPRequestHandler):
    """What GitHub answers for a repository that does not exist: a request for a password."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_wrong_repo_url_fails_at_once_with_the_advice(tmp_path):
    """The fetch cell in an empty folder (a fresh Colab session) with a wrong REPO_URL: git must not
    wait for a password that nobody will type (Jupyter started from a terminal gives it one)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AskForPassword)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fetch = next(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells
                 if cell.cell_type == "code" and "git" in cell.source and "clone" in cell.source)
    url = f"http://127.0.0.1:{server.server_port}/YOUR-ACCOUNT/cifar10-resnet18.git"
    try:
        res = subprocess.run([sys.executable, "-c", f"REPO_URL = {url!r}\n{fetch}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        server.shutdown()
    assert res.returncode == 1 and "terminal prompts disabled" in res.stderr, res.stderr
    assert f"could not clone {url}; set REPO_URL in the first cell" in res.stderr


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(cifar, tmp_path):
    """Run where the project's scripts are, with a relative OUT as the notebook has it: what it
    prints names no folder of this machine, and training shows one progress line an epoch."""
    project = tmp_path / "project"
    project.mkdir()
    for script in REPO.glob("*.py"):
        (project / script.name).symlink_to(script)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = settings_cell(nb)
    cell.source = with_settings(cell.source, EPOCHS=2, LIMIT_TRAIN=128, LIMIT_TEST=50, DATA_DIR=str(cifar),
                                OUT="runs/nb", BATCH_SIZE=32, LR_RANGE_STEPS=8)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(project)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len(pngs(nb)) == FIGURES
    text = "".join(o.get("text", "") for o in outputs)
    assert "Total params: 11,173,962" in text and "steepest slope at" in text
    progress = [o["data"]["text/plain"] for o in outputs if o.output_type == "display_data"
                and o["data"].get("text/plain", "").startswith("Epoch ")]
    assert [line[:len("Epoch 1/2  step 4/4  loss")] for line in progress] == \
        ["Epoch 1/2  step 4/4  loss", "Epoch 2/2  step 4/4  loss"], progress
    assert str(tmp_path) not in text, [line for line in text.splitlines() if str(tmp_path) in line]
    for name in ["best.pt", "curves.png", "misclassified.png", "gradcam.png", "confusion.png", "confusion.json"]:
        assert (project / "runs" / "nb" / name).is_file(), name
