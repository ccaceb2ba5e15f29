"""Unit tests of ``inkwash.serve.webui`` (the WebUI's names, infotexts, base64 images, mask blur, composite and
inpainting fill) and of ``inkwash.serve.worker`` (the bounded queue and interrupts)."""

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from inkwash.sampling.generate import SamplingInterrupted
from inkwash.sampling.samplers import SAMPLERS
from inkwash.serve.webui import (
    MAX_IMAGE_PIXELS,
    SCHEDULE_TYPES,
    FieldError,
    blur_mask,
    composite,
    decode_image,
    encode_png,
    fill_masked,
    format_infotext,
    gaussian_blur,
    parse_infotext,
    png_text,
    resolve_sampler,
    resolve_schedule,
    sampler_list,
    schedule_list,
)
from inkwash.serve.worker import Progress, QueueFull, Worker

# The WebUI's sampler names, in inkwash's order (DDPM is inkwash's own).
WEBUI_SAMPLERS = [
    "DDPM",
    "DDIM",
    "Euler",
    "Euler a",
    "Heun",
    "DPM2",
    "DPM2 a",
    "LMS",
    "PLMS",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 3M SDE",
    "UniPC",
]
# The k-diffusion aliases the WebUI lists for its samplers (modules/sd_samplers_kdiffusion.py), except
# Euler a's second alias, which has a test of its own.
WEBUI_ALIASES = {
    "Euler a": "k_euler_a",
    "Euler": "k_euler",
    "LMS": "k_lms",
    "Heun": "k_heun",
    "DPM2": "k_dpm_2",
    "DPM2 a": "k_dpm_2_a",
    "DPM++ 2S a": "k_dpmpp_2s_a",
    "DPM++ 2M": "k_dpmpp_2m",
    "DPM++ SDE": "k_dpmpp_sde",
    "DPM++ 2M SDE": "k_dpmpp_2m_sde",
    "DPM++ 3M SDE": "k_dpmpp_3m_sde",
}
# The WebUI's schedule types (modules/sd_schedulers.py): name -> label, for those inkwash has.
WEBUI_SCHEDULES = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
}


