"""A web demo of a trained checkpoint (Gradio): upload an image or pick a CIFAR-10 test image and
see the top classes and the Grad-CAM overlay, with the layer and the opacity as controls; a second
tab shows misclassified test images with their maps. Everything it computes is gradcam.py's.

    pip install -r requirements-app.txt                 # Gradio: an optional extra
    python app.py --ckpt runs/main/best.pt              # serves http://127.0.0.1:7860

On Hugging Face Spaces (Gradio SDK): put app.py, gradcam.py, common.py, data.py, resnet.py,
requirements.txt and the checkpoint, named best.pt or model.pt, in the Space. It starts there as
`python app.py` and finds the checkpoint beside it; CIFAR-10 is downloaded on first use.
"""
import argparse
import hashlib
import io
import os
import sys
import tempfile
import threading

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import gradcam

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_NAMES = ("best.pt", "model.pt")  # looked for beside app.py when --ckpt is not given
LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")
SHOWN = 256  # pixels a side of each picture on the page


def find_checkpoint(path=None):
    """--ckpt as given, else the first of CHECKPOINT_NAMES beside app.py (a Space's layout)."""
    if path:
        return path
    for name in CHECKPOINT_NAMES:
        if os.path.isfile(os.path.join(HERE, name)):
            return os.path.join(HERE, name)
    raise common.UserError(f"no checkpoint: pass --ckpt, or put one named {' or '.join(CHECKPOINT_NAMES)} "
                           f"beside app.py")


def enlarged(array, mode):
    """A H x W (x C) array as SHOWN x SHOWN (x C), by `mode` ('nearest' or 'bilinear')."""
    tensor = torch.as_tensor(array, dtype=torch.float32)
    tensor = tensor.permute(2, 0, 1)[None] if tensor.dim() == 3 else tensor[None, None]
    big = F.interpolate(tensor, size=(SHOWN, SHOWN), mode=mode, align_corners=None if mode == "nearest" else False)[0]
    return big.permute(1, 2, 0).numpy() if array.ndim == 3 else big[0].numpy()


def shown(picture, cam=None, alpha=0.5):
    """A H x W x 3 picture in [0, 1] as uint8 SHOWN pixels a side, its pixels kept square; with a
    Grad-CAM map, blended with the map upsampled smoothly, as gradcam.py's figures draw it."""
    big = enlarged(picture, "nearest")
    if cam is not None:
        big = gradcam.overlay(big, enlarged(cam, "bilinear").clip(0, 1), alpha)
    return (big.clip(0, 1) * 255).round().astype("uint8")


