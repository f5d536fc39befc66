"""Grad-CAM (Selvaraju et al. 2017) on the test images a trained checkpoint gets wrong.

    python gradcam.py --ckpt runs/<run>/best.pt

writes misclassified.png (the images, "Actual / Predicted"), gradcam.png (each image, the heatmap
for the predicted class, i.e. why the model said it, and for the true class, i.e. where it saw
evidence for the right answer), misclassified.json, and the test set's confusion matrix as
confusion.png and confusion.json, next to the checkpoint by default. From a notebook,
`gradcam.report(...)` does the same and returns the figures.

The default target layer is layer3 (its last block): at 32x32 input layer4's map is only 4x4,
so each heatmap cell covers an 8x8 patch and the maps are blobs; layer3's 8x8 map still comes
after 13 of the 17 convolutions on the main path, deep enough to be class-specific, at twice the resolution.
"""
import argparse
import collections
import os
import sys
import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data


class GradCAM:
    """Grad-CAM (Selvaraju et al. 2017): where a convolutional layer saw evidence for a class.

        cam = GradCAM(model, "layer3")        # a module name, or the module: GradCAM(model, model.layer3)
        maps, logits = cam(images)            # maps for the predicted classes, N x H x W in [0, 1]
        maps, logits = cam(images, labels)    # one class per image, or one class (an int) for all

    map = ReLU(sum_k alpha_k A^k), with A the layer's activations, alpha_k the spatial mean of the
    gradient of the class's logit (before softmax) with respect to A^k; upsampled bilinearly to the
    input size and scaled to [0, 1] per map. images are the normalized float inputs the model takes,
    a batch N x C x H x W or one image C x H x W (its map is then H x W), moved to the model's
    device. The model must be in eval mode. One forward per call; the gradient is
    torch.autograd.grad's with respect to the activations, so no parameter's .grad or requires_grad
    and no mode is touched, and several threads may explain with one model at once: the forward hook
    that catches the activations keeps only its own thread's.
    """

    def __init__(self, model, layer):
        self.model = model
        self.layer = layer if isinstance(layer, nn.Module) else dict(model.named_modules()).get(layer)
        if self.layer is None or layer == "":
            names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
            raise ValueError(f"{layer!r} is not a module of this model; pass a module or the name of one, "
                             f"such as {', '.join(names[-3:])}")

    def __call__(self, images, class_idx=None):
        if not images.is_floating_point():
            raise ValueError(f"GradCAM takes the normalized float images the model was trained on, not "
                             f"{images.dtype}; normalize them first (data.normalize for CIFAR-10)")
        if self.model.training:
            raise ValueError("GradCAM needs the model in eval mode: call model.eval() first (in train mode "
                             "BatchNorm would use this batch's statistics and change its running ones)")
        single = images.dim() == 3
        x = (images[None] if single else images).detach().to(next(self.model.parameters()).device, torch.float32)
        caught, thread = [], threading.get_ident()

        def catch(module, inputs, output):
            if threading.get_ident() == thread:  # another thread's forward through the same layer
                caught.append(output)

        hook = self.layer.register_forward_hook(catch)
        try:
            with torch.enable_grad():
                logits = self.model(x.requires_grad_(True))
        finally:
            hook.remove()
        activations = self.check_map(caught)
        score = logits.gather(1, self.classes_for(class_idx, logits)[:, None]).sum()
        gradients = torch.autograd.grad(score, activations)[0]
        maps = cam_from(activations.detach(), gradients, x.shape[-2:])
        return (maps[0], logits[0].detach()) if single else (maps, logits.detach())

    @staticmethod
    def check_map(caught):
        """The target layer's one output, a map of at least 2 x 2: a layer the forward calls more than
        once (torchvision's BasicBlock reuses its ReLU) has no one map to explain, and a 1 x 1 map
        would be flat, all blue, for every class."""
        if len(caught) != 1:
            raise ValueError(f"the target layer ran {len(caught)} times in one forward; pick a module that runs once "
                             f"on the way to the logits, such as the block or the convolution that holds it")
        h, w = caught[0].shape[-2:]
        if h * w < 4:
            raise ValueError(f"the target layer's map is {h} x {w} at this input size, too small to localize "
                             f"anything; pick an earlier layer")
        return caught[0]

    @staticmethod
    def classes_for(class_idx, logits):
        """One class index per image: the predicted ones (None), one for all (an int), or one each."""
        if class_idx is None:
            return logits.argmax(1)
        given = torch.as_tensor(class_idx, device=logits.device).flatten()
        classes = given.long().expand(len(logits)) if len(given) == 1 else given.long()
        whole = bool((given == given.long()).all())  # 1.5 is no class (.long() made it 1)
        if not whole or len(classes) != len(logits) or not ((classes >= 0) & (classes < logits.shape[1])).all():
            raise ValueError(f"class_idx must be one class in 0..{logits.shape[1] - 1} for all images or one "
                             f"per image ({len(logits)}), not {class_idx}")
        return classes


