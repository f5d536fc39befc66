import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import gradcam
from conftest import run_script
from gradcam import GradCAM, cam_from
from resnet import ResNet18


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = ResNet18()
    net.train()  # populate BN running stats so eval mode is not degenerate
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 32, 32))
    return net.eval()


def reference_cam(model, x, classes, layer):
    """Grad-CAM from the paper's formula, with torch.autograd.grad and no hooks."""
    out = F.relu(model.bn1(model.conv1(x)))
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    target = None
    for name, stage in zip(["layer1", "layer2", "layer3", "layer4"], stages):
        out = stage(out)
        if name == layer:
            target = out
    logits = model.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
    score = logits[torch.arange(len(x)), classes].sum()
    (grad,) = torch.autograd.grad(score, target)
    alpha = grad.mean(dim=(2, 3))
    maps = torch.relu(torch.einsum("nk,nkhw->nhw", alpha, target.detach()))
    maps = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    result = torch.zeros_like(maps)
    for i, m in enumerate(maps):
        if m.max() > m.min():
            result[i] = (m - m.min()) / (m.max() - m.min())
    return result, logits.detach()


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
@pytest.mark.parametrize("which", ["predicted", "true"])
def test_matches_independent_autograd_computation(model, layer, which):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32)
    labels = torch.randint(0, 10, (6,))
    with torch.no_grad():
        predicted = model(x).argmax(1)
    classes = predicted if which == "predicted" else labels
    expected, expected_logits = reference_cam(model, x, classes, layer)
    maps, logits = GradCAM(model, layer)(x, None if which == "predicted" else labels)
    assert maps.shape == (6, 32, 32)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert torch.allclose(maps, expected, atol=1e-4)
    assert maps.min() >= 0 and maps.max() <= 1


def test_hooks_removed_and_model_unchanged(model):
    model.linear.weight.grad = torch.ones_like(model.linear.weight)
    model.conv1.weight.requires_grad_(False)
    try:
        GradCAM(model, "layer3")(torch.randn(2, 3, 32, 32))
        assert len(model.layer3._forward_hooks) == 0
        assert not model.training
        assert torch.equal(model.linear.weight.grad, torch.ones_like(model.linear.weight))
        assert model.layer1[0].conv1.weight.grad is None
        assert not model.conv1.weight.requires_grad and model.bn1.weight.requires_grad
    finally:
        model.conv1.weight.requires_grad_(True)
        model.linear.weight.grad = None


def test_a_model_in_train_mode_is_refused_and_left_as_it_was(model):
    """Switching the mode would change shared state under another thread's feet, and train mode
    would explain batch statistics: one sentence instead."""
    model.train()
    try:
        with pytest.raises(ValueError, match=r"needs the model in eval mode: call model.eval\(\) first"):
            GradCAM(model, "layer3")(torch.randn(2, 3, 32, 32))
        assert model.training
    finally:
        model.eval()


