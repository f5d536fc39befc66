"""A web demo of a trained checkpoint (Gradio): upload an image or pick a CIFAR-10 test image and
see the top classes and the Grad-CAM overlay, with the layer and the opacity as controls; a second
tab shows misclassified test images with their maps. Everything it computes is gradcam.py's.

    pip install -r requirements-app.txt                 # Gradio: an optional extra
    python app.py --ckpt runs/main/best.pt              # serves http://127.0.0.1:7860

On Hugging Face Spaces (Gradio SDK): the README's last section says what goes in the Space. It
starts there as `python app.py` and finds the checkpoint beside it; CIFAR-10 is downloaded at launch.
"""
import argparse
import base64
import hashlib
import io
import math
import os
import sys
import tempfile
import threading
import time

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
RAW = dict(preprocess=False)  # every event gets the values a browser sent, which the demo checks
NO_TEST_SET = "The CIFAR-10 test set is not available on this server; upload an image instead."


def find_checkpoint(path=None):
    """--ckpt as given, else the first of CHECKPOINT_NAMES beside app.py (a Space's layout)."""
    if path:
        return path
    for name in CHECKPOINT_NAMES:
        if os.path.isfile(os.path.join(HERE, name)):
            return os.path.join(HERE, name)
    raise common.UserError(f"no checkpoint: pass --ckpt, or put one named {' or '.join(CHECKPOINT_NAMES)} "
                           f"beside app.py")


def enlarged(array, mode, size=SHOWN):
    """A H x W (x C) array as size x size (x C), by `mode` ('nearest' or 'bilinear')."""
    tensor = torch.as_tensor(array, dtype=torch.float32)
    tensor = tensor.permute(2, 0, 1)[None] if tensor.dim() == 3 else tensor[None, None]
    big = F.interpolate(tensor, size=(size, size), mode=mode, align_corners=None if mode == "nearest" else False)[0]
    return big.permute(1, 2, 0).numpy() if array.ndim == 3 else big[0].numpy()


def shown(picture, cam=None, alpha=0.5, size=SHOWN):
    """A H x W x 3 picture in [0, 1] as uint8 size pixels a side, its pixels kept square; with a
    Grad-CAM map, blended with the map upsampled smoothly, as gradcam.py's figures draw it."""
    big = enlarged(picture, "nearest", size)
    if cam is not None:
        big = gradcam.overlay(big, enlarged(cam, "bilinear", size).clip(0, 1), alpha)
    return (big.clip(0, 1) * 255).round().astype("uint8")


def png_bytes(picture):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="png")
    return buffer.getvalue()


def png_file(picture, folder):
    """A uint8 picture as a PNG file in folder, named by its content and written atomically: Gradio
    caches an array by rewriting its PNG in place, which a concurrent download of the same picture
    (two users, one test image) can catch half written; a file it copies atomically."""
    content = png_bytes(picture)
    path = os.path.join(folder, hashlib.sha1(content).hexdigest() + ".png")
    if not os.path.exists(path):
        common.save_atomic(path, lambda f: f.write(content))
    return path


def colour_bar():
    """The heatmap's scale as HTML: the jet colours from no evidence to the most, as in the maps."""
    from matplotlib import colormaps

    stops = ", ".join("#%02x%02x%02x" % tuple(int(255 * c) for c in colormaps["jet"](t / 8)[:3]) for t in range(9))
    return (f'<div style="max-width:{SHOWN * 2}px;font-size:0.85em"><div style="height:12px;border-radius:3px;'
            f'background:linear-gradient(to right, {stops})"></div><div style="display:flex;'
            f'justify-content:space-between"><span>0: no evidence</span><span>Grad-CAM</span>'
            f'<span>1: the most</span></div></div>')


def card(picture, cam, alpha, caption):
    """One misclassified image beside its overlay, the caption above both, as HTML with the pictures
    inline: it wraps to the screen's width and nothing is cached on the server."""
    images = ""
    for cam_or_none, what in ((None, "the image"), (cam, "its Grad-CAM")):
        encoded = base64.b64encode(png_bytes(shown(picture, cam_or_none, alpha, 128))).decode()
        images += f'<img src="data:image/png;base64,{encoded}" alt="{what}" style="width:calc(50% - 2px)">'
    return (f'<figure style="margin:0;width:min(100%, 300px)"><figcaption style="font-weight:600;margin-bottom:4px">'
            f'{caption}</figcaption><div style="display:flex;gap:4px">{images}</div></figure>')


