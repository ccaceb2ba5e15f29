"""The page of ``inkwash serve`` in a real browser: Debian's chromium driven by playwright against a server
running a tiny random class-conditional model. It checks what a user sees and does: the progress bar and
the live preview during a run, seeds that reproduce pixels, inpainting that keeps the unpainted pixels,
PNG info sent back to the controls, Interrupt, errors shown on the page, and no console errors anywhere.

Skipped when chromium or playwright is missing, unless INKWASH_REQUIRE_BROWSER=1 (``make test``).
INKWASH_SCREENSHOT=1 also writes docs/webui.png (with INKWASH_SCREENSHOT_CHECKPOINT=RUN, from that trained
run instead of a random model).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_random_run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 860}
ROOT = Path(__file__).resolve().parent.parent
CLASSES = [str(i) for i in range(10)]


def _unavailable(reason: str) -> None:
    if os.environ.get("INKWASH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests cannot run: {reason} (INKWASH_REQUIRE_BROWSER=1 requires them)", pytrace=False)
    pytest.skip(f"browser tests skipped: {reason}")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright-python is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    import torch

    from inkwash.serve.app import ServerThread, create_app
    from inkwash.serve.config import ServeOptions

    root = tmp_path_factory.mktemp("browser")
    # INKWASH_SCREENSHOT_CHECKPOINT: a trained class-conditional digits run for docs/webui.png (the tests
    # pass with it as well); by default a random tiny model.
    trained = os.environ.get("INKWASH_SCREENSHOT_CHECKPOINT")
    checkpoint = Path(trained) if trained else save_random_run(root / "digits", class_names=CLASSES)
    save_random_run(root / "more" / "plain")  # a second, unconditional model, for the model menu
    options = ServeOptions(checkpoint=str(checkpoint), models=str(root / "more"))
    # The server samples in this process while chromium draws the page on the same cores. On a 2-core
    # machine torch's two spin-waiting intra-op threads then ran 300 DDPM steps in 46-50 s instead of 3 s
    # with one thread (measured), so the module samples on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerThread(create_app(options)) as server:
            yield server.url
    finally:
        torch.set_num_threads(threads)


class Session:
    """One page of the app, with what its console said and what it fetched."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url
        self.problems: list[str] = []
        self.allowed: list[str] = []  # substrings of console errors a test provokes on purpose
        self.foreign: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("request", self._request)

    def _console(self, message) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def _request(self, request) -> None:
        if not (request.url.startswith(self.url) or request.url.startswith("data:")):
            self.foreign.append(request.url)

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(allowed in p for allowed in self.allowed)]