def png_file(picture, folder):
    """A uint8 picture as a PNG file in folder, named by its content and written atomically: Gradio
    caches an array by rewriting its PNG in place, which a concurrent download of the same picture
    (two users, one test image) can catch half written; a file it copies atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="png")
    path = os.path.join(folder, hashlib.sha1(buffer.getvalue()).hexdigest() + ".png")
    if not os.path.exists(path):
        common.save_atomic(path, lambda f: f.write(buffer.getvalue()))
    return path


def with_article(name):
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


class Demo:
    """The checkpoint's model and the test set, and what each control of the page asks of them.
    Gradio runs events in parallel threads: GradCAM and the model's forward are safe so, and the
    test set and its predictions, each made once, are guarded by a lock of their own (the page's
    test images do not wait for the predictions)."""

    PATIENCE = 10  # seconds the misclassified tab waits for the launch's scoring before it says so

    def __init__(self, ckpt, data_dir="./data", device="auto"):
        self.ckpt, self.data_dir = ckpt, data_dir
        self.model, self.classes, self.mean, self.std, self.tta = gradcam.load_model(ckpt, device)
        self.test_lock, self.probs_lock, self.test, self.probs = threading.Lock(), threading.Lock(), None, None
        self.pictures = tempfile.TemporaryDirectory(prefix="cifar10-demo-")  # what it serves; removed at exit
        self.folder = self.pictures.name
        self.scored = "starting"  # how far the launch's scoring of the test set has come

    def test_set(self):
        """CIFAR-10's test images and labels, loaded (and downloaded) once."""
        with self.test_lock:
            if self.test is None:
                images, labels, _ = data.load_cifar10(self.data_dir, "test", download=True, expect_full=False)
                self.test = images, labels
            return self.test

    def predictions(self, log=print, wait=None):
        """Every test image's class probabilities, computed once (app.py starts it at launch, with
        progress in the log, so the misclassified tab answers in seconds). None when they are still
        being computed after `wait` seconds (None: as long as it takes)."""
        if not self.probs_lock.acquire(timeout=-1 if wait is None else wait):
            return None
        try:
            if self.probs is None:
                images, _ = self.test_set()
                device = next(self.model.parameters()).device

                def progress(line, **kwargs):
                    self.scored = line
                    log(line, **kwargs)

                self.probs = gradcam.predict(self.model, images.to(device), self.mean, self.std, tta=self.tta,
                                             progress=progress).cpu()
            return self.probs
        finally:
            self.probs_lock.release()

    def explain(self, image, layer, alpha, top_k):
        """(top classes {name: p}, the 32 x 32 input, its overlay, a caption) for a uint8 image."""
        result = gradcam.explain(self.model, image, self.classes, self.mean, self.std, layer, tta=self.tta,
                                 top_k=int(top_k))
        picture = image.permute(1, 2, 0).numpy() / 255
        (name, cam), = result["maps"].items()
        caption = f"Grad-CAM on {layer} for '{name}': " + gradcam.evidence(cam, "where the model saw it")
        return (dict(result["top"]), png_file(shown(picture), self.folder),
                png_file(shown(picture, cam, alpha), self.folder), caption)

    def explain_upload(self, path, layer, alpha, top_k):
        if path is None:
            return {}, None, None, "Upload an image (JPEG, PNG, GIF or WebP) first.", "upload"
        name = os.path.basename(path)
        try:
            image = gradcam.fit_32(gradcam.read_image(path))
        except common.UserError as e:  # named as the user's file, not Gradio's copy of it
            return {}, None, None, f"{str(e).replace(path, name)}; try another file.", "upload"
        label, picture, heat, caption = self.explain(image, layer, alpha, top_k)
        return label, picture, heat, f"{name}. {caption}", "upload"

    def explain_test(self, index, layer, alpha, top_k):
        try:
            images, labels = self.test_set()
        except data.DataError as e:
            return {}, None, None, f"The test set is not available here: {e}", "test"
        if index is None or index != int(index) or not 0 <= index < len(images):
            return {}, None, None, (f"Pick a test image by its index: a whole number from 0 to "
                                    f"{len(images) - 1:,}."), "test"
        index = int(index)
        label, picture, heat, caption = self.explain(images[index], layer, alpha, top_k)
        return label, picture, heat, f"Test image {index}, {with_article(self.classes[int(labels[index])])}. " \
                                     f"{caption}", "test"

    def explain_shown(self, source, path, index, layer, alpha, top_k):
        """A control changed: explain again what the page shows (the upload or the test image)."""
        if source == "upload" and path is not None:
            return self.explain_upload(path, layer, alpha, top_k)
        return self.explain_test(index, layer, alpha, top_k)

    def misclassified(self, count, seed, layer, alpha):
        """A gallery of [(image beside its overlay, caption)] of misclassified test images, and a
        line about them."""
        try:
            images, labels = self.test_set()
        except data.DataError as e:
            return [], f"The test set is not available here: {e}"
        probs = self.predictions(wait=self.PATIENCE)
        if probs is None:
            return [], f"The test set is still being scored once at launch ({self.scored}); ask again in a moment."
        seed = int(seed or 0) % (common.SEED_MAX + 1)  # any whole number picks (a larger one overflowed torch)
        chosen = gradcam.misclassified(probs, labels, int(count), seed)
        x = data.normalize(images[chosen], self.mean, self.std)
        maps, _ = gradcam.GradCAM(self.model, gradcam.find_layer(self.model, layer))(x, probs[chosen].argmax(1))
        pictures = images[chosen].permute(0, 2, 3, 1).numpy() / 255
        gap = np.full((SHOWN, SHOWN // 16, 3), 255, dtype=np.uint8)
        gallery = [(png_file(np.concatenate([shown(p), gap, shown(p, m, alpha)], axis=1), self.folder),
                    f"{self.classes[int(labels[i])]} → {self.classes[int(probs[i].argmax())]} "
                    f"{100 * float(probs[i].max()):.0f}%")
                   for p, m, i in zip(pictures, maps.cpu().numpy(), chosen)]
        wrong = int((probs.argmax(1) != labels).sum())
        return gallery, (f"{wrong:,} of {len(labels):,} test images misclassified; each image beside its "
                         f"Grad-CAM for the predicted class.")


def build_page(demo, gr):
    """The page: the controls on top, a tab for any image, a tab for the misclassified test images;
    every control re-runs what its tab shows."""
    with gr.Blocks(title="CIFAR-10 ResNet18: what the model sees") as page:
        gr.Markdown(f"# CIFAR-10 ResNet18: what the model sees\nCheckpoint `{os.path.basename(demo.ckpt)}`; "
                    f"classes: {', '.join(demo.classes)}. Images are brought to 32 x 32 as the model saw CIFAR-10.")
        with gr.Row():
            layer = gr.Dropdown(list(LAYERS), value="layer3", label="Grad-CAM layer")
            alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
            top_k = gr.Slider(1, len(demo.classes), value=3, step=1, label="Classes to list", elem_id="top-k")
        source = gr.State("test")  # what the first tab shows: "upload" or "test"
        with gr.Tab("Any image"):
            with gr.Row():
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath")
                with gr.Column():
                    index = gr.Number(value=0, precision=0, label="Or a test image: its index (0 to 9,999)")
                    show_test = gr.Button("Show the test image")
            with gr.Row():
                classes = gr.Label(label="Top classes", elem_id="top-classes")
                picture = gr.Image(label="As the model sees it (32 x 32)", format="png")
                heat = gr.Image(label="Grad-CAM overlay", format="png", elem_id="overlay")
            caption = gr.Markdown()
            outputs = [classes, picture, heat, caption, source]
            controls = [layer, alpha, top_k]
            upload.upload(demo.explain_upload, [upload, *controls], outputs, api_name="explain_upload")
            show_test.click(demo.explain_test, [index, *controls], outputs, api_name="explain_test")
            index.submit(demo.explain_test, [index, *controls], outputs)
            page.load(demo.explain_test, [index, *controls], outputs)
            for control in controls:
                control.change(demo.explain_shown, [source, upload, index, *controls], outputs)
        with gr.Tab("Misclassified test images"):
            with gr.Row():
                count = gr.Slider(1, gradcam.MAX_COUNT, value=10, step=1, label="Images")
                seed = gr.Number(value=0, precision=0, label="Seed of the random pick")
            show = gr.Button("Show misclassified images")
            gallery = gr.Gallery(label="Actual → predicted: the image, then its Grad-CAM", columns=2, height="auto",
                                 object_fit="contain")
            summary = gr.Markdown()
            inputs = [count, seed, layer, alpha]
            show.click(demo.misclassified, inputs, [gallery, summary], api_name="misclassified")
            for control in (count, seed, layer, alpha):
                control.change(demo.misclassified, inputs, [gallery, summary])
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help=f"checkpoint (default: {' or '.join(CHECKPOINT_NAMES)} "
                                                     f"beside app.py)")
    parser.add_argument("--data-dir", default="./data", help="root holding cifar-10-batches-py/ (default ./data)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; a Space "
                                                            "sets its own)")
    parser.add_argument("--port", type=common.int_at_least(1, maximum=65535), default=None,
                        help="port, 1 to 65535 (default 7860, or Gradio's GRADIO_SERVER_PORT)")
    parser.add_argument("--export", metavar="FILE", help="write the checkpoint's weights alone to FILE (about 45 MB, "
                                                         "for a Space: no optimizer state) and exit")
    args = parser.parse_args(argv)
    if args.export:
        return common.main_guard(lambda: export(find_checkpoint(args.ckpt), args.export))
    try:
        import gradio as gr
    except ImportError:
        sys.exit("error: app.py needs Gradio, an optional extra of this project: pip install -r requirements-app.txt")
    common.resolve_device(args.device, parser)
    demo = common.main_guard(lambda: Demo(find_checkpoint(args.ckpt), args.data_dir, args.device))
    scoring = threading.Thread(target=score_test_set, args=(demo,), daemon=True)
    scoring.start()
    try:
        serve(demo, gr, args)
    except (SystemExit, KeyboardInterrupt) as stop:  # SIGTERM's, a busy port's; Ctrl-C before Gradio has it
        leave(demo, scoring, stop.code if isinstance(stop, SystemExit) else 130)
        raise
    leave(demo, scoring, 0)  # Gradio ended on Ctrl-C


def serve(demo, gr, args):
    """The page, until Ctrl-C or SIGTERM; a busy port in one sentence."""
    try:
        build_page(demo, gr).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", args.host),
                                    server_port=args.port)
    except OSError as e:
        if "port" not in str(e).lower():
            raise
        sys.exit(f"error: cannot serve on port {args.port or os.environ.get('GRADIO_SERVER_PORT', 7860)}, it is "
                 f"busy; pass --port with a free one")


