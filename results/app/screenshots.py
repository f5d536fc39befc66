"""The web demo's screenshots: app.py served on loopback with a checkpoint, then the page in headless
Chromium (Playwright) as a person sees it: a photo uploaded, and the misclassified tab, at a laptop's
1280 x 900 (also in dark mode) and a phone's 390 x 844.

    python results/app/screenshots.py --ckpt runs/quick/best.pt --data-dir ./data --photo PHOTO
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402  (serve(): app.py on a free loopback port)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETTLED = "() => !document.querySelector('.pending, .progress-text')"  # no output waits for an answer


def shoot(page, path):
    """The whole page once no output waits for an answer (Gradio fades those)."""
    page.wait_for_function(SETTLED, timeout=60_000)
    page.screenshot(path=path, full_page=True)


def caption(page, text):
    page.wait_for_function("s => [...document.querySelectorAll('.prose')].some(e => e.innerText.includes(s))",
                           arg=text, timeout=120_000)


def misclassified(page, name):
    """The misclassified tab once it shows its 10 cards (it waits for the launch's scoring)."""
    page.get_by_role("tab", name="Misclassified test images").click()
    page.wait_for_function("() => document.querySelectorAll('#misclassified figure').length == 10", timeout=600_000)
    shoot(page, os.path.join(HERE, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--photo", required=True, help="an image file to upload")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with open(os.path.join(HERE, ".screenshots-app.log"), "w") as log:
        proc, url = load.serve(args.ckpt, args.data_dir, log)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            laptop = browser.new_page(viewport={"width": 1280, "height": 900})
            laptop.goto(url)
            laptop.locator("input[type=file]").first.set_input_files(args.photo)
            caption(laptop, f"{os.path.basename(args.photo)}. Grad-CAM")
            shoot(laptop, os.path.join(HERE, "screenshot.png"))
            misclassified(laptop, "screenshot-misclassified.png")
            dark = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="dark")
            dark.goto(url + "?__theme=dark")
            caption(dark, "Test image 0, ")
            misclassified(dark, "screenshot-misclassified-dark.png")
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(url)
            caption(phone, "Test image 0, ")
            shoot(phone, os.path.join(HERE, "screenshot-phone.png"))
            misclassified(phone, "screenshot-phone-misclassified.png")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote screenshot.png, screenshot-misclassified.png, screenshot-misclassified-dark.png, "
          f"screenshot-phone.png and screenshot-phone-misclassified.png to {HERE}")


if __name__ == "__main__":
    main()