def open_page(browser, url: str):
    """A fresh page on ``url``, ready; after the test, no console errors and nothing fetched elsewhere."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(20_000)
    session = Session(page, url)
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    yield session
    context.close()
    assert session.unexpected() == [], "the page logged errors"
    assert session.foreign == [], "the page fetched something from another server"


@pytest.fixture
def ui(browser, server_url):
    yield from open_page(browser, server_url)


@pytest.fixture(scope="module")
def sd_url(tmp_path_factory):
    """A server whose first model is a tiny random Stable Diffusion folder ("sd"), with a class-conditional run
    ("digits") beside it."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import torch

    from inkwash.interop.random_folders import build_stable_diffusion
    from inkwash.serve.app import ServerThread, create_app
    from inkwash.serve.config import ServeOptions

    root = tmp_path_factory.mktemp("browser-sd")
    build_stable_diffusion(root / "sd")
    save_random_run(root / "more" / "digits", class_names=CLASSES)
    options = ServeOptions(checkpoint=str(root / "sd"), models=str(root / "more"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as server_url: one thread beside chromium
    try:
        with ServerThread(create_app(options)) as server:
            yield server.url
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def sd_ui(browser, sd_url):
    yield from open_page(browser, sd_url)


# ---------- helpers ----------


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def cards(page) -> int:
    return page.locator("#gallery .shot").count()


def generate(page, timeout: float = 120_000) -> list[str]:
    """Click Generate, wait for the answer; the data URLs of the new gallery images, in order."""
    before = cards(page)
    page.click("#generate")
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=timeout)
    assert not page.locator("#message").is_visible(), page.inner_text("#message")
    new = cards(page) - before
    assert new > 0
    return [page.locator("#gallery .shot-img").nth(i).get_attribute("src") for i in range(new)]


def pick(page, *, prompt="", negative="", sampler="Euler", scheduler="Automatic", steps=6, cfg=2, seed=-1):
    page.select_option("#prompt", prompt)
    page.select_option("#negative-prompt", negative)
    page.select_option("#sampler", sampler)
    page.select_option("#scheduler", scheduler)
    page.fill("#steps", str(steps))
    page.fill("#cfg", str(cfg))
    page.fill("#seed", str(seed))


def wait_for_sampling(page) -> None:
    page.wait_for_function("Number(document.querySelector('#progress-bar').getAttribute('aria-valuenow')) >= 1")


# Records every change of the preview and of the progress bar, with whether results had arrived by then.
RECORDER = """() => {
  window.__seen = [];
  const note = (kind, value) => window.__seen.push({
    kind, value, text: document.querySelector('#progress-text').textContent,
    results: document.querySelectorAll('#gallery .shot').length,
  });
  const preview = document.querySelector('#preview');
  const bar = document.querySelector('#progress-bar');
  new MutationObserver(() => note('preview', preview.getAttribute('src')))
    .observe(preview, {attributes: true, attributeFilter: ['src']});
  new MutationObserver(() => note('progress', Number(bar.getAttribute('aria-valuenow'))))
    .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
}"""


# ---------- tests ----------


def test_the_page_fills_its_menus_from_the_api(ui):
    page = ui.page
    assert page.title() == "inkwash"
    samplers = page.locator("#sampler option").all_inner_texts()
    assert len(samplers) == 15 and {"DDPM", "DDIM", "Euler a", "DPM++ 2M", "UniPC"} <= set(samplers)
    assert page.locator("#scheduler option").all_inner_texts()[:3] == ["Automatic", "Uniform", "Karras"]
    assert page.locator("#prompt option").evaluate_all("options => options.map(o => o.value)") == ["", *CLASSES]
    assert page.locator("#negative-prompt option").count() == 11
    assert page.locator("#model option").all_inner_texts() == ["digits", "plain"]
    assert page.input_value("#model") == "digits"
    assert "16×16" in page.inner_text("#model-info")
    assert page.get_attribute("#steps", "max") == "1000"
    assert page.input_value("#seed") == "-1"
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt")
    # the steps follow the sampler's default until the user sets them
    page.select_option("#sampler", "DDPM")
    assert page.input_value("#steps") == "1000"
    page.select_option("#sampler", "DDIM")
    assert page.input_value("#steps") == "50"
    # eta and s_churn sit in a closed Advanced section; every control has a label
    assert page.locator("#advanced").get_attribute("open") is None
    page.click("#advanced summary")
    assert page.is_visible("#eta") and page.is_visible("#s-churn")
    for control in ("prompt", "negative-prompt", "sampler", "scheduler", "steps", "cfg", "seed", "eta", "s-churn"):
        assert page.locator(f"label[for={control}]").count() == 1, control


def test_the_model_menu_switches_models(ui):
    page = ui.page
    page.select_option("#model", "plain")
    page.wait_for_function("document.querySelector('#prompt').disabled")
    assert page.inner_text("#model-info") == "16×16 grayscale · unconditional"
    assert page.is_disabled("#negative-prompt") and page.is_disabled("#cfg")
    page.select_option("#sampler", "Euler")
    page.fill("#steps", "5")
    page.fill("#seed", "9")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page)
    body = sent.value.post_data_json
    assert body["override_settings"] == {"sd_model_checkpoint": "plain"} and body["prompt"] == ""
    assert "cfg_scale" not in body
    assert "Model: plain" in page.locator("#gallery .infotext").first.text_content()

    page.select_option("#model", "digits")
    page.wait_for_function("!document.querySelector('#prompt').disabled")
    assert page.locator("#prompt option").count() == 11
    page.select_option("#prompt", "4")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page)
    assert sent.value.post_data_json["override_settings"] == {"sd_model_checkpoint": "digits"}
    assert page.locator("#gallery .infotext").first.text_content().startswith("4\n")


def test_generate_shows_progress_and_a_live_preview(ui):
    page = ui.page
    pick(page, prompt="3", sampler="DDPM", steps=300, seed=11)
    page.evaluate(RECORDER)
    [image] = generate(page)
    seen = page.evaluate("window.__seen")
    during = [s for s in seen if s["results"] == 0]
    progress = [s["value"] for s in during if s["kind"] == "progress"]
    assert any(0 < value < 100 for value in progress), seen
    assert any("ETA" in s["text"] and "step" in s["text"] for s in during), seen
    previews = [s["value"] for s in during if s["kind"] == "preview" and s["value"]]
    assert previews, "the preview never showed the predicted image during the run"
    assert pixels(previews[0]).shape[:2] == (16, 16)
    assert page.get_attribute("#progress-bar", "aria-valuenow") == "100"
    assert page.inner_text("#progress-text").startswith("Done: 1 image")

    card = page.locator("#gallery .shot").first
    info = card.locator(".infotext").text_content()
    assert info.startswith("3\n") and "Steps: 300, Sampler: DDPM" in info and "Seed: 11," in info
    link = card.locator("a.shot-download")
    assert link.get_attribute("download") == "inkwash-11.png" and link.get_attribute("href") == image
    assert pixels(image).shape[:2] == (16, 16)
    shown = card.locator(".shot-img")
    assert shown.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    assert shown.bounding_box()["width"] >= 128