def with_article(name):
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def whole(value, low, high):
    """value as an int when it is a whole number in low..high (a browser may send anything), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return int(value) if ok and value == int(value) and low <= value <= high else None


def controls_sentence(layer, alpha, top_k, classes):
    """None when the controls hold values the demo can use, else the sentence that says which."""
    if layer not in LAYERS:
        return f"Pick a Grad-CAM layer: {', '.join(LAYERS)}."
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        return "The heatmap's opacity is a number from 0 to 1."
    if top_k is not None and whole(top_k, 1, classes) is None:
        return f"The classes to list are a whole number from 1 to {classes}."
    return None


class Demo:
    """The checkpoint's model and the test set, and what each control of the page asks of them.
    Gradio runs events in parallel threads: GradCAM and the model's forward are safe so, and the
    test set and its predictions, each made once, are guarded by a lock of their own (the page's
    test images do not wait for the predictions)."""

    PATIENCE = 0.5  # seconds the misclassified tab waits for the launch's scoring before it says how far it is

    def __init__(self, ckpt, folder, data_dir="./data", device="auto"):
        self.ckpt, self.folder, self.data_dir = ckpt, folder, data_dir
        self.model, self.classes, self.mean, self.std, self.tta = gradcam.load_model(ckpt, device)
        self.test_lock, self.probs_lock, self.test, self.probs = threading.Lock(), threading.Lock(), None, None
        self.scored = "starting"  # how far the launch's scoring of the test set has come

    def test_set(self):
        """CIFAR-10's test images and labels, loaded (and downloaded) once."""
        with self.test_lock:
            if self.test is None:
                images, labels, _ = data.load_cifar10(self.data_dir, "test", download=True, expect_full=False)
                self.test = images, labels
            return self.test

    def predictions(self, log=print, wait=None):
        """Every test image's class probabilities, computed once as train.py's test pass scores
        (batches of 1,024, its mixed precision), with progress in the log after every batch. None
        when they are still being computed after `wait` seconds (None: as long as it takes)."""
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
                                             amp_dtype=common.amp_dtype(device), progress=progress).cpu()
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

    def explain_upload(self, upload, layer, alpha, top_k):
        """The upload as Gradio hands it over without preprocessing: {'path': ...} (or None)."""
        refused = controls_sentence(layer, alpha, top_k, len(self.classes))
        path = upload.get("path") if isinstance(upload, dict) else None
        if refused or path is None:
            return {}, None, None, refused or "Upload an image (JPEG, PNG, GIF or WebP) first.", "upload"
        name = upload.get("orig_name") or os.path.basename(path)
        try:
            image = gradcam.fit_32(gradcam.read_image(path))
        except common.UserError as e:  # named as the user's file, not Gradio's copy of it
            return {}, None, None, f"{str(e).replace(path, name)}; try another file.", "upload"
        label, picture, heat, caption = self.explain(image, layer, alpha, top_k)
        return label, picture, heat, f"{name}. {caption}", "upload"

    def explain_test(self, index, layer, alpha, top_k):
        try:
            images, labels = self.test_set()
        except data.DataError:
            return {}, None, None, NO_TEST_SET, "test"
        refused = controls_sentence(layer, alpha, top_k, len(self.classes))
        index = whole(index, 0, len(images) - 1)
        if refused or index is None:
            return {}, None, None, refused or (f"Pick a test image by its index: a whole number from 0 to "
                                               f"{len(images) - 1:,}."), "test"
        label, picture, heat, caption = self.explain(images[index], layer, alpha, top_k)
        return label, picture, heat, f"Test image {index}, {with_article(self.classes[int(labels[index])])}. " \
                                     f"{caption}", "test"

    def explain_shown(self, tab, source, upload, index, layer, alpha, top_k):
        """A control changed: explain again what the first tab shows (the upload or the test image),
        when that tab is on screen."""
        import gradio as gr

        if tab != "any":
            return (gr.skip(),) * 5
        if source == "upload" and upload is not None:
            return self.explain_upload(upload, layer, alpha, top_k)
        return self.explain_test(index, layer, alpha, top_k)

    def misclassified(self, count, seed, layer, alpha):
        """(HTML of misclassified test images, each beside its overlay under its caption; a line about
        them)."""
        try:
            images, labels = self.test_set()
        except data.DataError:
            return "", NO_TEST_SET
        refused = controls_sentence(layer, alpha, None, len(self.classes))
        count, seed = whole(count, 1, gradcam.MAX_COUNT), whole(seed, -math.inf, math.inf)
        if refused or count is None or seed is None:
            return "", refused or (f"The images to show are a whole number from 1 to {gradcam.MAX_COUNT}, the "
                                   f"seed any whole number.")
        probs = self.predictions(wait=self.PATIENCE)
        if probs is None:
            return "", f"The test set is being scored once at launch ({self.scored}); this tab fills itself."
        chosen = gradcam.misclassified(probs, labels, count, seed % (common.SEED_MAX + 1))
        x = data.normalize(images[chosen], self.mean, self.std)
        maps, _ = gradcam.GradCAM(self.model, gradcam.find_layer(self.model, layer))(x, probs[chosen].argmax(1))
        pictures = images[chosen].permute(0, 2, 3, 1).numpy() / 255
        cards = [card(p, m, alpha, f"{self.classes[int(labels[i])]} → {self.classes[int(probs[i].argmax())]} "
                                   f"{100 * float(probs[i].max()):.0f}%")
                 for p, m, i in zip(pictures, maps.cpu().numpy(), chosen)]
        wrong = int((probs.argmax(1) != labels).sum())
        return (f'<div style="display:flex;flex-wrap:wrap;gap:16px">{"".join(cards)}</div>',
                f"{wrong:,} of {len(labels):,} test images misclassified. Each card: actual → predicted (its "
                f"probability), the image, and its Grad-CAM for the predicted class.")

    def misclassified_shown(self, tab, count, seed, layer, alpha):
        """The misclassified tab's outputs and its timer, which polls while the test set is scored;
        nothing when the tab is not on screen."""
        import gradio as gr

        if tab != "wrong":
            return gr.skip(), gr.skip(), gr.skip()
        cards, summary = self.misclassified(count, seed, layer, alpha)
        return cards, summary, gr.Timer(active=self.test is not None and self.probs is None)

    def examples(self):
        """One test image of each class: [(index, label)], none without the test set."""
        try:
            _, labels = self.test_set()
        except data.DataError:
            return []
        return [(int((labels == c).nonzero()[0]), name) for c, name in enumerate(self.classes) if (labels == c).any()]