def png_bytes(pixels: np.ndarray, **texts: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- samplers -------------------------------------------------------------------------------------------


def test_sampler_list_has_the_webui_names_and_shape():
    listed = sampler_list()
    assert [item["name"] for item in listed] == WEBUI_SAMPLERS
    for item in listed:
        assert set(item) == {"name", "aliases", "options"}
        assert isinstance(item["aliases"], list) and item["aliases"]
        assert item["options"] == {}


@pytest.mark.parametrize("name", WEBUI_SAMPLERS)
def test_each_sampler_resolves_by_name_id_and_case(name):
    info, schedule = resolve_sampler(name)
    assert info.display_name == name and schedule is None
    assert resolve_sampler(name.upper())[0] is info
    assert resolve_sampler(info.id)[0] is info
    for alias in next(item["aliases"] for item in sampler_list() if item["name"] == name):
        assert resolve_sampler(alias)[0] is info


@pytest.mark.parametrize(("name", "alias"), sorted(WEBUI_ALIASES.items()))
def test_webui_k_diffusion_aliases_are_listed_and_resolve(name, alias):
    listed = next(item for item in sampler_list() if item["name"] == name)
    assert alias in listed["aliases"]
    assert resolve_sampler(alias)[0].display_name == name


def test_euler_a_second_webui_alias():
    assert "k_euler_ancestral" in next(item for item in sampler_list() if item["name"] == "Euler a")["aliases"]
    assert resolve_sampler("k_euler_ancestral")[0].display_name == "Euler a"


@pytest.mark.parametrize(
    ("legacy", "sampler", "label"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("Euler a Karras", "Euler a", "Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("Euler SGM Uniform", "Euler", "SGM Uniform"),
        ("LMS Karras", "LMS", "Karras"),
    ],
)
def test_legacy_names_carry_the_schedule_type(legacy, sampler, label):
    info, schedule = resolve_sampler(legacy)
    assert info.display_name == sampler
    assert schedule is not None and schedule.label == label


@pytest.mark.parametrize("name", ["Karras", "DPM fast", "Euler b", "", "DPM++ 2M Beta"])
def test_unknown_sampler_is_a_field_error(name):
    with pytest.raises(FieldError) as caught:
        resolve_sampler(name, "sampler_index")
    assert caught.value.field == "sampler_index"
    assert str(caught.value).startswith("sampler_index: ")
    assert "\n" not in str(caught.value)


# --- schedule types -------------------------------------------------------------------------------------


def test_schedule_list_has_the_webui_shape():
    listed = schedule_list()
    assert {item["name"]: item["label"] for item in listed} == WEBUI_SCHEDULES
    assert listed[0]["name"] == "automatic"
    for item in listed:
        assert set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
        assert item["aliases"] is None or isinstance(item["aliases"], list)
    by_name = {item["name"]: item for item in listed}
    assert by_name["karras"]["default_rho"] == 7.0
    assert by_name["automatic"]["default_rho"] == -1
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"]


@pytest.mark.parametrize(
    ("given", "label", "schedule"),
    [
        (None, "Automatic", None),
        ("", "Automatic", None),
        ("automatic", "Automatic", None),
        ("AUTOMATIC", "Automatic", None),
        ("Karras", "Karras", "karras"),
        ("karras", "Karras", "karras"),
        ("sgm_uniform", "SGM Uniform", "trailing"),
        ("SGM Uniform", "SGM Uniform", "trailing"),
        ("SGMUniform", "SGM Uniform", "trailing"),
        ("Exponential", "Exponential", "exponential"),
        ("uniform", "Uniform", "uniform"),
        ("Normal", "Normal", "uniform"),
        ("Simple", "Simple", "trailing"),
        ("DDIM", "DDIM", "leading"),
    ],
)
def test_schedule_types_resolve(given, label, schedule):
    kind = resolve_schedule(given)
    assert kind.label == label
    assert kind.schedule == schedule


@pytest.mark.parametrize("name", ["Beta", "beta", "KL Optimal", "Align Your Steps", "Polyexponential"])
def test_unsupported_webui_schedule_types_are_named(name):
    with pytest.raises(FieldError, match="no counterpart") as caught:
        resolve_schedule(name)
    assert caught.value.field == "scheduler"


def test_unknown_schedule_type_lists_the_choices():
    with pytest.raises(FieldError) as caught:
        resolve_schedule("wobbly")
    assert caught.value.field == "scheduler"
    assert "wobbly" in str(caught.value) and "Karras" in str(caught.value)


def test_counts():
    assert len(SAMPLERS) == 15
    assert len(SCHEDULE_TYPES) == 8


# --- infotexts ------------------------------------------------------------------------------------------

PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 2.5,
    "Seed": 5,
    "Size": "16x16",
    "Model hash": "1a2b3c4d5e",
    "Model": "digits",
}


def test_infotext_has_the_webui_layout():
    text = format_infotext("7", "3", PARAMS)
    assert text == (
        "7\nNegative prompt: 3\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 2.5, Seed: 5, Size: 16x16, "
        "Model hash: 1a2b3c4d5e, Model: digits"
    )
    assert format_infotext("7", "", PARAMS).startswith("7\nSteps: 20, ")
    assert format_infotext("", "", PARAMS).startswith("Steps: 20, ")
    assert format_infotext("", "3", PARAMS).startswith("Negative prompt: 3\nSteps: 20, ")
    assert "None" not in format_infotext("7", "", {**PARAMS, "Eta": None})


@pytest.mark.parametrize(("prompt", "negative"), [("7", "3"), ("7", ""), ("", "3"), ("", ""), ("a cat", "ugly")])
def test_infotext_round_trip(prompt, negative):
    params = {
        **PARAMS,
        "Denoising strength": 0.75,
        "Variation seed": 4294967295,
        "Variation seed strength": 0.5,
        "Version": "inkwash 0.1.0",
    }
    parsed = parse_infotext(format_infotext(prompt, negative, params))
    expected = {"Prompt": prompt, "Negative prompt": negative, **params, "Size-1": 16, "Size-2": 16}
    del expected["Size"]
    assert parsed == expected
    assert type(parsed["Steps"]) is int and type(parsed["CFG scale"]) is float


def test_infotext_values_with_commas_colons_and_quotes_round_trip():
    params = {**PARAMS, "Model": 'runs/a, b: "c"', "Lora hashes": "x: 1, y: 2"}
    text = format_infotext("7", "", params)
    assert text.count("\n") == 1
    parsed = parse_infotext(text)
    assert parsed["Model"] == 'runs/a, b: "c"'
    assert parsed["Lora hashes"] == "x: 1, y: 2"
    assert parsed["Seed"] == 5


def test_parse_a_webui_infotext():
    text = (
        "a photo of a cat, best quality\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 0123abcd", Version: v1.9.4'
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a photo of a cat, best quality"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert parsed["Steps"] == 25 and parsed["CFG scale"] == 7 and parsed["Seed"] == 1234
    assert (parsed["Size-1"], parsed["Size-2"]) == (512, 768)
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Lora hashes"] == "detail: 0123abcd"
    assert parsed["Version"] == "v1.9.4"


def test_parse_multi_line_prompts():
    text = "line one\nline two\nNegative prompt: bad\nworse\nSteps: 5, Sampler: Euler, Seed: 1"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two"
    assert parsed["Negative prompt"] == "bad\nworse"
    assert parsed["Steps"] == 5


def test_parse_keeps_non_finite_numbers_as_text():
    parsed = parse_infotext("Steps: 5, Sampler: Euler, CFG scale: nan, Seed: inf")
    assert parsed["CFG scale"] == "nan" and parsed["Seed"] == "inf"


# --- images ---------------------------------------------------------------------------------------------

PIXELS = np.arange(256, dtype=np.uint8).reshape(16, 16)


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "data:image/x-png;base64,"])
def test_decode_image_with_and_without_a_data_url(prefix):
    image = decode_image(prefix + b64(png_bytes(PIXELS)), "init_images")
    assert image.size == (16, 16)
    assert np.array_equal(np.asarray(image), PIXELS)


