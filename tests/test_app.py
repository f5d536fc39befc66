"""app.py, the web demo, tried for real: served on a free local port and called through
gradio_client as a browser's page would, then stopped. Skipped where Gradio is not installed."""
import inspect
import os
import re
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


def launch(ckpt, data_dir, temp, cwd):
    """app.py serving ckpt on a free port from the folder cwd, its temp files in temp, its output in
    cwd/app.log, with Ctrl-C's signal as a terminal has it (pytest-xdist's workers ignore SIGINT, and
    children inherit that); (the process, its address) once the page answers."""
    port = free_port()
    with open(cwd / "app.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--ckpt", str(ckpt), "--data-dir", str(data_dir),
                                 "--device", "cpu", "--port", str(port)], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**script_env(), "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(temp)},
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
                pytest.fail(f"app.py did not start:\n{served_log(cwd)[-3000:]}")
            time.sleep(1)


def served_log(folder):
    return (folder / "app.log").read_text()


@pytest.fixture
def served(small_cifar, tmp_path):
    """app.py on a random checkpoint and the 100-image test set, until the test ends; then stopped
    with SIGTERM, as a service manager stops it, which must leave nothing behind: no temp folder
    (its pictures, uploads and Gradio's copies of them) and no file where it ran."""
    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install -r requirements-app.txt")
    torch.manual_seed(0)
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    temp, cwd = tmp_path / "temp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    proc, url = launch(tmp_path / "best.pt", small_cifar, temp, cwd)
    yield url, tmp_path
    proc.terminate()
    assert proc.wait(timeout=30) == 143
    left = [path.name for path in temp.iterdir() if not path.name.startswith("torchinductor_")]  # torch's own cache
    assert left == [], f"app.py left temp files behind: {left}"
    assert [path.name for path in cwd.iterdir()] == ["app.log"], "app.py left files where it ran"


@pytest.mark.parametrize("signum, codes", [(signal.SIGTERM, {143}), (signal.SIGINT, {0, 130})])
def test_stopped_while_the_test_set_is_scored_it_exits_cleanly(signum, codes, cifar, tmp_path):
    """A service manager's SIGTERM, or Ctrl-C, while the launch still scores the 10,000 test images
    on the CPU: torch's forward in that thread aborted the exit ('terminate called', SIGABRT). Ctrl-C
    exits with 0 when Gradio's serving loop takes it, 130 when it lands just before (a busy machine)."""
    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install -r requirements-app.txt")
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    proc, _ = launch(tmp_path / "best.pt", cifar, tmp_path, tmp_path)
    proc.send_signal(signum)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()  # a process that did not stop must not outlive the test
    out = served_log(tmp_path)
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

    cards, summary = client.predict(4, 1, "layer3", 0.5, api_name="/misclassified")
    assert cards.count("<figure") == 4 and cards.count("<figcaption") == 4 and cards.count(" → ") == 4
    assert cards.count('src="data:image/png;base64,') == 8  # each image beside its map, inline: nothing cached
    assert summary.startswith(tuple("0123456789")) and "of 100 test images misclassified" in summary
    picks = {seed: re.findall("<figcaption[^>]*>(.*?)</figcaption>", client.predict(
        4, seed, "layer3", 0.5, api_name="/misclassified")[0]) for seed in (5, 2**32 + 5, 2**70)}
    assert picks[5] == picks[2**32 + 5] and len(picks[2**70]) == 4  # any whole number seeds, modulo 2**32


def test_no_value_a_browser_can_send_ends_in_a_traceback(served, capfd):
    """Every control, sent through gradio_client with values out of range, not whole, empty or of
    another type: one sentence where the caption or the summary goes, no Gradio error, and no
    traceback in the server's log."""
    from gradio_client import Client

    url, folder = served
    client = Client(url, verbose=False)
    for index, layer, alpha, top_k, says in [
            (3.7, "layer3", 0.5, 3, "Pick a test image by its index"),  # it showed image 4 in silence
            (None, "layer3", 0.5, 3, "Pick a test image by its index"),
            (3, "layer3", 2, 3, "opacity is a number from 0 to 1"), (3, "layer3", -0.5, 3, "opacity is a number"),
            (3, "layer3", None, 3, "opacity is a number"), (3, "layer3", 0.5, 0, "a whole number from 1 to 10"),
            (3, "layer3", 0.5, 11, "a whole number from 1 to 10"), (3, "layer3", 0.5, "many", "a whole number"),
            (3, "fc", 0.5, 3, "Pick a Grad-CAM layer"), (3, None, 0.5, 3, "Pick a Grad-CAM layer")]:
        label, picture, heat, caption = client.predict(index, layer, alpha, top_k, api_name="/explain_test")
        assert picture is None and says in caption, (index, layer, alpha, top_k, caption)
    for count, seed, alpha in [(0, 1, 0.5), (51, 1, 0.5), (None, 1, 0.5), (4, 1.5, 0.5), (4, None, 0.5), (4, 1, 7)]:
        cards, summary = client.predict(count, seed, "layer3", alpha, api_name="/misclassified")
        assert cards == "" and ("a whole number" in summary or "opacity" in summary), (count, seed, summary)
    label, picture, heat, caption = client.predict(None, "layer3", 0.5, 3, api_name="/explain_upload")
    assert caption == "Upload an image (JPEG, PNG, GIF or WebP) first."
    log = served_log(folder / "cwd")
    assert "Traceback" not in log and "Error" not in log, log[-3000:]