def build_page(demo, gr):
    """The page: the controls on top, a tab for any image, a tab for the misclassified test images.
    A control re-runs only the tab on screen."""
    with gr.Blocks(title="CIFAR-10 ResNet18: what the model sees", delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# CIFAR-10 ResNet18: what the model sees\nCheckpoint `{os.path.basename(demo.ckpt)}`. "
                    f"It knows only CIFAR-10's {len(demo.classes)} classes ({', '.join(demo.classes)}): a photo of "
                    f"anything else still gets one of them. Images are brought to 32 x 32, as it saw CIFAR-10.")
        with gr.Row():
            layer = gr.Dropdown(list(LAYERS), value="layer3", label="Grad-CAM layer")
            alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity", elem_id="opacity")
            top_k = gr.Slider(1, len(demo.classes), value=3, step=1, label="Classes to list", elem_id="top-k")
        tab, source = gr.State("any"), gr.State("test")  # the tab on screen; what the first tab shows
        with gr.Tab("Any image") as any_tab:
            with gr.Row():
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath")
                with gr.Column():
                    index = gr.Number(value=0, precision=0, label="Or a test image: its index (0 to 9,999)")
                    show_test = gr.Button("Show the test image")
                    picks = demo.examples()
                    if picks:
                        examples = gr.Examples([[i] for i, _ in picks], [index], label="A test image of each class",
                                               example_labels=[f"{name} ({i})" for i, name in picks])
            with gr.Row():
                classes = gr.Label(label="Top classes", elem_id="top-classes")
                picture = gr.Image(label="As the model sees it (32 x 32)", format="png")
                with gr.Column():
                    heat = gr.Image(label="Grad-CAM overlay", format="png", elem_id="overlay")
                    gr.HTML(colour_bar())
            caption = gr.Markdown()
            outputs, controls = [classes, picture, heat, caption, source], [layer, alpha, top_k]
            shown_inputs = [tab, source, upload, index, *controls]
            upload.upload(demo.explain_upload, [upload, *controls], outputs, api_name="explain_upload", **RAW)
            show_test.click(demo.explain_test, [index, *controls], outputs, api_name="explain_test", **RAW)
            index.submit(demo.explain_test, [index, *controls], outputs, **RAW)
            if picks:
                examples.load_input_event.then(demo.explain_test, [index, *controls], outputs, **RAW)
            page.load(demo.explain_test, [index, *controls], outputs, **RAW)
        with gr.Tab("Misclassified test images") as wrong_tab:
            inputs, wrong = misclassified_tab(demo, gr, tab, layer, alpha)
        any_tab.select(lambda: "any", None, tab).then(demo.explain_shown, shown_inputs, outputs, **RAW)
        wrong_tab.select(lambda: "wrong", None, tab).then(demo.misclassified_shown, inputs, wrong, **RAW)
        for control in controls:
            control.change(demo.explain_shown, shown_inputs, outputs, **RAW)
        for control in (layer, alpha):
            control.change(demo.misclassified_shown, inputs, wrong, **RAW)
    return page