def test_decode_image_tolerates_surrounding_whitespace():
    assert np.array_equal(np.asarray(decode_image("  " + b64(png_bytes(PIXELS)) + "\n", "x")), PIXELS)


def test_decode_image_accepts_line_wrapped_base64():
    wrapped = base64.encodebytes(png_bytes(np.random.default_rng(0).integers(0, 256, (16, 16), np.uint8))).decode()
    assert "\n" in wrapped.strip()
    assert decode_image(wrapped, "init_images").size == (16, 16)


def test_decode_image_reads_other_formats():
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).convert("RGB").save(buffer, format="JPEG")
    image = decode_image(b64(buffer.getvalue()), "init_images")
    assert image.size == (16, 16) and image.format == "JPEG"
    assert png_text(image) == {}


def truncated_png() -> str:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8)
    data = png_bytes(noisy)
    return b64(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("", id="empty"),
        pytest.param("!!!not base64!!!", id="not-base64"),
        pytest.param("data:image/png;base64", id="data-url-without-comma"),
        pytest.param(b64(b"hello, this is not an image"), id="not-an-image"),
        pytest.param(truncated_png(), id="truncated-png"),
        pytest.param(b64(png_bytes(PIXELS))[:-7], id="cut-base64"),
    ],
)
def test_decode_image_errors_name_the_field(data):
    with pytest.raises(FieldError) as caught:
        decode_image(data, "mask")
    assert caught.value.field == "mask"
    assert str(caught.value).startswith("mask: ")
    assert "\n" not in str(caught.value)


def test_decode_image_error_has_no_python_reprs():
    with pytest.raises(FieldError) as caught:
        decode_image(b64(b"hello, this is not an image"), "init_images")
    assert "object at 0x" not in str(caught.value)