def test_every_control_re_runs_what_the_page_shows(small_cifar, tmp_path, monkeypatch):
    """The page's own wiring, called as Gradio calls it: a change of the layer or the opacity runs
    Grad-CAM for the tab on screen only (counted), on what that tab shows (the upload after an
    upload, the test image after the button); the misclassified tab fills itself once the test set
    is scored, polling until then."""
    gr = pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install -r requirements-app.txt")
    from PIL import Image

    import app
    import gradcam

    torch.manual_seed(0)
    torch.save({"model": ResNet18().state_dict()}, tmp_path / "best.pt")
    demo = app.Demo(str(tmp_path / "best.pt"), str(tmp_path), str(small_cifar), "cpu")
    page, calls, explain = app.build_page(demo, gr), [], gradcam.GradCAM.__call__
    monkeypatch.setattr(gradcam.GradCAM, "__call__", lambda *a, **k: calls.append(1) or explain(*a, **k))
    Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(tmp_path / "cat.png")
    upload = {"path": str(tmp_path / "cat.png"), "orig_name": "cat.png"}
    named = {block.label: block for block in page.blocks.values() if getattr(block, "label", None)}

    def change(label, values):
        """What the page runs when the control called label changes: every listener, its outputs."""
        answers = []
        for dependency in page.fns.values():
            if (named[label]._id, "change") in dependency.targets:
                answers.append(dependency.fn(*[values.get(getattr(c, "label", None) or c, c.value)
                                               for c in dependency.inputs]))
        return answers

    demo.predictions()
    for tab, source in (("any", "upload"), ("any", "test"), ("wrong", "upload")):
        calls.clear()
        values = {"Grad-CAM layer": "layer2", "Heatmap opacity": 0.3, "Classes to list": 2, "Upload an image": upload,
                  "Or a test image: its index (0 to 9,999)": 3, "Images": 4, "Seed of the random pick": 0}
        state = {block: {"any": tab, "test": source}.get(block.value, block.value) for block in page.blocks.values()
                 if isinstance(block, gr.State)}
        answers = change("Grad-CAM layer", {**values, **state})
        assert len(calls) == 1, (tab, source, len(calls))  # one tab's Grad-CAM, not both
        shown = [a for a in answers if not isinstance(a[0], dict) or a[0].get("__type__") != "update"]
        if tab == "any":
            assert shown[0][3].startswith("cat.png. Grad-CAM on layer2" if source == "upload" else "Test image 3, ")
        else:
            assert shown[0][0].count("<figure") == 4 and "of 100 test images misclassified" in shown[0][1]
    with demo.probs_lock:  # the launch's scoring still under way: a sentence and the timer on, not a wait
        demo.probs = None
        cards, summary, timer = demo.misclassified_shown("wrong", 4, 0, "layer3", 0.5)
    assert cards == "" and summary.startswith("The test set is being scored once at launch (")
    assert timer.active and "this tab fills itself" in summary
    cards, summary, timer = demo.misclassified_shown("wrong", 4, 0, "layer3", 0.5)
    assert cards.count("<figure") == 4 and not timer.active
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
    answers = [app.Demo(str(path), str(tmp_path), str(cifar), "cpu").explain(image, "layer3", 0.5, 3)
               for path in (tmp_path / "run" / "best.pt", tmp_path / "model.pt")]
    assert answers[0][0] == answers[1][0]  # the same top classes
    assert os.path.basename(answers[0][2]) == os.path.basename(answers[1][2])  # the same overlay (named by content)


def test_the_launch_scores_the_test_set_as_training_tests_it_and_says_how_far(small_cifar, tmp_path, monkeypatch,
                                                                                capsys):
    """The misclassified tab's predictions come in train.py's test pass's batches and precision, with
    a progress line after every batch from the first on, and the time it took in the log."""
    import app
    import common
    import gradcam
    import train

    torch.manual_seed(0)
    model = ResNet18().eval()
    images = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8)
    lines = []
    gradcam.predict(model, images[:2500], data.MEAN, data.STD, progress=lambda line, **kw: lines.append(line))
    assert lines == [f"scored {n} test images" for n in ("1,024/2,500", "2,048/2,500", "2,500/2,500")]
    torch.save({"model": model.state_dict()}, tmp_path / "best.pt")
    demo = app.Demo(str(tmp_path / "best.pt"), str(tmp_path), str(small_cifar), "cpu")
    asked, predict = [], gradcam.predict
    monkeypatch.setattr(gradcam, "predict", lambda *a, **kw: asked.append(kw) or predict(*a, **kw))
    app.score_test_set(demo)
    assert asked[0]["amp_dtype"] == common.amp_dtype(torch.device("cpu"))
    assert train.build_parser().get_default("eval_batch_size") == 1024
    assert inspect.signature(predict).parameters["batch_size"].default == 1024
    out = capsys.readouterr().out
    assert re.search(r"Test set scored in \d+ s: the misclassified tab answers in seconds", out), out