def misclassified_tab(demo, gr, tab, layer, alpha):
    """The misclassified tab's controls and outputs, which its own controls and a timer re-run while
    the test set is scored; returns the inputs and outputs that the page's controls re-run too."""
    with gr.Row():
        count = gr.Slider(1, gradcam.MAX_COUNT, value=10, step=1, label="Images")
        seed = gr.Number(value=0, precision=0, label="Seed of the random pick")
    show = gr.Button("Show other misclassified images")
    summary = gr.Markdown()
    cards = gr.HTML(elem_id="misclassified")
    gr.HTML(colour_bar())
    timer = gr.Timer(2.0, active=False)
    inputs, wrong = [tab, count, seed, layer, alpha], [cards, summary, timer]
    show.click(demo.misclassified, [count, seed, layer, alpha], [cards, summary], api_name="misclassified", **RAW)
    for trigger in (count.change, seed.change, timer.tick):
        trigger(demo.misclassified_shown, inputs, wrong, **RAW)
    return inputs, wrong


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
    common.resolve_device(args.device, parser)
    served = tempfile.TemporaryDirectory(prefix="cifar10-demo-")  # removed at exit, whichever way it comes
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(served.name, "gradio")  # uploads and Gradio's copies too
    try:
        import gradio as gr
    except ImportError:
        sys.exit("error: app.py needs Gradio, an optional extra of this project: pip install -r requirements-app.txt")
    demo = common.main_guard(lambda: Demo(find_checkpoint(args.ckpt), served.name, args.data_dir, args.device))
    scoring = threading.Thread(target=score_test_set, args=(demo,), daemon=True)
    scoring.start()
    try:
        serve(demo, gr, args)
    except (SystemExit, KeyboardInterrupt) as stop:  # SIGTERM's, a busy port's; Ctrl-C before Gradio has it
        leave(served, scoring, stop.code if isinstance(stop, SystemExit) else 130)
        raise
    leave(served, scoring, 0)  # Gradio ended on Ctrl-C


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


def leave(served, scoring, code):
    """Torch's forward in the launch's scoring thread aborts the interpreter's exit ('terminate
    called', SIGABRT): while it still runs, remove the served folder and end the process at once
    with code (sys.exit's: a number, or a message for stderr and 1)."""
    if not scoring.is_alive():
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    served.cleanup()
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
        start = time.perf_counter()
        demo.predictions()
        print(f"Test set scored in {time.perf_counter() - start:.0f} s: the misclassified tab answers in seconds.",
              flush=True)
    except data.DataError as e:
        print(f"The test set is not available here ({e}); the misclassified tab will say so.", flush=True)


if __name__ == "__main__":
    main()