def test_several_threads_on_one_model_get_exactly_the_sequential_maps(model):
    """Eight threads explain different images with one model and one GradCAM at once: each gets
    the map it would get alone (checked against autograd), and no flag of the model changes."""
    import threading

    torch.manual_seed(3)
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(8)]
    classes = [torch.randint(0, 10, (2,)) for _ in range(8)]
    expected = [reference_cam(model, x, c, "layer3")[0] for x, c in zip(inputs, classes)]
    cam, results, start = GradCAM(model, "layer3"), [[] for _ in range(8)], threading.Barrier(8)
    flags = [p.requires_grad for p in model.parameters()]

    def explain(i):
        start.wait()
        results[i] += [cam(inputs[i], classes[i])[0] for _ in range(5)]
    threads = [threading.Thread(target=explain, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for maps, want in zip(results, expected):
        assert len(maps) == 5
        for got in maps:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert len(model.layer3._forward_hooks) == 0 and all(p.grad is None for p in model.parameters())


def test_a_module_the_forward_runs_twice_is_refused_and_its_blocks_match_autograd():
    """torchvision's BasicBlock calls its one ReLU twice: no single map belongs to it."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="ran 2 times in one forward"):
        GradCAM(net, "layer2.0.relu")(x)
    maps, logits = GradCAM(net, "layer2.0")(x, 4)
    captured = []
    hook = net.layer2[0].register_forward_hook(lambda m, i, o: captured.append(o))
    out = net(x)
    hook.remove()
    (grad,) = torch.autograd.grad(out[:, 4].sum(), captured[0])
    torch.testing.assert_close(maps, cam_from(captured[0].detach(), grad, (64, 64)), atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(model):
    torch.manual_seed(2)
    x = torch.randn(5, 3, 32, 32)
    classes = torch.tensor([0, 3, 3, 9, 5])
    cam = GradCAM(model, model.layer3)
    batch, _ = cam(x, classes)
    single = torch.stack([cam(x[i], classes[i])[0] for i in range(5)])  # one C x H x W image at a time
    assert torch.allclose(batch, single, atol=1e-5)


def test_zero_map_stays_zero():
    acts = torch.zeros(2, 4, 8, 8)
    acts[1, 0, 2, 3] = 1.0
    maps = cam_from(acts, torch.ones(2, 4, 8, 8), (32, 32))
    assert torch.equal(maps[0], torch.zeros(32, 32)) and maps[1].max() == 1 and torch.isfinite(maps).all()


@pytest.mark.parametrize("layer", ["layer9", "linear", "bn1", ""])
def test_the_script_s_layer_without_a_spatial_map_is_a_clear_error(model, layer):
    with pytest.raises(common.UserError, match=f"--layer '{layer}' is not a convolutional layer.*conv1, layer1"):
        gradcam.find_layer(model, layer)


@pytest.mark.parametrize("layer", ["conv1", "layer2", "layer3.1", "layer3.1.conv2", "layer2.0.shortcut"])
def test_every_convolutional_layer_or_block_gives_maps(model, layer):
    maps, _ = GradCAM(model, layer)(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()


def test_confusion_matrix_counts_each_pair():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = [[0] * 3 for _ in range(3)]
    for actual, guess in zip(labels.tolist(), predicted.tolist()):
        expected[actual][guess] += 1
    assert gradcam.confusion_matrix(predicted, labels, 3).tolist() == expected == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def _titles_inside(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    titles = [ax.title for ax in fig.axes if ax.get_title()] + [ax.yaxis.label for ax in fig.axes if ax.get_ylabel()]
    titles += [fig._suptitle] if fig._suptitle else []
    assert titles
    for title in titles:
        extent = title.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, \
            title.get_text()


@pytest.mark.parametrize("count", [1, 3, 5, 10])
def test_figure_titles_fit_inside_the_figure(count):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    images = np.random.default_rng(0).random((count, 32, 32, 3))
    names = ["automobile"] * count
    fig = gradcam.draw_misclassified(images, names, ["truck"] * count)
    FigureCanvasAgg(fig)
    _titles_inside(fig)
    maps = np.random.default_rng(1).random((count, 32, 32))
    records = [{"actual": name, "predicted": "truck", "confidence": 0.9} for name in names]
    fig = gradcam.draw_gradcam(images, maps, np.zeros_like(maps), records, alpha=0.5, layer="layer3")
    FigureCanvasAgg(fig)
    _titles_inside(fig)
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    blank = [ax.get_title() for ax in fig.axes if "no positive evidence" in ax.get_title()]
    assert len(blank) == count  # every all-zero map says why it is blue


def _save_random_checkpoint(path):
    torch.manual_seed(0)
    torch.save({"model": ResNet18().state_dict(), "classes": list(data.CLASSES), "mean": list(data.MEAN),
                "std": list(data.STD), "arch": "ResNet18"}, path)


def test_command_writes_figures_and_json(cifar, tmp_path):
    _save_random_checkpoint(tmp_path / "random.pt")
    res = run_script("gradcam.py", "--ckpt", tmp_path / "random.pt", "--data-dir", cifar, "--limit-test", "200",
                     "--device", "cpu", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    for name in ["misclassified.png", "gradcam.png", "confusion.png"]:
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    confusion = json.loads((tmp_path / "out" / "confusion.json").read_text())
    assert confusion["classes"] == list(data.CLASSES) and sum(map(sum, confusion["counts"])) == 200
    summary = json.loads((tmp_path / "out" / "misclassified.json").read_text())
    records = summary["misclassified"]
    assert sum(confusion["counts"][i][i] for i in range(10)) == round(2 * summary["test_accuracy"])
    assert len(records) == 10 and [r["index"] for r in records] == sorted(r["index"] for r in records)
    _, labels, _ = data.load_cifar10(cifar, "test")
    for r in records:
        assert r["actual"] == data.CLASSES[labels[r["index"]]] and r["actual"] != r["predicted"]
        assert 0 <= r["true_class_probability"] <= r["confidence"] <= 1


def test_figure_shows_denormalised_originals_and_seed_picks(cifar, tmp_path, monkeypatch):
    _save_random_checkpoint(tmp_path / "random.pt")
    shown = {}
    monkeypatch.setattr(gradcam, "draw_misclassified", lambda images, *a: shown.setdefault("images", images))
    summary = gradcam.main(["--ckpt", str(tmp_path / "random.pt"), "--data-dir", str(cifar), "--limit-test", "200",
                            "--device", "cpu", "--count", "4", "--seed", "3", "--out", str(tmp_path)])
    images, _, _ = data.load_cifar10(cifar, "test")
    indices = [r["index"] for r in summary["misclassified"]]
    original = images[indices].permute(0, 2, 3, 1).float().numpy() / 255
    assert shown["images"].shape == (4, 32, 32, 3)
    assert abs(shown["images"] - original).max() < 1e-5
    first = gradcam.main(["--ckpt", str(tmp_path / "random.pt"), "--data-dir", str(cifar), "--limit-test", "200",
                          "--device", "cpu", "--count", "4", "--out", str(tmp_path)])
    assert indices != [r["index"] for r in first["misclassified"]]


def test_perfect_model_is_handled(cifar, tmp_path, monkeypatch):
    _save_random_checkpoint(tmp_path / "random.pt")
    _, labels, _ = data.load_cifar10(cifar, "test")
    monkeypatch.setattr(gradcam, "predict", lambda model, images, *a, **k: F.one_hot(labels[:len(images)], 10).float())
    summary = gradcam.main(["--ckpt", str(tmp_path / "random.pt"), "--data-dir", str(cifar), "--limit-test", "50",
                            "--device", "cpu", "--out", str(tmp_path / "p")])
    assert summary["misclassified"] == [] and summary["test_accuracy"] == 100
    assert not (tmp_path / "p" / "gradcam.png").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("corrupt", "truncated or corrupt"),
    ("other", "does not fit a CIFAR ResNet18"), ("layer", "is not a convolutional layer"),
    ("linear", "is not a convolutional layer"), ("folder", "is a folder"),
    ("state_dict", "load when saved as {'model': model.state_dict()}"),  # what a student's own training saves
])
def test_bad_checkpoint_or_layer_is_one_line_error(tmp_path, case, message):
    path = tmp_path / "c.pt"
    if case == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif case == "other":
        torch.save({"model": ResNet18(num_classes=100).state_dict()}, path)
    elif case in ("layer", "linear"):
        _save_random_checkpoint(path)
    elif case == "folder":
        path = tmp_path
    elif case == "state_dict":
        torch.save(ResNet18().state_dict(), path)
    layer = {"layer": "layer9", "linear": "linear"}.get(case, "layer3")
    with pytest.raises(SystemExit) as stopped:  # in-process: any other exception fails the test
        gradcam.main(["--ckpt", str(path), "--layer", layer, "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert message in stopped.value.code  # sys.exit(message): printed to stderr, exit status 1


def test_predictions_follow_the_run_s_flip_tta(cifar, tmp_path, model):
    """A run tested with --tta is reported with the mean of each image's and its mirror's logits,
    computed here separately, so the misclassified images are those its accuracy counts."""
    _save_random_checkpoint(tmp_path / "plain.pt")
    ckpt = torch.load(tmp_path / "plain.pt")
    ckpt["args"] = {"tta": True}
    torch.save(ckpt, tmp_path / "tta.pt")
    images, labels, _ = data.load_cifar10(cifar, "test")
    images, labels = images[:200], labels[:200]
    net, *_ = common.model_from_checkpoint(ckpt)
    net.eval()
    with torch.no_grad():
        x = data.normalize(images)
        plain, mirrored = net(x), net(x.flip(-1))
    mean_pred = ((plain + mirrored) / 2).argmax(1)
    assert (mean_pred != plain.argmax(1)).any()  # else the test could not tell the two apart
    for name, tta, pred in [("tta.pt", True, mean_pred), ("plain.pt", False, plain.argmax(1))]:
        summary, _ = gradcam.summarize(gradcam.predict(net, images, data.MEAN, data.STD, tta=tta), labels,
                                       list(data.CLASSES), 50)
        assert summary["test_accuracy"] == pytest.approx(100 * (pred == labels).double().mean().item())
        assert [r["index"] for r in summary["misclassified"]] == (pred != labels).nonzero().flatten().tolist()[:50]
        assert gradcam.load_model(str(tmp_path / name), "cpu")[4] is tta  # the run's choice is the default


class StudentCNN(torch.nn.Module):
    """A student's own small CNN, with a layer its forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
        self.unused = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.body(x)


def student_cnn():
    torch.manual_seed(3)
    return StudentCNN().eval()


def sequential_reference(net, x, classes, upto):
    """Grad-CAM by the formula with torch.autograd.grad: run the layers by hand up to `upto`."""
    out = x
    for i, layer in enumerate(net.body):
        out = layer(out)
        if i == upto:
            target = out
    (grad,) = torch.autograd.grad(out[torch.arange(len(x)), classes].sum(), target)
    raw = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * target).sum(1, keepdim=True).detach())
    raw = F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = raw.amin(dim=(1, 2), keepdim=True), raw.amax(dim=(1, 2), keepdim=True)
    return (raw - low) / (high - low)