def cam_from(activations, gradients, size):
    """The Grad-CAM formula on activations and gradients of shape N x K x h x w. A map that is flat
    (no positive evidence, or equal everywhere up to rounding) is all zeros."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    flat = span <= 1e-5 * cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(flat, torch.zeros_like(cam), (cam - low) / span.clamp(min=1e-12))


def find_layer(model, name):
    """The module called name; only layers with a spatial map qualify: convolutions and the blocks
    and stages that hold them (conv1, layer3, layer3.1, layer3.1.conv2, ...)."""
    modules = dict(model.named_modules())
    if name == "" or name not in modules or not any(isinstance(m, nn.Conv2d) for m in modules[name].modules()):
        choices = [n for n in modules if n == "conv1" or (n.startswith("layer") and n.count(".") <= 1)]
        raise common.UserError(f"--layer {name!r} is not a convolutional layer or block; choose one of "
                               f"{', '.join(choices)} (or a convolution inside a block, such as layer3.1.conv2)")
    return modules[name]


@torch.no_grad()
def predict(model, images, mean, std, batch_size=1024, tta=False, amp_dtype=None, progress=None):
    """Softmax probabilities for uint8 images, in order; with tta, of the mean of each image's
    logits and its mirror's (one forward for both), as train.py --tta scores the test set, and in
    amp_dtype's mixed precision when one is given, as train.py's test pass. progress, if given
    (print, say), gets a line after every batch of a set of more than one."""
    model.eval()
    out = []
    for first in range(0, len(images), batch_size):
        x = data.normalize(images[first:first + batch_size], mean, std)
        views = torch.cat([x, x.flip(-1)]) if tta else x
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(views.contiguous(memory_format=torch.channels_last)).float()
        out.append(F.softmax(logits.view(2, len(x), -1).mean(0) if tta else logits, 1))
        if progress is not None and len(images) > batch_size:
            progress(f"scored {first + len(x):,}/{len(images):,} test images", flush=True)
    return torch.cat(out)


def misclassified(probs, labels, count, seed=None):
    """Indices of up to `count` wrong predictions: in test-set order, or a seeded random choice."""
    wrong = (probs.argmax(1) != labels).nonzero().flatten().cpu()
    if seed is not None and len(wrong) > count:
        pick = torch.randperm(len(wrong), generator=torch.Generator().manual_seed(seed))[:count]
        wrong = wrong[pick.sort().values]
    return wrong[:count]


def confusion_matrix(predicted, labels, num_classes):
    """counts[i][j]: test images of class i predicted as class j."""
    flat = labels.long().cpu() * num_classes + predicted.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def overlay(image, cam, alpha):
    """An RGB image (H x W x 3 in [0, 1]) blended with the jet-coloured map."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    return (1 - alpha) * image + alpha * heat


def draw_misclassified(images, actual, predicted, path=None):
    """The images in rows of up to 5, each titled "Actual / Predicted"; returns the Figure."""
    from matplotlib.figure import Figure

    cols = min(5, len(images))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.8 * rows), layout="constrained")  # constrained: titles stay inside
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, a, p in zip(axes, images, actual, predicted):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"Actual: {a}\nPredicted: {p}", fontsize=9)
    common.save_png(fig, path)
    return fig


