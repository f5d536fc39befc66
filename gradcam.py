"""Grad-CAM (Selvaraju et al. 2017) on the test images a trained checkpoint gets wrong.

    python gradcam.py --ckpt runs/<run>/best.pt

writes misclassified.png (the images, "Actual / Predicted"), gradcam.png (each image, the heatmap
for the predicted class, i.e. why the model said it, and for the true class, i.e. where it saw
evidence for the right answer) and misclassified.json, next to the checkpoint by default.

The default target layer is layer3 (its last block): at 32x32 input layer4's map is only 4x4,
so each heatmap cell covers an 8x8 patch and the maps are blobs; layer3's 8x8 map still comes
after 14 of the 17 conv layers, deep enough to be class-specific, at twice the resolution.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import train


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
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        choices = [n for n in modules if n.count(".") <= 1 and n.startswith("layer")]
        raise train.UserError(f"unknown layer {name!r}; choose one of {', '.join(choices)}")
    return modules[name]


@torch.no_grad()
def predict(model, images, mean, std, batch_size=1000):
    """Softmax probabilities for uint8 images, in order."""
    model.eval()
    out = [F.softmax(model(data.normalize(images[i:i + batch_size], mean, std)
                           .contiguous(memory_format=torch.channels_last)).float(), 1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def misclassified(probs, labels, count, seed=None):
    """Indices of up to `count` wrong predictions: in test-set order, or a seeded random choice."""
    wrong = (probs.argmax(1) != labels).nonzero().flatten().cpu()
    if seed is not None and len(wrong) > count:
        pick = torch.randperm(len(wrong), generator=torch.Generator().manual_seed(seed))[:count]
        wrong = wrong[pick.sort().values]
    return wrong[:count]


def overlay(image, cam, alpha):
    """An RGB image (H x W x 3 in [0, 1]) blended with the jet-coloured map."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    return (1 - alpha) * image + alpha * heat


def draw_misclassified(images, actual, predicted, path):
    from matplotlib.figure import Figure

    cols = min(5, len(images))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(2.4 * cols, 2.7 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, a, p in zip(axes, images, actual, predicted):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"Actual: {a}\nPredicted: {p}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_gradcam(images, pred_maps, true_maps, actual, predicted, confidence, alpha, layer, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.5 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, pm, tm, a, p, c) in enumerate(zip(images, pred_maps, true_maps, actual, predicted, confidence)):
        panels = [(image, f"Actual: {a}\nPredicted: {p} ({100 * c:.0f}%)"),
                  (overlay(image, pm, alpha), f"Grad-CAM for '{p}'\n(why it said so)"),
                  (overlay(image, tm, alpha), f"Grad-CAM for '{a}'\n(evidence for the truth)")]
        for ax, (picture, title) in zip(axes[row], panels):
            ax.imshow(picture, interpolation="bilinear" if picture is not image else "nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"Grad-CAM on {layer}", fontsize=11)
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt or last.pt)")
    parser.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="download CIFAR-10 into --data-dir when it is missing (default on)")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--layer", default="layer3",
                        help="target layer by module name, e.g. layer3, layer4, layer3.0 (default layer3: "
                             "an 8x8 map; layer4's is 4x4)")
    parser.add_argument("--count", type=train.positive_int, default=10, help="images to show (default 10)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays, 0..1 (default 0.5)")
    parser.add_argument("--seed", type=int, default=None,
                        help="pick a random set of misclassified images with this seed (default: the first ones)")
    parser.add_argument("--limit-test", type=train.positive_int, default=None, help="search only the first N test images")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    if not 0 <= args.alpha <= 1:
        parser.error("--alpha must lie between 0 and 1")
    device = train.resolve_device(args.device, parser)
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    try:
        ckpt = train.load_checkpoint(args.ckpt)
        model, classes = train.model_from_checkpoint(ckpt, device, args.ckpt)
        find_layer(model, args.layer)
        mean, std = tuple(ckpt.get("mean") or data.MEAN), tuple(ckpt.get("std") or data.STD)
        train.check_writable(out)
        images, labels, _ = data.load_cifar10(args.data_dir, "test", download=args.download)
    except (train.UserError, data.DataError) as e:
        sys.exit(f"error: {e}")
    images, labels = images[:args.limit_test].to(device), labels[:args.limit_test].to(device)

    probs = predict(model, images, mean, std)
    accuracy = 100 * (probs.argmax(1) == labels).double().mean().item()
    chosen = misclassified(probs, labels, args.count, args.seed).to(device)
    print(f"{args.ckpt}: {accuracy:.2f}% on {len(images):,} test images; "
          f"{int((probs.argmax(1) != labels).sum())} misclassified")
    records = [{"index": int(i), "actual": classes[int(labels[i])], "predicted": classes[int(probs[i].argmax())],
                "confidence": float(probs[i].max()), "true_class_probability": float(probs[i, labels[i]])}
               for i in chosen]
    summary = {"checkpoint": args.ckpt, "layer": args.layer, "test_images": len(images),
               "test_accuracy": accuracy, "misclassified": records}
    with open(os.path.join(out, "misclassified.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not records:
        print("no misclassified images: nothing to draw (wrote misclassified.json with an empty list)")
        return summary

    x = data.normalize(images[chosen], mean, std).contiguous(memory_format=torch.channels_last)
    with GradCAM(model, args.layer) as cam:
        pred_maps, _ = cam(x, probs[chosen].argmax(1))
        true_maps, _ = cam(x, labels[chosen])
    pictures = data.denormalize(x, mean, std).permute(0, 2, 3, 1).cpu().numpy()
    actual = [r["actual"] for r in records]
    predicted = [r["predicted"] for r in records]
    draw_misclassified(pictures, actual, predicted, os.path.join(out, "misclassified.png"))
    draw_gradcam(pictures, pred_maps.cpu().numpy(), true_maps.cpu().numpy(), actual, predicted,
                 [r["confidence"] for r in records], args.alpha, args.layer, os.path.join(out, "gradcam.png"))
    print(f"wrote misclassified.png, gradcam.png and misclassified.json to {out}")
    return summary


if __name__ == "__main__":
    main()