def test_one_class_for_a_whole_batch_is_that_class_for_every_image():
    net, x = student_cnn(), torch.randn(4, 3, 16, 16)
    maps, _ = GradCAM(net, "body.2")(x, 3)
    torch.testing.assert_close(maps, sequential_reference(net, x, torch.full((4,), 3), upto=2), atol=1e-5, rtol=0)
    assert (maps.amax(dim=(1, 2)) == 1).all()  # every image has its map, not image 0 alone


def test_one_image_gives_one_map_and_a_batch_gives_the_same():
    net, x = student_cnn(), torch.randn(3, 16, 16)
    one, logits = GradCAM(net, net.body[2])(x, 5)
    batch, _ = GradCAM(net, net.body[2])(x[None], [5])
    assert one.shape == (16, 16) and logits.shape == (10,)
    torch.testing.assert_close(one, batch[0])


@pytest.mark.parametrize("case, message", [
    ("uint8", "takes the normalized float images"),
    ("unused", "ran 0 times in one forward"),
    ("missing", "'conv9' is not a module of this model"),
    ("classes", "one class in 0..9 for all images or one per image"),
    ("wrong count", "one class in 0..9 for all images or one per image"),
    ("not whole", "one class in 0..9 for all images or one per image"),  # it explained class 1 in silence
])
def test_inputs_a_student_may_pass_get_one_sentence(case, message):
    net = student_cnn()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8) if case == "uint8" else torch.randn(2, 3, 16, 16)
    layer = {"unused": "unused", "missing": "conv9"}.get(case, "body.2")
    classes = {"classes": 10, "wrong count": [1, 2, 3], "not whole": 1.5}.get(case)
    with pytest.raises(ValueError, match=message):
        GradCAM(net, layer)(images, classes)