def draw_gradcam(images, pred_maps, true_maps, records, alpha=0.5, layer="layer3", path=None):
    """Per image: the image, the map for the predicted class and the map for the true class, with
    one colour bar; records give each image's "actual", "predicted" and "confidence". Returns the
    Figure. A map with no positive evidence at all is all zero (blue)."""
    actual, predicted = [r["actual"] for r in records], [r["predicted"] for r in records]
    confidence = [r["confidence"] for r in records]
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.2, 2.5 * len(images) + 0.4), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, pm, tm, a, p, c) in enumerate(zip(images, pred_maps, true_maps, actual, predicted, confidence)):
        panels = [(image, f"Actual: {a}\nPredicted: {p} ({100 * c:.0f}%)"),
                  (overlay(image, pm, alpha), f"Grad-CAM for '{p}'\n" + evidence(pm, "why it said so")),
                  (overlay(image, tm, alpha), f"Grad-CAM for '{a}'\n" + evidence(tm, "evidence for the truth"))]
        for ax, (picture, title) in zip(axes[row], panels):
            ax.imshow(picture, interpolation="bilinear" if picture is not image else "nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.colorbar(ScalarMappable(cmap=colormaps["jet"]), ax=axes[:, 1:], shrink=min(1.0, 3 / len(images)),
                 label="Grad-CAM")
    fig.suptitle(f"Grad-CAM on {layer} (each map scaled to its maximum)", fontsize=11)
    common.save_png(fig, path)
    return fig


def evidence(cam, caption):
    """A map that is zero everywhere means the layer holds no positive evidence for that class."""
    return caption if cam.max() > 0 else "no positive evidence (all blue)"


