"""app.py, the web demo, tried for real: served on a free local port and called through
gradio_client as a browser's page would, then stopped. Skipped where Gradio is not installed."""
import os
import signal
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
    assert len(res.stderr.strip().splitlines()) == 1 and "pip install -r requirements-app.txt" in res.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ckpt, data_dir, temp):
    """app.py serving ckpt on a free port, its temp files in temp, with Ctrl-C's signal as a terminal
    has it (pytest-xdist's workers ignore SIGINT, and children inherit that); (the process, its
    address) once the page answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--ckpt", str(ckpt), "--data-dir", str(data_dir), "--device",
                             "cpu", "--port", str(port)], cwd=REPO,
                            env={**script_env(), "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(temp)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not start:\n{proc.stdout.read()[-3000:]}")
            time.sleep(1)


@pytest.fixture
def served(small_cifar, tmp_path):
    """app.py on a random checkpoint and the 100-image test set, until the test ends; then stopped
    with SIGTERM, as a service manager stops it, which must leave no temp folder behind."""
    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install -r requirements-app.txt")
    torch.manual_seed(0)
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    temp = tmp_path / "temp"
    temp.mkdir()
    proc, url = launch(tmp_path / "best.pt", small_cifar, temp)
    yield url, tmp_path
    proc.terminate()
    proc.wait(timeout=30)
    assert not list(temp.glob("cifar10-demo-*")), "app.py left its served pictures behind"


@pytest.mark.parametrize("signum, codes", [(signal.SIGTERM, {143}), (signal.SIGINT, {0, 130})])
def test_stopped_while_the_test_set_is_scored_it_exits_cleanly(signum, codes, cifar, tmp_path):
    """A service manager's SIGTERM, or Ctrl-C, while the launch still scores the 10,000 test images
    on the CPU: torch's forward in that thread aborted the exit ('terminate called', SIGABRT). Ctrl-C
    exits with 0 when Gradio's serving loop takes it, 130 when it lands just before (a busy machine)."""
    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install -r requirements-app.txt")
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    proc, _ = launch(tmp_path / "best.pt", cifar, tmp_path)
    proc.send_signal(signum)
    try:
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()  # a process that did not stop must not outlive the test
    assert "Test set scored" not in out, "the scoring had finished: nothing was tested"
    assert proc.returncode in codes and "terminate called" not in out, out[-2000:]
    assert not list(tmp_path.glob("cifar10-demo-*")), "app.py left its served pictures behind"


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
    assert caption.startswith("photo.png. Grad-CAM on layer3 for ")

    (folder / "broken.jpg").write_bytes(b"not a picture")
    label, picture, heat, caption = client.predict(handle_file(str(folder / "broken.jpg")), "layer2", 0.5, 3,
                                                   api_name="/explain_upload")
    assert picture is None and heat is None
    assert caption == "broken.jpg is not an image that can be read (JPEG, PNG, GIF or WebP); try another file."

    label, picture, heat, caption = client.predict(7, "layer4", 0.3, 2, api_name="/explain_test")
    assert len(label["confidences"]) == 2 and caption.startswith("Test image 7, a")
    for index in (None, 100, -1):  # the served test set has 100 images
        label, picture, heat, caption = client.predict(index, "layer3", 0.5, 3, api_name="/explain_test")
        assert picture is None and caption == "Pick a test image by its index: a whole number from 0 to 99."

    gallery, summary = client.predict(4, 1, "layer3", 0.5, api_name="/misclassified")
    assert len(gallery) == 4 and all(" → " in item["caption"] for item in gallery)
    assert summary.endswith("of 100 test images misclassified; each image beside its Grad-CAM for the predicted "
                            "class.")
    item = gallery[0]["image"]
    assert Image.open(item if isinstance(item, str) else item["path"]).size == (256 + 16 + 256, 256)  # image, map
    picks = {seed: [item["caption"] for item in client.predict(4, seed, "layer3", 0.5, api_name="/misclassified")[0]]
             for seed in (5, 2**32 + 5, 2**70)}  # 2**70 was an overflow in the server, and "Error" on the page
    assert picks[5] == picks[2**32 + 5] and len(picks[2**70]) == 4  # any whole number seeds, modulo 2**32