def test_decode_image_refuses_a_decompression_bomb_header():
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    image = Image.new("1", (side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # a few KB claiming more pixels than allowed
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(FieldError, match=r"init_images: .*pixels"):
        decode_image(b64(buffer.getvalue()), "init_images")


def test_encode_png_round_trips_pixels_and_parameters():
    gray = np.random.default_rng(2).integers(0, 256, (16, 16, 1), np.uint8)
    rgb = np.random.default_rng(3).integers(0, 256, (8, 12, 3), np.uint8)
    for pixels in (gray, rgb):
        image = decode_image(encode_png(pixels, "7\nSteps: 5, Seed: 1, Size: 16x16"), "image")
        assert np.array_equal(np.asarray(image).reshape(pixels.shape), pixels)
        assert png_text(image)["parameters"] == "7\nSteps: 5, Seed: 1, Size: 16x16"
    assert "parameters" not in png_text(decode_image(encode_png(gray), "image"))


def test_png_text_reads_every_chunk():
    image = decode_image(b64(png_bytes(PIXELS, parameters="x", Comment="hello")), "image")
    assert png_text(image) == {"parameters": "x", "Comment": "hello"}


# --- mask blur, composite and fill ----------------------------------------------------------------------


def corner_mask(n: int = 5) -> np.ndarray:
    mask = np.zeros((16, 16), bool)
    mask[:n, :n] = True
    return mask


def test_blur_zero_is_the_mask():
    mask = corner_mask()
    assert np.array_equal(blur_mask(mask, 0, 0), mask.astype(np.float64))


def test_blur_is_in_unit_range_and_exactly_zero_far_from_the_mask():
    mask = np.zeros((16, 16), bool)
    mask[6:9, 6:9] = True
    alpha = blur_mask(mask, 1, 1)
    assert alpha.min() >= 0 and alpha.max() <= 1
    radius = int(2.5 * 1 + 0.5)  # the WebUI's kernel reaches 2 * radius + 1 pixels
    far = np.ones((16, 16), bool)
    far[6 - radius : 9 + radius, 6 - radius : 9 + radius] = False
    assert np.all(alpha[far] == 0)
    assert alpha[7, 7] > 0.5 and 0 < alpha[6, 4] < alpha[6, 5] < alpha[6, 6]


def test_blur_x_and_y_are_separate():
    mask = np.zeros((16, 16), bool)
    mask[8, 8] = True
    only_x = blur_mask(mask, 2, 0)
    assert np.all(only_x[[r for r in range(16) if r != 8]] == 0)
    assert only_x[8, 6] > 0
    only_y = blur_mask(mask, 0, 2)
    assert np.allclose(only_y, only_x.T)


def reflect_101(index: int, size: int) -> int:
    while not 0 <= index < size:
        index = -index if index < 0 else 2 * (size - 1) - index
    return index


def webui_blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """What the WebUI computes: cv2.GaussianBlur of the mask along x, then y, with kernel size
    2 * int(2.5 * sigma + 0.5) + 1 and OpenCV's default border (BORDER_REFLECT_101), here in float."""
    radius = int(2.5 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel /= kernel.sum()
    out = mask.astype(np.float64)
    for axis in (1, 0):
        size = out.shape[axis]
        blurred = np.zeros_like(out)
        for weight, offset in zip(kernel, offsets, strict=True):
            index = [reflect_101(i + offset, size) for i in range(size)]
            blurred += weight * np.take(out, index, axis=axis)
        out = blurred
    return out


def test_blur_kernel_matches_the_webui_away_from_the_border():
    mask = np.zeros((48, 48), bool)
    mask[20:28, 18:30] = True
    ours = gaussian_blur(mask.astype(np.float64), 4, 4)
    assert np.allclose(ours, webui_blur(mask, 4), atol=1e-12)


def test_blur_matches_the_webui_at_the_border():
    mask = corner_mask(5)
    assert np.allclose(blur_mask(mask, 4, 4), webui_blur(mask, 4), atol=1 / 255)


def test_composite_keeps_the_original_where_alpha_is_zero():
    rng = np.random.default_rng(4)
    generated = rng.integers(0, 256, (2, 16, 16, 1), np.uint8)
    original = rng.integers(0, 256, (1, 16, 16, 1), np.uint8)
    alpha = np.zeros((16, 16))
    alpha[:4] = 1.0
    alpha[4] = 0.5
    alpha[5] = 1e-9
    out = composite(generated, original, alpha)
    assert out.shape == generated.shape and out.dtype == np.uint8
    assert np.array_equal(out[:, :4], generated[:, :4])
    expected = np.rint((generated[:, 4].astype(float) + original[:, 4]) / 2)
    assert np.array_equal(out[:, 4], expected.astype(np.uint8))
    assert np.array_equal(out[:, 6:], np.broadcast_to(original[:, 6:], out[:, 6:].shape))


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_fill_changes_only_the_masked_pixels(mode):
    rng = np.random.default_rng(5)
    init = rng.integers(0, 256, (16, 16, 1), np.uint8)
    mask = corner_mask(6)
    before = init.copy()
    out = fill_masked(init, mask, mode, seed=3)
    assert np.array_equal(init, before)
    assert out.dtype == np.uint8 and out.shape == init.shape
    assert np.array_equal(out[~mask], init[~mask])
    if mode == 0:
        assert np.all(out[mask] == np.round(init[~mask].mean()).astype(np.uint8))
    elif mode == 1:
        assert np.array_equal(out, init)
    elif mode == 2:
        assert np.array_equal(out, fill_masked(init, mask, mode, seed=3))
        assert not np.array_equal(out, fill_masked(init, mask, mode, seed=4))
    else:
        assert np.all(out[mask] == 128)


def test_fill_does_not_modify_its_input_and_handles_full_masks():
    init = np.full((4, 4, 3), 9, np.uint8)
    mask = np.ones((4, 4), bool)
    assert np.all(fill_masked(init, mask, 0, seed=0) == 128)  # nothing kept: mid-grey
    assert np.all(init == 9)
    assert np.array_equal(fill_masked(init, np.zeros((4, 4), bool), 3, seed=0), init)


# --- worker ---------------------------------------------------------------------------------------------


@pytest.fixture
def worker():
    worker = Worker(queue_size=1)
    yield worker
    worker.close()


def blocking_task(started: threading.Event, release: threading.Event, value: object):
    def run(progress: Progress) -> object:
        started.set()
        assert release.wait(10)
        return value

    return run


def test_queue_full_raises_and_frees_up(worker):
    started, release = threading.Event(), threading.Event()
    first = worker.submit(blocking_task(started, release, "first"), "txt2img")
    assert started.wait(5)
    second = worker.submit(lambda progress: "second", "txt2img")  # waits in the one place
    with pytest.raises(QueueFull):
        worker.submit(lambda progress: "third", "txt2img")
    release.set()
    assert first.result(5) == "first" and second.result(5) == "second"
    assert worker.submit(lambda progress: "fourth", "txt2img").result(5) == "fourth"


def test_a_failing_task_does_not_stop_the_worker(worker):
    def fail(progress):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        worker.submit(fail, "txt2img").result(5)
    assert worker.submit(lambda progress: 7, "txt2img").result(5) == 7
    assert worker.progress.snapshot()["state"]["job"] == ""


def stepping_task(steps: int, stepping: threading.Event, batch_size: int = 2):
    def run(progress: Progress) -> int:
        progress.plan(steps, 1)
        done = 0
        for i in range(steps):
            progress.on_step({"i": i, "start": 0, "denoised": torch.zeros(batch_size, 1, 4, 4)}, steps, batch_size)
            done += 1
            stepping.set()
            time.sleep(0.005)
        return done

    return run


def test_interrupt_stops_the_running_task_only(worker):
    assert worker.interrupt() is False  # nothing running
    stepping = threading.Event()
    future = worker.submit(stepping_task(10_000, stepping), "txt2img")
    assert stepping.wait(5)
    snapshot = worker.progress.snapshot()
    assert snapshot["state"]["job"] == "txt2img"
    assert 0 < snapshot["progress"] < 1
    assert snapshot["state"]["sampling_steps"] == 10_000 and snapshot["state"]["sampling_step"] >= 1
    assert snapshot["preview"].shape == (2, 1, 4, 4)
    assert worker.interrupt() is True
    with pytest.raises(SamplingInterrupted):
        future.result(5)
    after = threading.Event()
    assert worker.submit(stepping_task(5, after), "txt2img").result(5) == 5  # the next task is not interrupted
    idle = worker.progress.snapshot()
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["preview"] is None


def test_close_cancels_waiting_tasks():
    worker = Worker(queue_size=2)
    started, release = threading.Event(), threading.Event()
    running = worker.submit(blocking_task(started, release, 1), "txt2img")
    assert started.wait(5)
    waiting = worker.submit(lambda progress: 2, "txt2img")
    closer = threading.Thread(target=worker.close)
    closer.start()
    time.sleep(0.05)
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert running.result(5) == 1
    assert waiting.cancelled()