def leave(demo, scoring, code):
    """Torch's forward in the launch's scoring thread aborts the interpreter's exit ('terminate
    called', SIGABRT): while it still runs, remove the served pictures and end the process at once
    with code (sys.exit's: a number, or a message for stderr and 1)."""
    if not scoring.is_alive():
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    demo.pictures.cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def export(ckpt, path):
    """The serving part of a train.py checkpoint (weights, classes, normalization, whether its run
    tested with flip TTA), without the optimizer's state that doubles its size."""
    state = common.load_checkpoint(ckpt)
    common.model_from_checkpoint(state, "cpu", ckpt)  # refuse what could not be served
    kept = {key: state[key] for key in ("model", "classes", "mean", "std", "arch") if key in state}
    kept["args"] = {"tta": bool((state.get("args") or {}).get("tta", False))}
    try:
        common.save_atomic(path, lambda f: torch.save(kept, f))
    except OSError as e:  # no such folder, no permission, a folder by that name
        raise common.UserError(f"cannot write {path} ({e.strerror}); choose another --export path") from None
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB) from {ckpt}")


def score_test_set(demo):
    """At launch, in the background: the predictions the misclassified tab needs, with progress."""
    try:
        print("Scoring the test set once for the misclassified tab ...", flush=True)
        demo.predictions()
        print("Test set scored: the misclassified tab answers in seconds.", flush=True)
    except data.DataError as e:
        print(f"The test set is not available here ({e}); the misclassified tab will say so.", flush=True)


if __name__ == "__main__":
    main()
