"""The sampling page in a real headless Chromium (the system's, driven by Playwright): type
prompts, press Generate, and the grid shows the very pixels the API returns for the same
seed; a reproduce link draws its image again. Saves docs/images/serve.png.

Skips only where no Chromium is installed (`.ci/run` installs it: apt's `chromium`).
"""

import os
import shutil

import numpy as np
import pytest
from conftest import ROOT
from sampling_helpers import tiny_run
from serve_helpers import gallery_pixels, server

gradio_client = pytest.importorskip("gradio_client", reason="pip install -e '.[test]'")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")

SCREENSHOT = ROOT / "docs" / "images" / "serve.png"
WAIT_MS = 120_000


def chromium() -> str:
  for name in (os.environ.get("PARTI_JAX_CHROMIUM", ""), "chromium", "chromium-browser",
               "google-chrome"):
    if name and (path := shutil.which(name)):
      return path
  pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run does), so no "
              "browser to drive")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  executable = chromium()
  workdir = tiny_run(tmp_path_factory)
  with server(workdir, tmp_path_factory.mktemp("browser") / "server.log",
              "--batch_sizes", "8") as (url, _), playwright.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
    tab = browser.new_page(viewport={"width": 1100, "height": 900})
    yield url, tab
    browser.close()


# The gallery's images as the browser decoded them: each drawn on a canvas at its own size.
READ_PIXELS = """() => [...document.querySelectorAll('#gallery img')].map(img => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  return {alt: img.alt, width: img.naturalWidth, height: img.naturalHeight,
          rgba: Array.from(context.getImageData(0, 0, img.naturalWidth, img.naturalHeight).data)};
})"""

LOADED = """n => { const images = [...document.querySelectorAll('#gallery img')];
  return images.length == n && images.every(img => img.complete && img.naturalWidth > 0); }"""


def shown(tab, count: int):
  """(captions, uint8 images) the grid shows, once it shows `count` loaded images."""
  tab.wait_for_function(LOADED, arg=count, timeout=WAIT_MS)
  read = tab.evaluate(READ_PIXELS)
  images = [np.array(x["rgba"], np.uint8).reshape(x["height"], x["width"], 4)[..., :3]
            for x in read]
  return [x["alt"] for x in read], images


def test_the_page_shows_what_the_api_returns_for_the_same_seed(page):
  url, tab = page
  prompts = "a red circle\ntwo blue squares"
  gallery, _, details = gradio_client.Client(url, verbose=False).predict(
      prompts, 2, 7, 0, 1.5, 0.2, 0, 1.0, False, api_name="/generate")
  expected = gallery_pixels(gallery)

  tab.goto(url)
  tab.locator("#prompts textarea").fill(prompts)
  tab.locator("#num_images input").fill("2")
  tab.locator("#seed input").fill("7")
  tab.locator("#generate").click()
  captions, images = shown(tab, 4)
  tab.get_by_text("4 images drawn").wait_for(timeout=WAIT_MS)
  assert captions == [g["caption"] for g in gallery] == [
      "a red circle | seed 7, sample 0", "a red circle | seed 7, sample 1",
      "two blue squares | seed 7, sample 0", "two blue squares | seed 7, sample 1"]
  for image, want in zip(images, expected):
    np.testing.assert_array_equal(image, want)
  SCREENSHOT.parent.mkdir(exist_ok=True)
  tab.screenshot(path=str(SCREENSHOT), full_page=True)

  # The last image's "draw again" link opens the page in a new tab, filled in, and draws
  # that image alone.
  with tab.context.expect_page() as opened:
    tab.get_by_role("link", name="draw again").last.click()
  linked = opened.value
  assert linked.url == url + "/" + details["images"][3]["link"]
  captions, images = shown(linked, 1)
  assert captions == ["two blue squares | seed 7, sample 1"]
  np.testing.assert_array_equal(images[0], expected[3])
  assert linked.locator("#seed input").input_value() == "7"
  assert linked.locator("#start input").input_value() == "1"
