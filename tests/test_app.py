"""app.py, the web demo, tried for real: served on a free local port and called through
gradio_client as a browser's page would, then stopped. Skipped where Gradio is not installed."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import data
from conftest import REPO, run_script, script_env
from resnet import ResNet18


def test_without_gradio_app_py_says_so_in_one_sentence():
    res = run_script("-c", "import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['app.py']; "
                     "runpy.run_path('app.py', run_name='__main__')", timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: app.py needs Gradio, an optional extra of this project: " \
                                 "pip install -r requirements-app.txt"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(small_cifar, tmp_path):
    """app.py on a random checkpoint and the 100-image test set, until the test ends."""
    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install -r requirements-app.txt")
    torch.manual_seed(0)
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--ckpt", str(tmp_path / "best.pt"), "--data-dir",
                             str(small_cifar), "--device", "cpu", "--port", str(port)], cwd=REPO,
                            env={**script_env(), "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not start:\n{proc.stdout.read()[-3000:]}")
            time.sleep(1)
    yield url, tmp_path
    proc.terminate()
    proc.wait(timeout=30)


def test_the_page_explains_an_upload_a_test_image_and_the_misclassified(served):
    from gradio_client import Client, handle_file
    from PIL import Image

    url, folder = served
    client = Client(url, verbose=False)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)  # already 32 x 32: the model sees it as is
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / "photo.png")
    label, picture, heat, caption = client.predict(handle_file(str(folder / "photo.png")), "layer3", 0.5, 3,
                                                   api_name="/explain_upload")
    torch.manual_seed(0)
    with torch.no_grad():
        expected = ResNet18().eval()(data.normalize(image[None])).softmax(1)[0]
    top = expected.topk(3)
    assert [c["label"] for c in label["confidences"]] == [data.CLASSES[int(i)] for i in top.indices]
    assert [c["confidence"] for c in label["confidences"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert Image.open(heat).size == Image.open(picture).size == (256, 256)
    assert caption.startswith("Grad-CAM on layer3 for ")

    (folder / "broken.jpg").write_bytes(b"not a picture")
    label, picture, heat, caption = client.predict(handle_file(str(folder / "broken.jpg")), "layer2", 0.5, 3,
                                                   api_name="/explain_upload")
    assert picture is None and heat is None
    assert caption == "broken.jpg is not an image that can be read (JPEG, PNG, GIF or WebP); try another file."

    label, picture, heat, caption = client.predict(7, "layer4", 0.3, 2, api_name="/explain_test")
    assert len(label["confidences"]) == 2 and caption.startswith("Test image 7, a ")

    gallery, summary = client.predict(4, 1, "layer3", 0.5, api_name="/misclassified")
    assert len(gallery) == 4 and all(" taken for " in item["caption"] for item in gallery)
    assert summary.endswith("of 100 test images misclassified; Grad-CAM for the predicted class.")