def test_a_map_too_small_to_localize_is_refused():
    """torchvision's resnet18 takes CIFAR-10's 32 x 32 images down to 1 x 1 in layer4."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(ValueError, match="map is 1 x 1 at this input size, too small"):
        GradCAM(net, "layer4")(torch.randn(2, 3, 32, 32))
    maps, _ = GradCAM(net, "layer3")(torch.randn(2, 3, 32, 32))  # 2 x 2: still a map
    assert maps.shape == (2, 32, 32)


def test_a_map_flat_up_to_rounding_is_all_zeros():
    """Equal evidence everywhere localizes nothing: zeros, as pytorch-grad-cam gives, not noise
    stretched to the full range."""
    acts = torch.full((1, 4, 4, 4), 0.3) + torch.randn(1, 4, 4, 4) * 1e-9
    assert torch.equal(cam_from(acts, torch.ones(1, 4, 4, 4), (32, 32)), torch.zeros(1, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_images_reach_a_cuda_model():
    net = student_cnn().cuda()
    maps, logits = GradCAM(net, "body.2")(torch.randn(2, 3, 16, 16))
    assert maps.device.type == "cuda" and logits.shape == (2, 10)


def pil_fit_32(picture):
    """Pillow's own resize of the shorter side to 32 (bilinear, antialiased) and the centre 32 x 32,
    rounded as torchvision's CenterCrop rounds: an independent view of how a photo is brought down."""
    from PIL import Image

    w, h = picture.size
    size = (32, max(32, int(32 * h / w))) if w <= h else (max(32, int(32 * w / h)), 32)
    resized = picture.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - 32) / 2)), int(round((size[1] - 32) / 2))
    return torch.from_numpy(np.asarray(resized.crop((left, top, left + 32, top + 32))).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(300, 200), (96, 64), (40, 18), (32, 32)])
