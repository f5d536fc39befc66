"""Shared fixtures: CIFAR-10 rebuilt from ../shared/cifar10 into temp folders, once per session."""
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: one thread each, in the
# worker and in every script it runs (script_env), set before anything imports torch.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# What Gradio and gradio_client write in the tests' own processes goes to a folder removed at their
# exit, not to /tmp/gradio (app.py's own server keeps its files in its served folder).
GRADIO_TEMP = tempfile.TemporaryDirectory(prefix="tests-gradio-")
os.environ["GRADIO_TEMP_DIR"] = GRADIO_TEMP.name

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIFAR10_SHARED", REPO.parent / "shared" / "cifar10"))
sys.path.insert(0, str(REPO))


def _build(root, *limits):
    script = SHARED / "build_batches.py"
    if not script.is_file():
        pytest.skip(f"needs {SHARED} (the JPEG copy of CIFAR-10 and build_batches.py)")
    subprocess.run([sys.executable, str(script), str(root), *limits], check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """500 train / 100 test images in the official layout (not a full set)."""
    return _build(tmp_path_factory.mktemp("small"), "--limit-train", "500", "--limit-test", "100")


@pytest.fixture(scope="session")
def cifar(tmp_path_factory):
    """The full set in the official layout (about 5 s to build); tests use --limit-* on it."""
    return _build(tmp_path_factory.mktemp("full"))


def script_env():
    """The environment scripts run in: unbuffered, and one thread count for every run (torchrun
    would otherwise set 1 and a plain run take all cores, and CPU kernels sum in another order)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def run_script(*args, timeout=600, **kw):
    """Run one of the top-level scripts in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=script_env(), **kw)


@pytest.fixture(autouse=True)
def signal_handlers_put_back():
    """A script's main() run in-process installs its SIGTERM handler: no test inherits another's."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of half a minute or more, started first")
    config.addinivalue_line("markers", "docs: checks the README or committed results against the code and data")


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort keeps the rest in order), so that under -n auto no
    worker is left running one of them alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
