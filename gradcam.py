"""Grad-CAM (Selvaraju et al. 2017) on the test images a trained checkpoint gets wrong.

    python gradcam.py --ckpt runs/<run>/best.pt

writes misclassified.png (the images, "Actual / Predicted"), gradcam.png (each image, the heatmap
for the predicted class, i.e. why the model said it, and for the true class, i.e. where it saw
evidence for the right answer), misclassified.json, and the test set's confusion matrix as
confusion.png and confusion.json, next to the checkpoint by default. From a notebook,
`gradcam.report(...)` does the same and returns the figures.

The default target layer is layer3 (its last block): at 32x32 input layer4's map is only 4x4,
so each heatmap cell covers an 8x8 patch and the maps are blobs; layer3's 8x8 map still comes
after 14 of the 17 conv layers, deep enough to be class-specific, at twice the resolution.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data


class GradCAM:
    """Class activation maps from a target layer's activations A and gradients dy^c/dA.

    map = ReLU(sum_k alpha_k A^k), alpha_k = spatial mean of dy^c/dA^k, y^c the logit (before
    softmax); upsampled bilinearly to the input size and scaled to [0, 1] per map. One forward
    and one backward for the whole batch. Use as a context manager so the hooks are removed.
    """

    def __init__(self, model, target_layer):
        self.model = model
        self.layer = find_layer(model, target_layer) if isinstance(target_layer, str) else target_layer
        self.activations = self.gradients = None
        self._hook = None

    def __enter__(self):
        self._hook = self.layer.register_forward_hook(self._keep_activations)
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        self._hook = self.activations = self.gradients = None

    def _keep_activations(self, module, inputs, output):
        self.activations = output
        if output.requires_grad:
            output.register_hook(self._keep_gradients)

    def _keep_gradients(self, grad):
        self.gradients = grad

    def __call__(self, images, class_idx=None):
        """Maps (N x H x W in [0, 1]) and logits for a batch; class_idx defaults to the prediction."""
        if self._hook is None:
            raise RuntimeError("use GradCAM as a context manager: with GradCAM(model, 'layer3') as cam: ...")
        was_training = self.model.training
        requires_grad = [p.requires_grad for p in self.model.parameters()]
        try:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)  # gradients flow to the input only: no parameter .grad touched
            with torch.enable_grad():
                logits = self.model(images.detach().float().requires_grad_(True))
                if class_idx is None:
                    class_idx = logits.argmax(1)
                class_idx = torch.as_tensor(class_idx, device=logits.device).view(-1, 1)
                logits.gather(1, class_idx).sum().backward()
            activations, gradients = self.activations.detach(), self.gradients
        finally:
            for p, flag in zip(self.model.parameters(), requires_grad):
                p.requires_grad_(flag)
            self.model.train(was_training)
            self.activations = self.gradients = None
        return cam_from(activations, gradients, images.shape[-2:]), logits.detach()


def cam_from(activations, gradients, size):
    """The Grad-CAM formula on activations and gradients of shape N x K x h x w."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp(min=1e-12), torch.zeros_like(cam))


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
def predict(model, images, mean, std, batch_size=1000, tta=False):
    """Softmax probabilities for uint8 images, in order; with tta, of the mean of each image's
    logits and its mirror's, as train.py --tta scores the test set."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = data.normalize(images[i:i + batch_size], mean, std).contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        if tta:
            logits = (logits + model(x.flip(-1).contiguous(memory_format=torch.channels_last)).float()) / 2
        out.append(F.softmax(logits, 1))
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


def draw_gradcam(images, pred_maps, true_maps, actual, predicted, confidence, alpha, layer, path=None):
    """Per image: the image, the map for the predicted class and the map for the true class, with
    one colour bar; returns the Figure. A map with no positive evidence at all is all zero (blue)."""
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


def report(ckpt, data_dir="./data", out=None, layer="layer3", count=10, alpha=0.5, seed=None, limit_test=None,
           device="auto", download=True, tta=None):
    """Evaluate a checkpoint on the test set, then write (into out, default the checkpoint's folder)
    and return the figures: {'summary', 'misclassified', 'gradcam', 'confusion'} (figures are None
    when nothing was misclassified). Predictions use flip TTA if the run was tested with it (tta=None)
    or as tta says. Raises common.UserError or data.DataError with one sentence."""
    device = common.resolve_device(device)
    out = out or os.path.dirname(ckpt) or "."  # as the user typed it: the figures' path is printed
    state = common.load_checkpoint(ckpt)
    model, classes, mean, std = common.model_from_checkpoint(state, device, ckpt)
    tta = bool((state.get("args") or {}).get("tta", False)) if tta is None else tta
    find_layer(model, layer)
    common.check_writable(out)
    images, labels, _ = data.load_cifar10(data_dir, "test", download=download)
    images, labels = images[:limit_test].to(device), labels[:limit_test].to(device)

    probs = predict(model, images, mean, std, tta=tta)
    predicted = probs.argmax(1)
    accuracy = 100 * (predicted == labels).double().mean().item()
    matrix = confusion_matrix(predicted, labels, len(classes))
    chosen = misclassified(probs, labels, count, seed).to(device)
    print(f"{ckpt}: {accuracy:.2f}% on {len(images):,} test images{' with flip TTA' if tta else ''}; "
          f"{int((predicted != labels).sum())} misclassified")
    records = [{"index": int(i), "actual": classes[int(labels[i])], "predicted": classes[int(predicted[i])],
                "confidence": float(probs[i].max()), "true_class_probability": float(probs[i, labels[i]])}
               for i in chosen]
    summary = {"checkpoint": ckpt, "layer": layer, "test_images": len(images), "tta": tta,
               "test_accuracy": accuracy, "misclassified": records}
    common.save_json(os.path.join(out, "misclassified.json"), summary)
    common.save_json(os.path.join(out, "confusion.json"), {"checkpoint": ckpt, "classes": classes,
                                                           "rows": "actual", "columns": "predicted",
                                                           "counts": matrix.tolist()})
    figures = {"summary": summary, "misclassified": None, "gradcam": None,
               "confusion": draw_confusion(matrix.numpy(), classes, os.path.join(out, "confusion.png"))}
    if not records:
        print(f"no misclassified images: nothing to draw (wrote misclassified.json with an empty list, "
              f"confusion.png and confusion.json to {out})")
        return figures

    x = data.normalize(images[chosen], mean, std).contiguous(memory_format=torch.channels_last)
    with GradCAM(model, layer) as cam:
        pred_maps, _ = cam(x, predicted[chosen])
        true_maps, _ = cam(x, labels[chosen])
    pictures = data.denormalize(x, mean, std).permute(0, 2, 3, 1).cpu().numpy()
    actual, predicted = [r["actual"] for r in records], [r["predicted"] for r in records]
    figures["misclassified"] = draw_misclassified(pictures, actual, predicted, os.path.join(out, "misclassified.png"))
    figures["gradcam"] = draw_gradcam(pictures, pred_maps.cpu().numpy(), true_maps.cpu().numpy(), actual, predicted,
                                      [r["confidence"] for r in records], alpha, layer,
                                      os.path.join(out, "gradcam.png"))
    print(f"wrote misclassified.png, gradcam.png, confusion.png and their JSON files to {out}")
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt or last.pt)")
    parser.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="download CIFAR-10 into --data-dir when it is missing (default on)")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--layer", default="layer3",
                        help="target layer by module name: conv1, layer1 to layer4, a block such as layer3.0, or a "
                             "convolution in one (default layer3: an 8x8 map; layer4's is 4x4)")
    parser.add_argument("--count", type=common.positive_int, default=10, help="images to show (default 10)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays, 0..1 (default 0.5)")
    parser.add_argument("--seed", type=int, default=None,
                        help="pick a random set of misclassified images with this seed (default: the first ones)")
    parser.add_argument("--limit-test", type=common.positive_int, default=None,
                        help="search only the first N test images")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="predict from each image and its mirror (default: as the run was tested)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    if not 0 <= args.alpha <= 1:
        parser.error("--alpha must lie between 0 and 1")
    common.resolve_device(args.device, parser)
    try:
        return report(args.ckpt, args.data_dir, args.out, args.layer, args.count, args.alpha, args.seed,
                      args.limit_test, args.device, args.download, args.tta)["summary"]
    except (common.UserError, data.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
