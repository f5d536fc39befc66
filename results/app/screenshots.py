"""The README's screenshots of the web demo: app.py served on loopback with a checkpoint, a photo
uploaded, then the page at a desktop and at a phone's width, in headless Chromium (Playwright).

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
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(args.photo)
            page.wait_for_function("() => [...document.querySelectorAll('.prose')].some(e => e.innerText.includes("
                                   f"'{os.path.basename(args.photo)}. Grad-CAM'))", timeout=60_000)
            page.screenshot(path=os.path.join(HERE, "screenshot.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(url)
            phone.wait_for_function("() => [...document.querySelectorAll('.prose')].some("
                                    "e => e.innerText.startsWith('Test image 0'))", timeout=60_000)
            phone.screenshot(path=os.path.join(HERE, "screenshot-phone.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote screenshot.png and screenshot-phone.png to {HERE}")


if __name__ == "__main__":
    main()