def test_an_image_of_any_size_comes_down_as_pillow_brings_it(size, tmp_path):
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    picture.save(tmp_path / "p.png")
    ours = gradcam.fit_32(gradcam.read_image(str(tmp_path / "p.png")))
    assert ours.shape == (3, 32, 32) and (ours.int() - pil_fit_32(picture).int()).abs().max() <= 1


def test_image_mode_explains_each_file_and_names_the_ones_it_cannot_read(tmp_path):
    """Four readable files (RGB, grey, RGBA, a large JPEG) and two that are not images: the
    probabilities are those of the model on the 32 x 32 input computed here, and every bad file gets
    its sentence while the rest is still done."""
    from PIL import Image

    _save_random_checkpoint(tmp_path / "m.pt")
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 128, np.uint8)])).save(tmp_path / "rgba.png")
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    files = ["rgb.png", "grey.png", "notes.txt", "rgba.png", "missing.png", "photo.jpg"]
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--image", *[tmp_path / f for f in files],
                     "--class", "cat", "--device", "cpu", "--out", tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"error: {tmp_path / 'notes.txt'} is not an image that can be read" in res.stderr
    assert f"error: {tmp_path / 'missing.png'} does not exist; skipped" in res.stderr
    summary = json.loads((tmp_path / "out" / "gradcam_images.json").read_text())
    assert [os.path.basename(r["path"]) for r in summary["images"]] == ["rgb.png", "grey.png", "rgba.png", "photo.jpg"]
    model, *_ = common.model_from_checkpoint(torch.load(tmp_path / "m.pt"))
    on_white = torch.from_numpy((rgb * 128 / 255 + 255 * 127 / 255).round().astype(np.uint8))  # alpha 128 on white
    inputs = [torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb[..., 0]).expand(3, 32, 32),
              on_white.permute(2, 0, 1), pil_fit_32(photo.convert("RGB"))]
    with torch.no_grad():
        expected = model.eval()(data.normalize(torch.stack(inputs))).softmax(1)
    for record, probs, tolerance in zip(summary["images"], expected, [1e-5, 1e-5, 0.02, 0.02]):
        got = torch.tensor([record["probabilities"][c] for c in data.CLASSES])
        torch.testing.assert_close(got, probs, atol=tolerance, rtol=0)
        assert record["top"][0]["class"] == data.CLASSES[int(got.argmax())] and len(record["top"]) == 3
    assert (tmp_path / "out" / "gradcam_images.png").read_bytes()[:4] == b"\x89PNG"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), rgb)  # the inputs are left alone
    assert "grey.png: " in res.stdout and "wrote gradcam_images.json and gradcam_images.png" in res.stdout


