"""``inkwash serve`` with diffusers folders: a tiny random Stable Diffusion folder (text prompts, any size in
multiples of 8, img2img and inpainting at that size, decoded previews) and a pixel-space DDPM folder beside an
inkwash run under ``--models``."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import inkwash
from conftest import save_random_run
from inkwash.serve.app import ServerThread, create_app
from inkwash.serve.config import ServeOptions

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

T2I, I2I = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry, low quality"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the server's worker (as tests/test_serve_api.py: two spin against each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_pixel_folder(folder: Path) -> Path:
    """A diffusers DDPMPipeline folder (16x16 RGB, random weights), as tests/test_diffusers_folder.py's."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A --models folder: a Stable Diffusion folder ("sd"), a DDPM pixel folder ("pixels/ddpm") and an inkwash
    run ("runs/digits")."""
    from inkwash.interop.random_folders import build_stable_diffusion

    root = tmp_path_factory.mktemp("serve-sd")
    build_stable_diffusion(root / "sd")
    save_pixel_folder(root / "pixels" / "ddpm")
    save_random_run(root / "runs" / "digits", class_names=[str(i) for i in range(10)])
    return root


@pytest.fixture(scope="module")
def client(models):
    app = create_app(ServeOptions(checkpoint=str(models / "sd"), device="cpu", max_pixels=128 * 128))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def pipe(models):
    return inkwash.load(models / "sd", device="cpu")


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def generate(client, path: str = T2I, **fields) -> tuple[np.ndarray, dict]:
    response = client.post(path, json=fields)
    assert response.status_code == 200, response.text
    body = response.json()
    return np.stack([decode(image) for image in body["images"]]), json.loads(body["info"])


def assert_422(response, field: str) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith(f"{field}:"), error
    return error


FIELDS = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "sampler_name": "Euler", "steps": 5, "cfg_scale": 5}


# --- txt2img ----------------------------------------------------------------------------------------------


def test_sd_model_route_says_text_conditional(client):
    model = client.get("/inkwash/v1/model").json()
    assert model["text_conditional"] is True and model["kind"] == "stable-diffusion"
    assert (model["width"], model["height"], model["channels"]) == (64, 64, 3)
    assert model["classes"] == [] and model["size_multiple"] == 8 and model["max_pixels"] == 128 * 128


def test_sd_txt2img_at_another_size_matches_the_python_api(client, pipe):
    images, info = generate(client, **FIELDS, width=48, height=80, seed=11, batch_size=2)
    assert images.shape == (2, 80, 48, 3)  # 48 wide, 80 high
    expected = pipe.generate(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=48,
        height=80,
        sampler="euler",
        steps=5,
        guidance_scale=5.0,
        seed=11,
        num_images=2,
        batch_size=2,
    )
    assert np.array_equal(images, expected)
    assert (info["width"], info["height"]) == (48, 80)
    assert info["prompt"] == PROMPT and info["negative_prompt"] == NEGATIVE
    assert info["infotexts"][0].startswith(f"{PROMPT}\nNegative prompt: {NEGATIVE}\n")
    assert "Size: 48x80" in info["infotexts"][0] and "Model: sd" in info["infotexts"][0]


def test_sd_infotext_size_reads_back(client):
    response = client.post(T2I, json={**FIELDS, "width": 72, "height": 40, "seed": 1})
    image = response.json()["images"][0]
    parameters = client.post("/sdapi/v1/png-info", json={"image": image}).json()["parameters"]
    assert (parameters["Size-1"], parameters["Size-2"]) == (72, 40)
    assert parameters["Prompt"] == PROMPT and parameters["Negative prompt"] == NEGATIVE


def test_sd_default_size_is_the_models(client):
    images, info = generate(client, prompt="x", steps=3, seed=2)
    assert images.shape == (1, 64, 64, 3) and (info["width"], info["height"]) == (64, 64)
    assert info["cfg_scale"] == 7.0  # the WebUI's default


def test_sd_prompt_and_negative_prompt_change_the_pixels(client):
    base, _ = generate(client, **FIELDS, seed=4)
    again, _ = generate(client, **FIELDS, seed=4)
    other, _ = generate(client, **{**FIELDS, "prompt": "a bowl of ramen"}, seed=4)
    negative, _ = generate(client, **{**FIELDS, "negative_prompt": ""}, seed=4)
    assert np.array_equal(base, again)
    assert not np.array_equal(base, other)
    assert not np.array_equal(base, negative)


def test_sd_sampler_scheduler_and_variation_seeds(client, pipe):
    fields = {**FIELDS, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "subseed": 9, "subseed_strength": 0.3}
    images, info = generate(client, **fields, seed=6, width=32, height=32)
    expected = pipe.generate(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=32,
        height=32,
        sampler="dpmpp_2m",
        schedule="karras",
        steps=5,
        guidance_scale=5.0,
        seed=6,
        subseed=9,
        subseed_strength=0.3,
        num_images=1,
    )
    assert np.array_equal(images, expected)
    assert "Variation seed: 9" in info["infotexts"][0]


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("width", 50), ("height", 12), ("width", 4)])
def test_sd_size_not_a_multiple_of_8_is_422(client, field, value):
    error = assert_422(client.post(T2I, json={"prompt": "x", "steps": 2, field: value}), field)
    assert "multiple of 8" in error


def test_sd_size_over_max_pixels_is_422(client):
    error = assert_422(client.post(T2I, json={"prompt": "x", "steps": 2, "width": 256, "height": 128}), "width")
    assert "--max-pixels" in error
    assert_422(client.post(T2I, json={"prompt": "x", "steps": 2, "height": 512}), "height")
    assert client.post(T2I, json={"prompt": "x", "steps": 1, "width": 128, "height": 128}).status_code == 200


@pytest.mark.parametrize("field", ["class_label", "negative_class"])
def test_sd_class_fields_are_422(client, field):
    error = assert_422(client.post(T2I, json={"prompt": "x", "steps": 2, field: "3"}), field)
    assert "text prompt" in error


# --- img2img ----------------------------------------------------------------------------------------------


def init_pixels(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def test_sd_img2img_with_a_mask_keeps_the_unmasked_pixels(client):
    init = init_pixels(48, 64)
    mask = np.zeros((64, 48), np.uint8)
    mask[8:32, 16:40] = 255
    fields = {**FIELDS, "seed": 3, "width": 48, "height": 64, "denoising_strength": 0.9, "mask_blur": 0}
    images, info = generate(client, I2I, init_images=[png_b64(init)], mask=png_b64(mask), **fields)
    assert images.shape == (1, 64, 48, 3)
    kept = mask == 0
    assert np.array_equal(images[0][kept], init[kept])
    assert not np.array_equal(images[0][~kept], init[~kept])
    assert "Size: 48x64" in info["infotexts"][0] and "Mask blur: 0" in info["infotexts"][0]


def test_sd_img2img_with_a_blurred_mask_keeps_the_pixels_far_from_it(client):
    init = init_pixels(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 255
    fields = {**FIELDS, "seed": 3, "denoising_strength": 0.8, "mask_blur": 2, "inpainting_fill": 2}
    images, _ = generate(client, I2I, init_images=[png_b64(init)], mask=png_b64(mask), **fields)
    far = np.ones((64, 64), bool)
    far[14:50, 14:50] = False
    assert np.array_equal(images[0][far], init[far])


def test_sd_img2img_resizes_the_init_image_to_the_requested_size(client, pipe):
    init = init_pixels(100, 60)
    fields = {**FIELDS, "seed": 8, "width": 40, "height": 24, "denoising_strength": 0.6}
    images, info = generate(client, I2I, init_images=[png_b64(init)], **fields)
    assert images.shape == (1, 24, 40, 3) and (info["width"], info["height"]) == (40, 24)
    resized = np.asarray(Image.fromarray(init).resize((40, 24), Image.BICUBIC))
    expected = pipe.generate(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        init_image=resized,
        strength=0.6,
        width=40,
        height=24,
        sampler="euler",
        steps=5,
        guidance_scale=5.0,
        seed=8,
        num_images=1,
    )
    assert np.array_equal(images, expected)


def test_sd_denoising_strength_zero_returns_the_init_image_size(client):
    images, _ = generate(client, I2I, init_images=[png_b64(init_pixels(64, 32))], **FIELDS, denoising_strength=0.0)
    assert images.shape == (1, 64, 64, 3)  # the default size: the model's


# --- progress ---------------------------------------------------------------------------------------------


def test_sd_progress_returns_a_decoded_preview(models):
    app = create_app(ServeOptions(checkpoint=str(models / "sd"), device="cpu"))
    with ServerThread(app) as server:
        url = server.url
        body = {
            "prompt": "x",
            "sampler_name": "Euler",
            "steps": 900,
            "scheduler": "Uniform",
            "seed": 1,
            "batch_size": 2,
            "width": 32,
        }
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(r=httpx.post(url + T2I, json=body, timeout=120)))
        thread.start()
        try:
            deadline = time.monotonic() + 60
            progress = {}
            while time.monotonic() < deadline:
                progress = httpx.get(url + "/sdapi/v1/progress", timeout=30).json()
                if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
                    break
                time.sleep(0.05)
            again = httpx.get(url + "/sdapi/v1/progress", timeout=30).json()
        finally:
            while thread.is_alive():
                httpx.post(url + "/sdapi/v1/interrupt", timeout=10)
                thread.join(0.2)
        assert progress["state"]["sampling_step"] >= 2, progress["state"]
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        # the latents (4 channels, 8x smaller) decoded by the VAE: pixels, the batch side by side
        assert preview.format == "PNG" and preview.mode == "RGB" and preview.size == (32 * 2, 64)
        assert again["current_image"] is not None
        assert result["r"].status_code == 200 and json.loads(result["r"].json()["info"])["interrupted"]


# --- --models with three kinds of model -------------------------------------------------------------------


def test_models_dir_lists_a_run_a_pixel_folder_and_an_sd_folder(models):
    app = create_app(ServeOptions(models=str(models), device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        listed = client.get("/sdapi/v1/sd-models").json()
        assert [m["model_name"] for m in listed] == ["pixels/ddpm", "runs/digits", "sd"]
        for item in listed:
            assert item["title"] == f"{item['model_name']} [{item['hash']}]" and len(item["sha256"]) == 64
            assert Path(item["filename"]).is_dir()
        kinds = {
            m["model_name"]: client.get("/inkwash/v1/model", params={"name": m["model_name"]}).json() for m in listed
        }
        assert kinds["sd"]["text_conditional"] and kinds["sd"]["kind"] == "stable-diffusion"
        assert not kinds["pixels/ddpm"]["text_conditional"] and kinds["pixels/ddpm"]["kind"] == "diffusers"
        assert (kinds["pixels/ddpm"]["width"], kinds["pixels/ddpm"]["channels"]) == (16, 3)
        assert kinds["runs/digits"]["kind"] == "inkwash" and len(kinds["runs/digits"]["classes"]) == 10

        # pixel folder: unconditional, its own size only
        images, info = generate(client, steps=4, seed=5, sampler_name="DDIM")
        assert images.shape == (1, 16, 16, 3) and info["sd_model_name"] == "pixels/ddpm"
        expected = inkwash.load(models / "pixels" / "ddpm", device="cpu").generate(
            sampler="ddim", steps=4, seed=5, num_images=1
        )
        assert np.array_equal(images, expected)
        assert_422(client.post(T2I, json={"steps": 2, "width": 32}), "width")
        assert_422(client.post(T2I, json={"prompt": "a cat", "steps": 2}), "prompt")

        # switch to the Stable Diffusion folder by its title, then to the run by its name
        title = next(m["title"] for m in listed if m["model_name"] == "sd")
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd"
        images, info = generate(client, prompt="a cat", steps=3, seed=5, width=24, height=16)
        assert images.shape == (1, 16, 24, 3) and info["sd_model_name"] == "sd"
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "runs/digits"}).status_code == 200
        images, info = generate(client, prompt="3", cfg_scale=2, steps=3, seed=5)
        assert images.shape == (1, 16, 16) and info["sd_model_name"] == "runs/digits"
        # one request on another model
        images, _ = generate(client, prompt="x", steps=2, seed=5, override_settings={"sd_model_checkpoint": "sd"})
        assert images.shape == (1, 64, 64, 3)


def test_checkpoint_takes_a_pixel_diffusers_folder(models):
    app = create_app(ServeOptions(checkpoint=str(models / "pixels" / "ddpm"), device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["ddpm"]
        images, _ = generate(client, steps=2, seed=1)
        assert images.shape == (1, 16, 16, 3)


def test_checkpoint_takes_a_bare_unet_folder(models, tmp_path):
    """A folder written by UNet2DModel.save_pretrained with scheduler_config.json in it serves like its pipeline."""
    bare = tmp_path / "bare"
    shutil.copytree(models / "pixels" / "ddpm" / "unet", bare)
    shutil.copy(models / "pixels" / "ddpm" / "scheduler" / "scheduler_config.json", bare / "scheduler_config.json")
    app = create_app(ServeOptions(checkpoint=str(bare), device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["bare"]
        assert client.get("/sdapi/v1/sd-models").json()[0]["sha256"]
        images, _ = generate(client, steps=2, seed=1)
        assert images.shape == (1, 16, 16, 3)