def test_the_same_seed_gives_the_same_pixels(ui):
    page = ui.page
    pick(page, prompt="5", sampler="Euler a", steps=8, seed=123)
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    [first] = generate(page)
    seed = int(page.locator("#gallery .shot").first.get_attribute("data-seed"))
    assert seed >= 0
    page.click("#seed-reuse")  # ♻: the last image's seed
    assert page.input_value("#seed") == str(seed)
    [again] = generate(page)
    assert np.array_equal(pixels(first), pixels(again))
    page.fill("#seed", str(seed + 1))
    [other] = generate(page)
    assert not np.array_equal(pixels(first), pixels(other))

    # a batch: image i has seed S + i, and each has its own download name
    page.fill("#seed", "77")
    page.fill("#batch-size", "2")
    page.fill("#batch-count", "2")
    batch = generate(page)
    assert len(batch) == 4
    names = page.locator("#gallery a.shot-download").evaluate_all("links => links.map(a => a.download)")
    assert names[:4] == ["inkwash-77.png", "inkwash-78.png", "inkwash-79.png", "inkwash-80.png"]

    # Send to img2img puts the image under the mask canvas
    page.locator("#gallery .shot-img2img").first.click()
    assert page.get_attribute("#tab-img2img", "aria-selected") == "true"
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.get_attribute("#init-image", "src") == batch[0]