def test_image_mode_with_an_unknown_class_is_one_line(tmp_path):
    _save_random_checkpoint(tmp_path / "m.pt")
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--image", tmp_path / "x.png", "--class", "kitten",
                     "--device", "cpu")
    assert res.returncode == 1 and "--class 'kitten' is not one of the checkpoint's classes" in res.stderr


def test_a_count_or_top_k_that_is_not_whole_is_one_sentence_saying_so(tmp_path, capsys):
    for flag in ("--count", "--top-k"):
        with pytest.raises(SystemExit) as stopped:
            gradcam.main(["--ckpt", str(tmp_path / "m.pt"), flag, "2.5"])
        assert stopped.value.code == 2 and f"{flag}: must be a whole number, got 2.5" in capsys.readouterr().err


def test_a_phone_photo_a_16_bit_png_and_a_decompression_bomb(tmp_path):
    """Real files of each kind: a JPEG whose EXIF says 'rotate 90' comes upright, a 16-bit grey PNG
    keeps its shades (not clipped to a white square), and an image over Pillow's pixel limit is one
    sentence while the files after it are still explained."""
    from PIL import Image

    _save_random_checkpoint(tmp_path / "m.pt")
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # white on the left, as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = gradcam.read_image(str(tmp_path / "phone.jpg"))
    assert upright.shape == (3, 40, 20)  # taller than wide, as the phone showed it
    assert upright[:, :18].float().mean() > 240 and upright[:, 22:].float().mean() < 15  # white on top

    shades = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    Image.fromarray(shades).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = gradcam.read_image(str(tmp_path / "deep.png"))
    expected = torch.from_numpy((shades / 65535 * 255).round().astype(np.uint8))
    assert (grey[0].int() - expected.int()).abs().max() <= 1 and torch.equal(grey[0], grey[2])

    clear = np.zeros((8, 8, 4), np.uint8)  # fully transparent black, and one opaque red pixel
    clear[0, 0] = (255, 0, 0, 255)
    Image.fromarray(clear).save(tmp_path / "clear.png")
    shown = gradcam.read_image(str(tmp_path / "clear.png"))  # on white, as a browser shows it; it was black
    assert shown[:, 0, 0].tolist() == [255, 0, 0] and shown[:, 1:].min() == 255 and shown[:, :, 1:].min() == 255

    Image.new("1", (16_000, 16_000)).save(tmp_path / "bomb.png")  # 256 million pixels, a few kB on disk
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--image", tmp_path / "bomb.png",
                     tmp_path / "phone.jpg", "--device", "cpu", "--out", tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'bomb.png'} has more pixels than Pillow opens safely (178,956,970)" in res.stderr
    assert [os.path.basename(r["path"]) for r in json.loads((tmp_path / "out" / "gradcam_images.json")
                                                             .read_text())["images"]] == ["phone.jpg"]


def test_image_mode_small_things(tmp_path):
    """A folder stands for its images; --class ignores case; --top-k above the class count is one
    sentence; a run whose every file fails leaves no older figure beside its JSON."""
    from PIL import Image

    _save_random_checkpoint(tmp_path / "m.pt")
    (tmp_path / "photos").mkdir()
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / name)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--image", tmp_path / "photos", "--class", "Cat",
                     "--device", "cpu", "--out", out)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "gradcam_images.json").read_text())
    assert [os.path.basename(r["path"]) for r in summary["images"]] == ["a.jpg", "b.png"]
    assert (out / "gradcam_images.png").is_file()
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--image", tmp_path / "photos" / "a.jpg",
                     "--top-k", "11", "--device", "cpu")
    assert res.returncode == 1 and "--top-k 11 is more than the checkpoint's 10 classes" in res.stderr
    res = run_script("gradcam.py", "--ckpt", tmp_path / "m.pt", "--image", tmp_path / "photos" / "notes.txt",
                     "--device", "cpu", "--out", out)
    assert res.returncode == 1 and not (out / "gradcam_images.png").exists()
    assert json.loads((out / "gradcam_images.json").read_text())["images"] == []