def test_every_control_re_runs_what_the_page_shows(small_cifar, tmp_path):
    """The layer, opacity and class-count controls call explain_shown with what the first tab shows:
    the upload after an upload, the test image after the button; a broken or empty index says the range."""
    from PIL import Image

    import app

    torch.manual_seed(0)
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    demo = app.Demo(str(tmp_path / "best.pt"), str(small_cifar), "cpu")
    Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(tmp_path / "cat.png")
    for layer, alpha, top_k in [("layer2", 0.3, 2), ("layer4", 0.9, 5)]:
        upload = demo.explain_upload(str(tmp_path / "cat.png"), layer, alpha, top_k)
        again = demo.explain_shown("upload", str(tmp_path / "cat.png"), 3, layer, alpha, top_k)
        assert upload[0] == again[0] and len(again[0]) == top_k and upload[2] == again[2]  # the same PNG
        assert again[3].startswith(f"cat.png. Grad-CAM on {layer}")
        test = demo.explain_shown("test", str(tmp_path / "cat.png"), 3, layer, alpha, top_k)
        assert test[3].startswith("Test image 3, ") and test[4] == "test"
    assert demo.explain_shown("upload", None, 5, "layer3", 0.5, 3)[3].startswith("Test image 5, ")
    demo.PATIENCE = 0.2
    with demo.probs_lock:  # the launch's scoring still under way: a sentence, not a wait
        gallery, summary = demo.misclassified(4, 0, "layer3", 0.5)
    assert gallery == [] and summary.startswith("The test set is still being scored once at launch (starting)")
    gallery, summary = demo.misclassified(4, 0, "layer3", 0.5)
    assert len(gallery) == 4 and "of 100 test images misclassified" in summary
    assert app.with_article("airplane") == "an airplane" and app.with_article("cat") == "a cat"


def test_a_busy_port_is_one_sentence_about_port(served):
    url, folder = served
    port = url.rstrip("/").rsplit(":", 1)[1]
    res = run_script("app.py", "--ckpt", folder / "best.pt", "--device", "cpu", "--port", port, timeout=180)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"cannot serve on port {port}, it is busy; pass --port with a free one" in res.stderr


def test_several_clients_at_once_get_the_answers_one_client_gets_alone(served):
    """results/app/load.py's load test, bounded to 15 s with 3 clients: every answer (top classes,
    caption, overlay pixels) equals the one asked alone, and none fails."""
    sys.path.insert(0, str(REPO / "results" / "app"))
    import load
    from PIL import Image

    url, folder = served
    Image.fromarray(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy()).save(folder / "upload.png")
    result = load.load(url, str(folder / "upload.png"), clients=3, seconds=15)
    assert result["errors"] == [] and result["wrong"] == [] and result["answers"] >= 3


@pytest.mark.parametrize("flag", [["--port", "99999"], ["--port", "0"]])
def test_a_port_out_of_range_is_a_usage_error(flag, capsys):
    import app

    with pytest.raises(SystemExit) as stopped:  # in-process: an OverflowError from bind() fails the test
        app.main(["--ckpt", "best.pt", *flag])
    assert stopped.value.code == 2 and "argument --port: must be" in capsys.readouterr().err


def test_export_into_a_missing_folder_or_onto_a_folder_is_one_sentence(tmp_path):
    import app

    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    for target, reason in ((tmp_path / "missing" / "model.pt", "No such file or directory"),
                           (tmp_path, "Is a directory")):
        with pytest.raises(SystemExit) as stopped:
            app.main(["--ckpt", str(tmp_path / "best.pt"), "--export", str(target)])
        assert stopped.value.code == f"error: cannot write {target} ({reason}); choose another --export path"
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]  # no temp file left behind


def test_export_writes_the_weights_alone_and_the_demo_serves_them(cifar, tmp_path):
    """A train.py checkpoint carries SGD's momentum (about 89 MB); the exported file keeps what
    serving needs, in about half, and explains exactly as the checkpoint does."""
    from test_train import tiny_fit

    import app

    tiny_fit(cifar, tmp_path / "run", epochs=1, limit_train=96, limit_test=50)
    res = run_script("app.py", "--ckpt", tmp_path / "run" / "best.pt", "--export", tmp_path / "model.pt", timeout=120)
    assert res.returncode == 0 and "wrote" in res.stdout, res.stderr
    full, exported = (os.path.getsize(tmp_path / name) for name in ("run/best.pt", "model.pt"))
    assert exported < 0.6 * full and "optimizer" not in torch.load(tmp_path / "model.pt", weights_only=True)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    answers = [app.Demo(str(path), str(cifar), "cpu").explain(image, "layer3", 0.5, 3)
               for path in (tmp_path / "run" / "best.pt", tmp_path / "model.pt")]
    assert answers[0][0] == answers[1][0]  # the same top classes
    assert os.path.basename(answers[0][2]) == os.path.basename(answers[1][2])  # the same overlay (named by content)