def test_inpainting_keeps_the_pixels_outside_the_painted_mask(ui, tmp_path):
    page = ui.page
    ramp = np.add.outer(np.arange(16) * 9, np.arange(16) * 6).astype(np.uint8)  # distinct, smooth pixels
    Image.fromarray(ramp, "L").save(tmp_path / "init.png")
    page.click("#tab-img2img")
    assert page.is_visible("#init-drop") and page.input_value("#mask-blur") == "4"
    page.set_input_files("#init-file", str(tmp_path / "init.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.locator("#mask-canvas").evaluate("canvas => [canvas.width, canvas.height]") == [16, 16]

    # paint a short stroke near the top-left corner: the canvas shows 16 px at 256 px, 16 screen px a pixel
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / 16

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * scale, box["y"] + y * scale

    page.locator("#brush-size").evaluate("range => { range.value = '2'; range.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#brush-size-out") == "2 px"
    page.mouse.move(*at(2.5, 2.5))
    page.mouse.down()
    page.mouse.move(*at(5.5, 2.5), steps=6)
    page.mouse.move(*at(5.5, 4.5), steps=4)
    page.mouse.up()
    page.fill("#mask-blur", "2")
    page.fill("#denoise", "1")
    pick(page, prompt="8", sampler="Euler", steps=8, seed=5)

    with page.expect_request("**/sdapi/v1/img2img") as sent:
        [result] = generate(page)
    body = sent.value.post_data_json
    assert body["denoising_strength"] == 1 and body["mask_blur"] == 2 and body["init_images"][0].startswith("data:")
    mask = pixels(body["mask"])
    assert mask.shape[:2] == (16, 16)
    painted = mask.reshape(16, 16, -1)[..., 0] > 127
    assert painted[2, 2] and painted[2, 5] and painted[4, 5]
    assert not painted[8:].any() and not painted[:, 9:].any()

    # the server blurs the mask with the WebUI's kernel, of radius int(2.5 * blur + 0.5)
    radius = int(2.5 * 2 + 0.5)
    ys, xs = np.nonzero(painted)
    rows, cols = np.mgrid[0:16, 0:16]
    reach = np.min(np.maximum(abs(rows[..., None] - ys), abs(cols[..., None] - xs)), axis=-1)
    outside = reach > radius
    out = pixels(result).reshape(16, 16, -1)[..., 0]
    assert outside.sum() > 100
    assert np.array_equal(out[outside], ramp[outside])
    assert not np.array_equal(out[painted], ramp[painted]), "the painted pixels were not regenerated"

    # clear the mask: no mask is sent and the whole picture is redrawn
    page.click("#mask-clear")
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page)
    assert "mask" not in sent.value.post_data_json


def test_png_info_reads_the_parameters_back_into_txt2img(ui, tmp_path):
    page = ui.page
    pick(page, prompt="7", negative="2", sampler="DPM++ 2M", scheduler="Karras", steps=6, cfg=2.5, seed=4242)
    [image] = generate(page)
    (tmp_path / "made.png").write_bytes(base64.b64decode(image.split(",", 1)[1]))
    pick(page, prompt="", sampler="DDIM", steps=3, cfg=1, seed=-1)  # something else, to be overwritten

    page.click("#tab-pnginfo")
    assert page.is_hidden("#generate")
    page.set_input_files("#pnginfo-file", str(tmp_path / "made.png"))
    page.wait_for_function("document.querySelector('#pnginfo-out').textContent.includes('Seed: 4242')")
    info = page.text_content("#pnginfo-out")
    assert info.startswith("7\nNegative prompt: 2\nSteps: 6, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 2.5")
    table = dict(
        zip(
            page.locator("#pnginfo-params th").all_inner_texts(),
            page.locator("#pnginfo-params td").all_inner_texts(),
            strict=True,
        )
    )
    assert table["Sampler"] == "DPM++ 2M" and table["Seed"] == "4242" and table["Model"] == "digits"

    page.click("#pnginfo-send")
    assert page.get_attribute("#tab-txt2img", "aria-selected") == "true" and page.is_visible("#generate")
    filled = {
        name: page.input_value(f"#{name}")
        for name in ("prompt", "negative-prompt", "sampler", "scheduler", "steps", "cfg", "seed")
    }
    assert filled == {
        "prompt": "7",
        "negative-prompt": "2",
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
        "steps": "6",
        "cfg": "2.5",
        "seed": "4242",
    }
    [again] = generate(page)
    assert np.array_equal(pixels(again), pixels(image))

    # a dropped file works as well as a chosen one
    page.fill("#seed", "-1")
    page.click("#tab-pnginfo")
    page.evaluate("() => { document.querySelector('#pnginfo-out').textContent = ''; }")
    dropped = page.evaluate_handle(
        """async (url) => {
            const blob = await (await fetch(url)).blob();
            const data = new DataTransfer();
            data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
            return data;
        }""",
        image,
    )
    page.dispatch_event("#pnginfo-drop", "drop", {"dataTransfer": dropped})
    page.wait_for_function("document.querySelector('#pnginfo-out').textContent.includes('Seed: 4242')")
    # and Send to img2img takes the picture along with its parameters
    page.click("#pnginfo-send-img2img")
    assert page.get_attribute("#tab-img2img", "aria-selected") == "true"
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.get_attribute("#init-image", "src") == image and page.input_value("#seed") == "4242"


def test_interrupt_stops_a_long_run_quickly(ui):
    page = ui.page
    pick(page, prompt="1", sampler="DDPM", steps=1000, seed=3)
    page.click("#generate")
    wait_for_sampling(page)
    page.wait_for_function("document.querySelector('#progress-text').textContent.includes('step')")
    assert page.is_enabled("#interrupt")
    start = time.monotonic()
    page.click("#interrupt")
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=10_000)
    took = time.monotonic() - start
    assert took < 3, f"the request came back {took:.1f} s after Interrupt"
    assert page.inner_text("#progress-text").startswith("Interrupted")
    assert not page.locator("#message").is_visible()
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt")


def test_api_errors_are_shown_on_the_page(ui):
    page = ui.page
    ui.allowed.append("status of 422")  # the browser logs every 4xx answer of fetch()
    pick(page, steps=6)
    page.fill("#steps", "5000")
    page.click("#generate")
    page.wait_for_selector("#message", state="visible")
    text = page.inner_text("#message-text")
    assert "steps" in text and "1000" in text and "422" in text
    assert page.get_attribute("#message", "role") == "alert"
    assert page.inner_text("#progress-text") == "Failed" and page.is_enabled("#generate")
    assert cards(page) == 0
    page.click("#message-close")
    assert page.is_hidden("#message")

    # img2img without an input image is refused on the page, before any request
    page.click("#tab-img2img")
    page.click("#generate")
    assert "input image" in page.inner_text("#message-text")


