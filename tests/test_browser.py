"""The web demo in a real headless Chromium, driven through Playwright as a person uses it: the page
loads with a test image, an upload is explained, each control changes what is shown, a bad index
says the range, the misclassified tab answers in seconds and for any seed, and a phone-size screen
shows it all.
Skipped, with the reason, where Gradio, Playwright or Debian's chromium is missing (.ci/run
installs them); Playwright's own browser download is not used."""
import os
import re
import shutil
import sys

import pytest
import torch

from conftest import REPO
from test_app import served  # noqa: F401  (the fixture: app.py on a random checkpoint and 100 test images)

sys.path.insert(0, str(REPO / "results" / "app"))
import screenshots  # noqa: E402  (its Chromium flags: no sandbox as root, no calls to the outside)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    sync = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install -r requirements-dev.txt")
    if not os.path.isfile(CHROMIUM):
        pytest.skip("needs Chromium (Debian's package chromium: apt-get install chromium)")
    with sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=screenshots.CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def wait_for_caption(page, starts):
    page.wait_for_function("s => [...document.querySelectorAll('.prose')].some(e => e.innerText.startsWith(s))",
                           arg=starts, timeout=60_000)


def in_view(page, locator):
    """Whether the element, scrolled into view, lies wholly inside the page's viewport."""
    locator.scroll_into_view_if_needed()
    box, view = locator.bounding_box(), page.viewport_size
    return 0 <= box["x"] and box["x"] + box["width"] <= view["width"] + 1 and 0 <= box["y"] and \
        box["y"] + box["height"] <= view["height"] + 1


def cards(page):
    return page.locator("#misclassified figure")


def test_a_person_uses_the_page(served, browser):  # noqa: F811
    """Screenshots go to $DEMO_SCREENSHOTS, else beside the served checkpoint (results/app's are
    taken by results/app/screenshots.py on a trained checkpoint)."""
    from PIL import Image

    url, folder = served
    shots = os.environ.get("DEMO_SCREENSHOTS", str(folder))
    image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8).numpy()
    Image.fromarray(image).save(folder / "photo.png")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    wait_for_caption(page, "Test image 0, ")  # shown on load
    assert "only CIFAR-10's 10 classes" in page.inner_text("body")

    page.locator("input[type=file]").first.set_input_files(str(folder / "photo.png"))
    wait_for_caption(page, "photo.png. Grad-CAM on layer3")
    page.get_by_label("Grad-CAM layer").click()
    page.get_by_role("option", name="layer2").click()
    wait_for_caption(page, "photo.png. Grad-CAM on layer2")  # the control re-ran the upload
    assert cards(page).count() == 0  # and not the hidden tab
    assert page.locator("#top-classes .confidence-set").count() == 3
    overlay = page.locator("#overlay img").get_attribute("src")
    page.locator("#opacity input[type=number]").fill("0.9")
    page.locator("#opacity input[type=number]").press("Enter")
    page.wait_for_function("old => document.querySelector('#overlay img').getAttribute('src') != old", arg=overlay,
                           timeout=60_000)  # another overlay: the pictures are named by their content
    page.locator("#top-k input[type=number]").fill("5")
    page.locator("#top-k input[type=number]").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#top-classes .confidence-set').length == 5",
                           timeout=60_000)  # three classes were listed
    screenshots.shoot(page, os.path.join(shots, "screenshot.png"))

    index = page.get_by_label("Or a test image: its index (0 to 9,999)")
    for typed in ("", "100", "-1", "3.7"):  # 3.7 showed image 4 in silence
        index.fill(typed)
        index.press("Enter")
        wait_for_caption(page, "Pick a test image by its index: a whole number from 0 to 99.")
    index.fill("7")
    page.get_by_role("button", name="Show the test image").click()
    wait_for_caption(page, "Test image 7, ")
    page.get_by_role("button").filter(has_text=re.compile(r"^cat \(\d+\)$")).click()  # an example
    wait_for_caption(page, "Test image ")
    page.wait_for_function("() => [...document.querySelectorAll('.prose')].some(e => / a cat\\. /.test(e.innerText))",
                           timeout=60_000)

    page.get_by_role("tab", name="Misclassified test images").click()
    page.wait_for_function("() => document.querySelectorAll('#misclassified figure').length == 10",
                           timeout=60_000)  # it filled itself when opened
    for n in range(10):
        assert in_view(page, cards(page).nth(n).locator("figcaption")), n
        assert in_view(page, cards(page).nth(n).locator("img").last), n  # the map beside its image
    seed = page.get_by_label("Seed of the random pick")
    for typed in ("5", "99999999999999999999"):  # the long one was an overflow in the server, "Error" here
        shown = page.inner_html("#misclassified")
        seed.fill(typed)
        seed.press("Enter")
        page.wait_for_function("old => document.querySelector('#misclassified').innerHTML != old", arg=shown,
                               timeout=30_000)  # another pick
        assert "Error" not in page.inner_text("body")
    shown = page.inner_html("#misclassified")
    page.get_by_label("Grad-CAM layer").click()
    page.get_by_role("option", name="layer4").click()
    page.wait_for_function("old => document.querySelector('#misclassified').innerHTML != old", arg=shown,
                           timeout=30_000)  # the maps of the tab on screen
    screenshots.shoot(page, os.path.join(shots, "screenshot-misclassified.png"))
    page.get_by_role("tab", name="Any image").click()
    wait_for_caption(page, "Test image ")
    page.wait_for_function("() => [...document.querySelectorAll('.prose')].some(e => e.innerText.includes("
                           "'Grad-CAM on layer4'))", timeout=30_000)  # brought up to date when shown again

    dark = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    dark.goto(url + "?__theme=dark")
    wait_for_caption(dark, "Test image 0, ")
    dark.get_by_role("tab", name="Misclassified test images").click()
    dark.wait_for_function("() => document.querySelectorAll('#misclassified figure').length == 10", timeout=60_000)
    screenshots.shoot(dark, os.path.join(shots, "screenshot-dark.png"))

    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(url)
    wait_for_caption(phone, "Test image 0, ")
    screenshots.shoot(phone, os.path.join(shots, "screenshot-phone.png"))
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # nothing wider than the screen
    phone.get_by_role("tab", name="Misclassified test images").click()
    phone.wait_for_function("() => document.querySelectorAll('#misclassified figure').length == 10", timeout=60_000)
    for n in range(10):
        assert in_view(phone, cards(phone).nth(n).locator("figcaption")), n
        assert in_view(phone, cards(phone).nth(n).locator("img").last), n
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    screenshots.shoot(phone, os.path.join(shots, "screenshot-phone-misclassified.png"))