def draw_confusion(matrix, classes, path=None):
    """The confusion matrix as counts, true class down, predicted across; returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion matrix ({int(matrix.sum()):,} test images)")
    threshold = matrix.max() / 2
    for i, row in enumerate(matrix.tolist()):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    fig.colorbar(shown, ax=ax, label="images")
    common.save_png(fig, path)
    return fig


MAX_COUNT = 50  # rows of gradcam.png; more would take minutes and gigabytes to draw


Loaded = collections.namedtuple("Loaded", "model classes mean std tta")


def load_model(ckpt, device="auto"):
    """A Loaded (model in eval mode, classes, mean, std, whether the run tested with flip TTA) from a
    train.py checkpoint. Raises common.UserError with one sentence."""
    device = common.resolve_device(device)
    state = common.load_checkpoint(ckpt)
    model, classes, mean, std = common.model_from_checkpoint(state, device, ckpt)
    return Loaded(model.eval(), classes, mean, std, bool((state.get("args") or {}).get("tta", False)))


def refuse_non_finite(probs, ckpt):
    if not torch.isfinite(probs).all():
        raise common.UserError(f"the model in {ckpt} gives non-finite outputs (its training diverged); use an "
                               f"earlier checkpoint, or train again with a lower --max-lr")


def report(ckpt, data_dir="./data", out=None, layer="layer3", count=10, alpha=0.5, seed=None, limit_test=None,
           device="auto", download=True, tta=None):
    """Evaluate a checkpoint on the test set, then write (into out, default the checkpoint's folder)
    and return the figures: {'summary', 'misclassified', 'gradcam', 'confusion'} (figures are None
    when nothing was misclassified). Predictions use flip TTA if the run was tested with it (tta=None)
    or as tta says. Raises common.UserError or data.DataError with one sentence."""
    loaded = load_model(ckpt, device)
    model, classes, mean, std, run_tta = loaded
    tta = run_tta if tta is None else tta
    find_layer(model, layer)
    out = out or os.path.dirname(ckpt) or "."  # as the user typed it: the figures' path is printed
    with common.FolderLock(out):
        images, labels, _ = data.load_cifar10(data_dir, "test", download=download)
        images, labels = images[:limit_test].to(next(model.parameters()).device), labels[:limit_test]
        probs = predict(model, images, mean, std, tta=tta, progress=print).cpu()
        refuse_non_finite(probs, ckpt)
        found, chosen = summarize(probs, labels, classes, count, seed)
        summary = {"checkpoint": ckpt, "layer": layer, "tta": tta, **found}
        print(f"{ckpt}: {summary['test_accuracy']:.2f}% on {len(labels):,} test image{'s' * (len(labels) != 1)}"
              f"{' with flip TTA' if tta else ''}; {summary['wrong']} misclassified")
        common.save_json(os.path.join(out, "misclassified.json"), summary)
        matrix = confusion_matrix(probs.argmax(1), labels, len(classes))
        common.save_json(os.path.join(out, "confusion.json"), {
            "checkpoint": ckpt, "classes": classes, "rows": "actual", "columns": "predicted",
            "counts": matrix.tolist()})
        figures = {"summary": summary, "misclassified": None, "gradcam": None,
                   "confusion": draw_confusion(matrix.numpy(), classes, os.path.join(out, "confusion.png"))}
        if not summary["misclassified"]:
            print(f"no misclassified images: nothing to draw (wrote misclassified.json with an empty list, "
                  f"confusion.png and confusion.json to {out})")
            return figures
        figures.update(draw_report(loaded, images[chosen], summary, alpha=alpha, out=out))
    print(f"wrote misclassified.png, gradcam.png, confusion.png and their JSON files to {out}")
    return figures


def summarize(probs, labels, classes, count, seed=None):
    """The test accuracy, the number wrong and up to `count` misclassified images as records (for
    misclassified.json); and the chosen images' indices."""
    predicted = probs.argmax(1)
    chosen = misclassified(probs, labels, count, seed)
    records = [{"index": int(i), "actual": classes[int(labels[i])], "predicted": classes[int(predicted[i])],
                "confidence": float(probs[i].max()), "true_class_probability": float(probs[i, labels[i]])}
               for i in chosen]
    return {"test_images": len(labels), "test_accuracy": 100 * (predicted == labels).double().mean().item(),
            "wrong": int((predicted != labels).sum()), "misclassified": records}, chosen


def draw_report(loaded, images, summary, alpha=0.5, out="."):
    """misclassified.png and gradcam.png of the chosen uint8 test images, whose records `summary`
    holds (summarize's), with maps of its layer."""
    model, classes, mean, std, _ = loaded
    records = summary["misclassified"]
    predicted = torch.tensor([classes.index(r["predicted"]) for r in records])
    actual = torch.tensor([classes.index(r["actual"]) for r in records])
    x = data.normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
    cam = GradCAM(model, find_layer(model, summary["layer"]))
    pred_maps, true_maps = (cam(x, targets)[0].cpu().numpy() for targets in (predicted, actual))
    pictures = data.denormalize(x, mean, std).permute(0, 2, 3, 1).cpu().numpy()
    return {"misclassified": draw_misclassified(pictures, [r["actual"] for r in records],
                                                [r["predicted"] for r in records],
                                                os.path.join(out, "misclassified.png")),
            "gradcam": draw_gradcam(pictures, pred_maps, true_maps, records, alpha=alpha, layer=summary["layer"],
                                    path=os.path.join(out, "gradcam.png"))}


# ---------------------------------------------------------------------------------------------
# Any image: what the model sees in a photo of the user's own


def read_image(path):
    """uint8 RGB C x H x W from an image file Pillow reads (JPEG, PNG, GIF, WebP, ...): turned upright
    as its EXIF orientation says (phone photos), grey and 16-bit images brought to 8-bit RGB, and
    transparent pixels shown on white, as a browser shows them.
    Raises common.UserError naming the file when it is missing, not an image, or too large to open
    safely."""
    from PIL import Image, ImageOps

    if not os.path.isfile(path):
        what = "is a folder with no image files" if os.path.isdir(path) else "is not a file"
        raise common.UserError(f"{path} does not exist" if not os.path.exists(path) else f"{path} {what}")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I"):  # 16- or 32-bit integer grey: scaled, not clipped to white
                array = np.asarray(image, dtype=np.float64)
                top = 65535 if image.mode.startswith("I;16") or array.max() > 255 else 255
                image = Image.fromarray((array / top * 255).clip(0, 255).round().astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            rgb = np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError:
        raise common.UserError(f"{path} has more pixels than Pillow opens safely ({2 * Image.MAX_IMAGE_PIXELS:,}); "
                               f"resize it first") from None
    except (OSError, ValueError, SyntaxError):
        raise common.UserError(f"{path} is not an image that can be read (JPEG, PNG, GIF or WebP)") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def image_files(paths):
    """The paths, with each folder replaced by the image files in it (by name, sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, name) for name in os.listdir(path)
                            if name.lower().endswith(IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


def fit_32(image, size=32):
    """A uint8 C x H x W image of any size as the model's size x size input, the way photos are
    usually prepared for a classifier: the shorter side resized to size (antialiased), the centre kept."""
    from torchvision.transforms.functional import center_crop, resize

    return center_crop(resize(image, size, antialias=True), size)


def explain(model, image, classes, mean, std, layer="layer3", class_name=None, tta=False, top_k=3):
    """Top-k classes and Grad-CAM maps for one uint8 C x 32 x 32 image: a dict with 'top' [(class,
    probability)], 'probabilities' {class: p} and 'maps' {class: H x W numpy map} for the top class
    and class_name (when given)."""
    x = data.normalize(image[None].to(next(model.parameters()).device), mean, std)
    probs = predict(model, image[None].to(x.device), mean, std, tta=tta)[0].cpu()
    refuse_non_finite(probs, "the checkpoint")
    wanted = [int(probs.argmax())] + ([classes.index(class_name)] if class_name else [])
    cam = GradCAM(model, find_layer(model, layer))
    maps = {classes[c]: cam(x[0], c)[0].cpu().numpy() for c in dict.fromkeys(wanted)}
    top = probs.topk(min(top_k, len(classes)))
    return {"top": [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)],
            "probabilities": dict(zip(classes, probs.tolist())), "maps": maps}


def explain_images(ckpt, paths, out=None, layer="layer3", class_name=None, alpha=0.5, top_k=3, device="auto",
                   tta=None):
    """gradcam.py --image: each file read, brought to 32 x 32 (fit_32) and explained; writes
    gradcam_images.png and gradcam_images.json into out (default the checkpoint's folder). A file
    that cannot be read is named in one sentence and skipped. Returns the JSON's dict."""
    model, classes, mean, std, run_tta = load_model(ckpt, device)
    tta = run_tta if tta is None else tta
    find_layer(model, layer)
    if class_name is not None:
        named = {name.lower(): name for name in classes}
        if class_name.lower() not in named:
            raise common.UserError(f"--class {class_name!r} is not one of the checkpoint's classes: "
                                   f"{', '.join(classes)}")
        class_name = named[class_name.lower()]
    if top_k > len(classes):
        raise common.UserError(f"--top-k {top_k} is more than the checkpoint's {len(classes)} classes")
    out = out or os.path.dirname(ckpt) or "."
    rows, records, errors = [], [], []
    for path in image_files(paths):
        try:
            image = fit_32(read_image(path))
        except common.UserError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            errors.append({"path": path, "error": str(e)})
            continue
        result = explain(model, image, classes, mean, std, layer, class_name, tta, top_k)
        print(f"{path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in result["top"]))
        rows.append((path, image.permute(1, 2, 0).numpy() / 255, result))
        records.append({"path": path, "top": [{"class": n, "probability": p} for n, p in result["top"]],
                        "probabilities": result["probabilities"]})
    summary = {"checkpoint": ckpt, "layer": layer, "tta": tta, "images": records, "errors": errors}
    with common.FolderLock(out):
        common.save_json(os.path.join(out, "gradcam_images.json"), summary)
        figure = os.path.join(out, "gradcam_images.png")
        if rows:
            draw_explanations(rows, alpha, layer, figure)
        elif os.path.exists(figure):  # an earlier run's figure would pass for this one's
            os.unlink(figure)
    print(f"wrote gradcam_images.json{' and gradcam_images.png' if rows else ''} to {out}")
    return summary


def draw_explanations(rows, alpha, layer, path=None):
    """Per image: the 32 x 32 input, its top classes as bars, and a Grad-CAM overlay per class."""
    from matplotlib.figure import Figure

    panels = max(len(result["maps"]) for _, _, result in rows)
    fig = Figure(figsize=(2.6 * (2 + panels), 2.6 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), 2 + panels, squeeze=False)
    for row, (source, picture, result) in zip(axes, rows):
        for ax in row:
            ax.axis("off")
        row[0].imshow(picture, interpolation="nearest")
        row[0].set_title(os.path.basename(source)[:28] + "\n(as the model sees it)", fontsize=9)
        names, probs = zip(*result["top"])
        row[1].axis("on")
        bars = row[1].barh(range(len(names))[::-1], [100 * p for p in probs], color="C0")
        row[1].bar_label(bars, fmt="%.0f%%", padding=3, fontsize=8)
        row[1].set(yticks=range(len(names))[::-1], yticklabels=names, xlim=(0, 115), xticks=[])
        row[1].set_title("top classes", fontsize=9)
        for ax, (name, cam) in zip(row[2:], result["maps"].items()):
            ax.imshow(overlay(picture, cam, alpha), interpolation="bilinear")
            ax.set_title(f"Grad-CAM for '{name}' ({100 * result['probabilities'][name]:.0f}%)\n"
                         + evidence(cam, "where it saw the class"), fontsize=9)
    fig.suptitle(f"Top classes and Grad-CAM on {layer}", fontsize=11)
    common.save_png(fig, path)
    return fig


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--ckpt", required=True, help="checkpoint written by train.py (best.pt or last.pt)")
    add("--image", nargs="+", metavar="FILE",
        help="explain these image files (or the images in these folders) instead of the test set: any size, grey, "
             "RGBA or 16-bit too, turned upright as their EXIF says; the shorter side is resized to 32 pixels "
             "(antialiased) and the centre 32 x 32 kept, as the model saw CIFAR-10")
    add("--class", dest="class_name", default=None, help="with --image: also show the map for this class")
    add("--top-k", type=common.positive_int, default=3, help="with --image: classes listed per image (default 3)")
    add("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    add("--download", action=argparse.BooleanOptionalAction, default=True, help="fetch CIFAR-10 when it is missing")
    add("--out", default=None, help="output folder (default: the checkpoint's folder)")
    add("--layer", default="layer3", help="target layer by module name: conv1, layer1 to layer4, a block such as "
                                          "layer3.0, or a convolution in one (default layer3: an 8x8 map)")
    add("--count", type=common.int_at_least(1, maximum=MAX_COUNT), default=10,
        help=f"images to show, at most {MAX_COUNT}: a figure row each (default 10)")
    add("--alpha", type=common.probability, default=0.5, help="heatmap opacity in the overlays, 0..1 (default 0.5)")
    add("--seed", type=common.seed, default=None, help="pick misclassified images at random with this seed (default: "
                                               "the first ones)")
    add("--limit-test", type=common.positive_int, default=None, help="search only the first N test images")
    add("--tta", action=argparse.BooleanOptionalAction, default=None,
        help="predict from each image and its mirror (default: as the run was tested)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    common.resolve_device(args.device, parser)
    if args.image:
        summary = common.main_guard(lambda: explain_images(args.ckpt, args.image, args.out, args.layer,
                                                           args.class_name, args.alpha, args.top_k, args.device,
                                                           args.tta))
        if summary["errors"]:
            sys.exit(1)
        return summary
    return common.main_guard(lambda: report(args.ckpt, args.data_dir, args.out, args.layer, args.count, args.alpha,
                                            args.seed, args.limit_test, args.device, args.download,
                                            args.tta))["summary"]


if __name__ == "__main__":
    main()