def test_the_api_docs_work_offline(browser, server_url):
    """/docs in chromium: Swagger UI draws the WebUI API from this server's own files (nothing from a CDN: most
    machines this runs on have no internet) and "Try it out" reaches the API."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(20_000)
    session = Session(page, server_url)
    page.goto(server_url + "/docs")
    operation = page.locator("#operations-WebUI_API-samplers_sdapi_v1_samplers_get")
    operation.locator(".opblock-summary").click()
    page.click("#operations-WebUI_API-samplers_sdapi_v1_samplers_get .try-out__btn")
    with page.expect_response("**/sdapi/v1/samplers") as answer:
        operation.locator(".execute").click()
    assert answer.value.status == 200
    assert "DPM++ 2M" in operation.locator(".responses-wrapper .live-responses-table").inner_text()
    assert page.locator(".opblock-summary-path[data-path='/sdapi/v1/txt2img']").count() == 1
    context.close()
    assert session.unexpected() == [], "the docs page logged errors"
    assert session.foreign == [], "the docs page fetched something from another server"


def test_stable_diffusion_prompt_and_size(sd_ui):
    page = sd_ui.page
    # a text-conditional model: prompt boxes and a size instead of the class menus
    assert page.input_value("#model") == "sd" and "text prompts" in page.inner_text("#model-info")
    assert page.is_visible("#prompt-text") and page.is_visible("#negative-text")
    assert page.is_hidden("#prompt") and page.is_hidden("#negative-prompt")
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "64")
    assert page.get_attribute("#width", "step") == "8" and page.get_attribute("#height", "step") == "8"
    assert page.input_value("#cfg") == "7" and page.is_enabled("#cfg")
    for control in ("prompt-text", "negative-text", "width", "height"):
        assert page.locator(f"label[for={control}]").count() == 1, control

    prompt = "a red bicycle leaning on a wall, morning light"
    page.fill("#prompt-text", prompt)
    page.fill("#negative-text", "blurry")
    page.select_option("#sampler", "Euler")
    page.select_option("#scheduler", "Uniform")
    page.fill("#steps", "60")
    page.fill("#seed", "5")
    page.fill("#width", "48")
    page.fill("#height", "32")
    page.evaluate(RECORDER)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        [image] = generate(page)
    body = sent.value.post_data_json
    assert (body["prompt"], body["negative_prompt"]) == (prompt, "blurry")
    assert (body["width"], body["height"], body["cfg_scale"]) == (48, 32, 7)
    assert pixels(image).shape == (32, 48, 3)  # 48 wide, 32 high
    info = page.locator("#gallery .infotext").first.text_content()
    assert info.startswith(f"{prompt}\nNegative prompt: blurry\n") and "Size: 48x32" in info
    previews = [s["value"] for s in page.evaluate("window.__seen") if s["kind"] == "preview" and s["value"]]
    assert previews and pixels(previews[0]).shape == (32, 48, 3)  # the live preview: decoded latents

    # the same settings give the same pixels; another prompt others
    [again] = generate(page)
    assert np.array_equal(pixels(image), pixels(again))
    page.fill("#prompt-text", "a bowl of soup")
    [other] = generate(page)
    assert not np.array_equal(pixels(image), pixels(other))

    # a size that is not a multiple of 8 is refused on the page, before any request
    before = cards(page)
    page.fill("#width", "50")
    page.click("#generate")
    page.wait_for_selector("#message", state="visible")
    assert "multiple of 8" in page.inner_text("#message-text") and cards(page) == before
    page.click("#message-close")

    # switching models switches the form
    page.select_option("#model", "digits")
    page.wait_for_function("!document.querySelector('#class-fields').hidden")
    assert page.is_hidden("#prompt-text") and page.is_hidden("#width") and page.input_value("#cfg") == "2"
    pick(page, prompt="4", steps=4, seed=3)
    [digit] = generate(page)
    assert pixels(digit).shape == (16, 16)
    page.select_option("#model", "sd")
    page.wait_for_function("!document.querySelector('#text-fields').hidden")
    assert page.input_value("#width") == "64" and page.is_hidden("#prompt")


def test_screenshot(ui, tmp_path):
    page = ui.page
    pick(page, prompt="8", sampler="DPM++ 2M", scheduler="Karras", steps=10, cfg=3, seed=2024)
    page.fill("#batch-size", "4")
    page.fill("#batch-count", "2")
    assert len(generate(page)) == 8
    page.mouse.move(0, 0)
    path = tmp_path / "webui.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as shot:
        assert shot.width == VIEWPORT["width"] and shot.height >= VIEWPORT["height"]
    if os.environ.get("INKWASH_SCREENSHOT") == "1":
        shutil.copyfile(path, ROOT / "docs" / "webui.png")
