"""``inkwash serve``'s HTTP API, end to end: the WebUI's /sdapi/v1 routes through FastAPI's TestClient (and a
real uvicorn server where requests must overlap), on tiny random models built here."""

import base64
import hashlib
import io
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

import inkwash
from conftest import save_random_run
from inkwash.data.loading import prepare_image
from inkwash.errors import InkwashError
from inkwash.serve.app import ServerThread, create_app
from inkwash.serve.config import ServeOptions
from inkwash.serve.webui import blur_mask

CLASSES = [str(i) for i in range(10)]
T2I, I2I = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
SAMPLERS = [
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
# Small limits for the main app, so that the limit checks are cheap to reach.
LIMITS = {"max_steps": 200, "max_batch_size": 4, "max_images": 8, "max_body_mb": 0.25}


# --- fixtures and helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the server's worker: two threads on a busy 2-core machine spin against each
    other and make each tiny request up to 100 times slower (as under xdist, see conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A --models folder with a class-conditional run ("digits") and an unconditional one ("unc")."""
    root = tmp_path_factory.mktemp("serve-models")
    save_random_run(root / "digits", class_names=CLASSES)
    save_random_run(root / "unc")
    return root


@pytest.fixture(scope="module")
def client(models):
    app = create_app(ServeOptions(models=str(models), device="cpu", **LIMITS))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def pipe(models):
    return inkwash.load(models / "digits", device="cpu")


@pytest.fixture(scope="module")
def live(models):
    """A real uvicorn server (one request runs, one may wait) for requests that must overlap."""
    app = create_app(ServeOptions(checkpoint=str(models / "digits"), device="cpu", queue_size=1))
    with ServerThread(app) as server:
        yield server.url


def decode(data: str) -> np.ndarray:
    """A base64 PNG as uint8 (H, W) for grey images."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def png_b64(pixels: np.ndarray, **texts: str) -> str:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def generate(client, path: str = T2I, **fields):
    """POST a generation request that must succeed: (images (N, H, W) uint8, info dict, response body)."""
    response = client.post(path, json=fields)
    assert response.status_code == 200, response.text
    body = response.json()
    images = np.stack([decode(image) for image in body["images"]]) if body["images"] else np.empty((0, 16, 16))
    return images, json.loads(body["info"]), body


def txt(client, **fields) -> np.ndarray:
    fields.setdefault("steps", 8)
    fields.setdefault("seed", 3)
    return generate(client, **fields)[0]


def assert_error(response, status: int | None, field: str) -> dict:
    """A JSON 4xx whose one-line "error" names ``field`` and carries no traceback."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"]
    assert field in body["error"], body["error"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


INIT = np.random.default_rng(7).integers(0, 256, (16, 16), np.uint8)


# --- the listing routes ---------------------------------------------------------------------------------


def test_samplers_route(client):
    response = client.get("/sdapi/v1/samplers")
    assert response.status_code == 200
    listed = response.json()
    assert len(listed) == 15
    assert [item["name"] for item in listed] == SAMPLERS
    by_name = {item["name"]: item for item in listed}
    assert "k_dpmpp_2m" in by_name["DPM++ 2M"]["aliases"] and "dpmpp_2m" in by_name["DPM++ 2M"]["aliases"]
    assert "k_euler_a" in by_name["Euler a"]["aliases"]
    for item in listed:
        assert set(item) == {"name", "aliases", "options"} and item["options"] == {}


def test_schedulers_route(client):
    listed = client.get("/sdapi/v1/schedulers").json()
    assert [item["label"] for item in listed] == [
        "Automatic",
        "Uniform",
        "Karras",
        "Exponential",
        "SGM Uniform",
        "Simple",
        "Normal",
        "DDIM",
    ]
    assert listed[0] == {
        "name": "automatic",
        "label": "Automatic",
        "aliases": None,
        "default_rho": -1,
        "need_inner_model": False,
    }


def test_sd_models_route_has_the_webui_shape(client, models):
    listed = client.get("/sdapi/v1/sd-models").json()
    assert [item["model_name"] for item in listed] == ["digits", "unc"]
    for item in listed:
        assert set(item) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        weights = models / item["model_name"] / "ema.safetensors"
        assert item["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert item["hash"] == item["sha256"][:10]
        assert item["title"] == f"{item['model_name']} [{item['hash']}]"
        assert Path(item["filename"]).exists()
    assert listed[0]["sha256"] != listed[1]["sha256"]


def test_empty_webui_lists(client):
    for path in ("sd-vae", "upscalers", "prompt-styles", "loras", "hypernetworks"):
        assert client.get(f"/sdapi/v1/{path}").json() == []
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_model_route(client):
    info = client.get("/inkwash/v1/model").json()
    assert info["name"] == "digits" and info["classes"] == CLASSES
    assert (info["width"], info["height"], info["channels"]) == (16, 16, 1)
    assert info["max_steps"] == 200 and info["max_batch_size"] == 4 and info["max_images"] == 8
    assert set(info["default_steps"]) == set(SAMPLERS) and info["default_steps"]["DDPM"] == 1000
    assert client.get("/inkwash/v1/model", params={"name": "unc"}).json()["classes"] == []
    assert_error(client.get("/inkwash/v1/model", params={"name": "nope"}), 404, "nope")


def test_docs_and_openapi(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    for path in (T2I, I2I, "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/png-info", "/sdapi/v1/options"):
        assert path in schema["paths"]
    assert "cfg_scale" in json.dumps(schema["components"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_their_scripts_from_this_server(client, page):
    """An offline machine (most of this project's) gets the API pages too: no script or style from a CDN."""
    html = client.get(page).text
    sources = re.findall(r'(?:src|href)=["\']([^"\']+)', html)
    assert any(source.endswith(".js") for source in sources), html
    for source in sources:
        assert not re.match(r"(https?:)?//", source), f"{page} loads {source} from another server"
        response = client.get(source)
        assert response.status_code == 200, source
        if source.endswith((".js", ".css")):
            assert len(response.content) > 10_000, source


def test_progress_when_idle(client):
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["eta_relative"] == 0
    assert progress["current_image"] is None and progress["textinfo"] is None
    state = progress["state"]
    assert state["job"] == "" and state["job_count"] == 0 and state["sampling_step"] == 0
    assert state["interrupted"] is False and state["skipped"] is False
    assert {"job_no", "sampling_steps", "job_timestamp"} <= set(state)


def test_interrupt_when_idle(client):
    response = client.post("/sdapi/v1/interrupt")
    assert response.status_code == 200 and response.json() == {}
    _, info, _ = generate(client, steps=5, seed=1)  # a later request is not interrupted
    assert info["interrupted"] is False


# --- options and models ---------------------------------------------------------------------------------


def test_options_switch_the_model(models):
    app = create_app(ServeOptions(models=str(models), device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "digits"
        _, info, _ = generate(client, prompt="3", steps=5, seed=1)
        assert info["sd_model_name"] == "digits"

        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "unc"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "unc"
        _, info, _ = generate(client, steps=5, seed=1)
        assert info["sd_model_name"] == "unc" and "Model: unc" in info["infotexts"][0]
        assert_error(client.post(T2I, json={"prompt": "3", "steps": 5}), 422, "prompt")  # unc has no classes

        title = next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "digits")
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "digits"

        body = assert_error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}), 422, "nope")
        assert "sd_model_checkpoint" in body["error"]
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "digits"
        # other options are accepted and have no effect
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200


@pytest.mark.parametrize("value", [5, {"a": 1}, ["unc"]], ids=["number", "object", "list"])
def test_options_with_a_non_string_model_is_422(client, value):
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": value})
    assert_error(response, 422, "sd_model_checkpoint")


def test_override_settings_picks_the_model_for_one_request(client):
    _, info, _ = generate(client, steps=5, seed=1, override_settings={"sd_model_checkpoint": "unc"})
    assert info["sd_model_name"] == "unc"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "digits"
    _, info, _ = generate(client, steps=5, seed=1)
    assert info["sd_model_name"] == "digits"


def test_override_settings_accepts_a_title(client):
    title = next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "unc")
    _, info, _ = generate(client, steps=5, seed=1, override_settings={"sd_model_checkpoint": title})
    assert info["sd_model_name"] == "unc"


# --- txt2img --------------------------------------------------------------------------------------------


def test_txt2img_response_shape_and_info(client):
    images, info, body = generate(
        client, prompt="3", negative_prompt="", steps=6, sampler_name="Euler a", cfg_scale=2.5, seed=11, batch_size=2
    )
    assert set(body) == {"images", "parameters", "info"}
    assert images.shape == (2, 16, 16) and images.dtype == np.uint8
    assert body["parameters"]["prompt"] == "3" and body["parameters"]["steps"] == 6
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12]
    assert info["sampler_name"] == "Euler a" and info["scheduler"] == "Automatic"
    assert info["steps"] == 6 and info["cfg_scale"] == 2.5
    assert (info["width"], info["height"]) == (16, 16)
    assert info["prompt"] == "3" and info["negative_prompt"] == ""
    assert len(info["infotexts"]) == 2 and len(info["all_subseeds"]) == 2
    assert info["interrupted"] is False and info["ignored_fields"] == []
    assert {"subseed", "all_subseeds", "ignored_fields", "interrupted"} <= set(info)


def test_every_png_has_webui_parameters(client):
    _, info, body = generate(
        client, prompt="7", negative_prompt="2", steps=7, sampler_name="DPM++ 2M", cfg_scale=2, seed=5, n_iter=3
    )
    for i, (data, infotext) in enumerate(zip(body["images"], info["infotexts"], strict=True)):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and image.size == (16, 16)
        assert image.text["parameters"] == infotext
        lines = infotext.split("\n")
        assert lines[0] == "7" and lines[1] == "Negative prompt: 2"
        assert re.fullmatch(
            rf"Steps: 7, Sampler: DPM\+\+ 2M, Schedule type: Automatic, CFG scale: 2(\.0)?, Seed: {5 + i}, "
            r"Size: 16x16, Model hash: [0-9a-f]{10}, Model: digits(, [^,:]+: [^,]+)*",
            lines[2],
        ), lines[2]


def test_seed_minus_one_is_random_and_reported(client):
    images, info, _ = generate(client, steps=5, seed=-1, batch_size=2)
    other, info2, _ = generate(client, steps=5, seed=-1, batch_size=2)
    assert 0 <= info["seed"] <= 2**32 - 1 and info["seed"] != info2["seed"]
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert f"Seed: {info['seed']}," in info["infotexts"][0]
    assert np.array_equal(txt(client, steps=5, seed=info["seed"], batch_size=2), images)
    assert not np.array_equal(images, other)


def test_n_iter_times_batch_size_images_with_seed_plus_i(client):
    images, info, _ = generate(client, prompt="1", steps=5, seed=40, batch_size=2, n_iter=3, sampler_name="Euler a")
    assert images.shape == (6, 16, 16)
    assert info["all_seeds"] == list(range(40, 46))
    for i, infotext in enumerate(info["infotexts"]):
        assert f"Seed: {40 + i}," in infotext
    single = txt(client, prompt="1", steps=5, seed=43, sampler_name="Euler a")
    assert np.array_equal(images[3], single[0])


def batch_splits(client, sampler: str) -> list[np.ndarray]:
    fields = {"prompt": "4", "cfg_scale": 3, "steps": 6, "seed": 21, "sampler_name": sampler}
    return [txt(client, batch_size=b, n_iter=n, **fields) for b, n in ((1, 4), (4, 1), (2, 2))]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_same_seed_nearly_same_pixels_at_any_batch_split(client, sampler):
    one_by_four, four_by_one, two_by_two = batch_splits(client, sampler)
    assert one_by_four.shape == four_by_one.shape == two_by_two.shape == (4, 16, 16)
    for other in (four_by_one, two_by_two):
        difference = np.abs(one_by_four.astype(int) - other)
        assert difference.max() <= 1 and (difference == 0).mean() >= 0.99
    assert len({image.tobytes() for image in one_by_four}) == 4  # each seed its own image


@pytest.mark.parametrize(
    ("request_fields", "generate_options"),
    [
        (
            {"prompt": "3", "cfg_scale": 2, "sampler_name": "DPM++ 2M", "steps": 10, "seed": 5},
            {"class_label": "3", "guidance_scale": 2.0, "sampler": "dpmpp_2m", "steps": 10, "seed": 5},
        ),
        (
            {"prompt": "8", "cfg_scale": 1.5, "sampler_name": "Euler a", "steps": 7, "seed": 9, "batch_size": 3},
            {"class_label": "8", "guidance_scale": 1.5, "sampler": "euler_ancestral", "steps": 7, "seed": 9},
        ),
        (
            {"prompt": "", "sampler_name": "DDIM", "steps": 6, "seed": 2, "n_iter": 2, "eta": 0.5},
            {"sampler": "ddim", "steps": 6, "seed": 2, "eta": 0.5},
        ),
        (
            {"prompt": "2", "negative_prompt": "5", "cfg_scale": 3, "sampler_name": "UniPC", "steps": 6, "seed": 4},
            {"class_label": "2", "negative_class": "5", "guidance_scale": 3.0, "sampler": "unipc", "steps": 6,
             "seed": 4},
        ),
        (
            {"negative_prompt": "5", "cfg_scale": 3, "sampler_name": "Heun", "steps": 5, "seed": 4},
            {"negative_class": "5", "guidance_scale": 3.0, "sampler": "heun", "steps": 5, "seed": 4},
        ),
        (
            {"prompt": "6", "cfg_scale": 2, "sampler_name": "DPM++ 2M Karras", "steps": 8, "seed": 6},
            {"class_label": "6", "guidance_scale": 2.0, "sampler": "dpmpp_2m", "schedule": "karras", "steps": 8,
             "seed": 6},
        ),
        (
            {"prompt": "6", "cfg_scale": 2, "sampler_name": "Euler", "scheduler": "sgm_uniform", "steps": 8, "seed": 6},
            {"class_label": "6", "guidance_scale": 2.0, "sampler": "euler", "schedule": "trailing", "steps": 8,
             "seed": 6},
        ),
        (
            {"prompt": "1", "cfg_scale": 2, "sampler_name": "Euler", "s_churn": 1.0, "steps": 6, "seed": 8},
            {"class_label": "1", "guidance_scale": 2.0, "sampler": "euler", "s_churn": 1.0, "steps": 6, "seed": 8},
        ),
        (
            {"prompt": "1", "sampler_name": "DDIM", "steps": 6, "seed": 8, "subseed": 99, "subseed_strength": 0.5},
            {"class_label": "1", "guidance_scale": 7.0, "sampler": "ddim", "steps": 6, "seed": 8, "subseed": 99,
             "subseed_strength": 0.5},
        ),
    ],
    ids=["dpmpp-2m", "euler-a-batch", "unconditional-ddim-eta", "negative", "negative-only", "karras", "sgm", "churn",
         "variation"],
)  # fmt: skip
def test_same_pixels_as_the_python_api(client, pipe, request_fields, generate_options):
    request_fields.setdefault("prompt", "")
    images, _, _ = generate(client, **request_fields)
    count = request_fields.get("batch_size", 1) * request_fields.get("n_iter", 1)
    expected = pipe.generate(num_images=count, batch_size=request_fields.get("batch_size", 1), **generate_options)
    assert images.shape == (count, 16, 16)
    assert np.array_equal(images, expected[..., 0])


def test_unconditional_model_matches_the_python_api(client, models):
    images, _, _ = generate(
        client, steps=6, seed=12, batch_size=2, sampler_name="Euler a", override_settings={"sd_model_checkpoint": "unc"}
    )
    expected = inkwash.load(models / "unc", device="cpu").generate(
        sampler="euler_ancestral", steps=6, seed=12, num_images=2, batch_size=2
    )
    assert np.array_equal(images, expected[..., 0])


def test_sampler_index_is_used_without_sampler_name(client):
    _, info, _ = generate(client, steps=5, seed=1, sampler_index="DDIM")
    assert info["sampler_name"] == "DDIM"
    _, info, _ = generate(client, steps=5, seed=1, sampler_index="DDIM", sampler_name="Heun")
    assert info["sampler_name"] == "Heun"
    assert_error(client.post(T2I, json={"steps": 5, "sampler_index": "Nope"}), 422, "sampler_index")


def test_empty_sampler_name_falls_back_to_sampler_index(client):
    _, info, _ = generate(client, steps=5, seed=1, sampler_name="", sampler_index="DDIM")
    assert info["sampler_name"] == "DDIM"


def test_every_sampler_at_few_steps(client):
    for sampler in SAMPLERS:
        for steps in (1, 2):
            images, info, _ = generate(client, prompt="2", steps=steps, seed=1, sampler_name=sampler)
            assert images.shape == (1, 16, 16) and info["steps"] == steps
        generate(
            client, I2I, init_images=[png_b64(INIT)], denoising_strength=0.5, steps=4, seed=1, sampler_name=sampler
        )


def test_legacy_sampler_name_sets_the_karras_schedule(client):
    legacy, info, _ = generate(client, prompt="2", steps=8, seed=3, sampler_name="DPM++ 2M Karras")
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]
    explicit = txt(client, prompt="2", steps=8, seed=3, sampler_name="DPM++ 2M", scheduler="Karras")
    automatic = txt(client, prompt="2", steps=8, seed=3, sampler_name="DPM++ 2M")
    assert np.array_equal(legacy, explicit) and not np.array_equal(legacy, automatic)
    # an explicit schedule type wins over the one in the name
    _, info, _ = generate(client, steps=5, seed=3, sampler_name="DPM++ 2M Karras", scheduler="Exponential")
    assert info["scheduler"] == "Exponential"


@pytest.mark.parametrize(
    ("scheduler", "label"),
    [("automatic", "Automatic"), ("AUTOMATIC", "Automatic"), ("Karras", "Karras"), ("sgm_uniform", "SGM Uniform")],
)
def test_scheduler_names(client, scheduler, label):
    _, info, _ = generate(client, steps=6, seed=3, sampler_name="Euler", scheduler=scheduler)
    assert info["scheduler"] == label
    assert f"Schedule type: {label}," in info["infotexts"][0]


def test_schedulers_change_the_steps(client):
    automatic = txt(client, prompt="2", sampler_name="Euler", scheduler="automatic")
    karras = txt(client, prompt="2", sampler_name="Euler", scheduler="Karras")
    assert np.array_equal(automatic, txt(client, prompt="2", sampler_name="Euler", scheduler="AUTOMATIC"))
    assert not np.array_equal(automatic, karras)


def test_eta_is_accepted_by_every_sampler(client):
    for sampler in SAMPLERS:
        _, info, _ = generate(client, prompt="5", steps=5, seed=2, sampler_name=sampler, eta=1.0)
        assert info["sampler_name"] == sampler


def test_eta_changes_ddim_but_not_dpmpp_2m(client):
    ddim = {"prompt": "5", "sampler_name": "DDIM", "steps": 8, "seed": 2}
    assert not np.array_equal(txt(client, eta=0.0, **ddim), txt(client, eta=1.0, **ddim))
    assert np.array_equal(txt(client, eta=0.0, **ddim), txt(client, **ddim))  # DDIM's default is eta 0
    _, info, _ = generate(client, eta=1.0, **ddim)
    assert info["sampler_settings"] == {"eta": 1.0} and "Eta: 1," in info["infotexts"][0]
    dpm = {"prompt": "5", "sampler_name": "DPM++ 2M", "steps": 8, "seed": 2}
    assert np.array_equal(txt(client, eta=0.0, **dpm), txt(client, eta=1.0, **dpm))


def test_churn_settings_are_accepted(client):
    euler = {"prompt": "5", "sampler_name": "Euler", "steps": 8, "seed": 2}
    churned, info, _ = generate(client, s_churn=1.0, s_tmin=0, s_tmax=0, s_noise=1.0, **euler)
    # s_tmax 0 (unbounded) runs as infinity and is reported as the WebUI writes it, 0, to keep info strict JSON
    assert info["sampler_settings"] == {"s_churn": 1.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
    assert not np.array_equal(churned, txt(client, **euler))
    assert np.array_equal(txt(client, s_churn=0, **euler), txt(client, **euler))
    for sampler in ("Euler a", "DPM++ 2M", "DDPM"):  # samplers without them ignore them
        generate(client, sampler_name=sampler, s_churn=0.5, s_tmin=0.1, s_tmax=0, s_noise=1.0, steps=5)


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_info_is_strict_json(client):
    response = client.post(T2I, json={"steps": 5, "seed": 1, "sampler_name": "Euler", "s_churn": 1.0, "s_tmax": 0})
    assert response.status_code == 200
    json.loads(response.json()["info"], parse_constant=reject_constant)


def test_variation_seed(client):
    for sampler in ("DDIM", "DPM++ 2M"):  # deterministic: the starting noise is all there is
        base = {"prompt": "3", "sampler_name": sampler, "steps": 8}
        plain = txt(client, seed=10, **base)
        assert np.array_equal(txt(client, seed=10, subseed=77, subseed_strength=0.0, **base), plain)
        full, info, _ = generate(client, seed=10, subseed=77, subseed_strength=1.0, **base)
        assert np.array_equal(full, txt(client, seed=77, **base))
        assert info["seed"] == 10 and info["subseed"] == 77 and info["subseed_strength"] == 1.0
        half, info, _ = generate(client, seed=10, subseed=77, subseed_strength=0.5, **base)
        assert not np.array_equal(half, plain) and not np.array_equal(half, full)
        assert "Variation seed: 77, Variation seed strength: 0.5" in info["infotexts"][0]
    # an ancestral sampler's later noise still comes from the main seed
    base = {"prompt": "3", "sampler_name": "Euler a", "steps": 8}
    assert not np.array_equal(
        txt(client, seed=10, subseed=77, subseed_strength=1.0, **base), txt(client, seed=77, **base)
    )
    # image i's variation seed is subseed + i
    batch, info, _ = generate(client, seed=10, subseed=77, subseed_strength=1.0, n_iter=2, prompt="3",
                              sampler_name="DDIM", steps=8)  # fmt: skip
    assert info["all_subseeds"] == [77, 78]
    assert np.array_equal(batch[1], txt(client, seed=78, prompt="3", sampler_name="DDIM", steps=8)[0])


def test_random_variation_seed_is_reported(client):
    _, info, _ = generate(client, steps=5, seed=1, subseed=-1, subseed_strength=0.3)
    assert 0 <= info["subseed"] <= 2**32 - 1
    assert f"Variation seed: {info['subseed']}," in info["infotexts"][0]


def test_negative_prompt_changes_a_class_model_output(client):
    base = {"prompt": "3", "cfg_scale": 3, "sampler_name": "DDIM"}
    plain = txt(client, **base)
    steered = txt(client, negative_prompt="8", **base)
    assert not np.array_equal(plain, steered)
    assert np.array_equal(steered, txt(client, negative_prompt=" 8 ", **base))
    assert not np.array_equal(steered, txt(client, negative_prompt="1", **base))


def test_prompt_on_an_unconditional_model_is_422(client):
    for field in ("prompt", "negative_prompt"):
        response = client.post(T2I, json={field: "3", "steps": 5, "override_settings": {"sd_model_checkpoint": "unc"}})
        assert_error(response, 422, field)
    assert_error(client.post(T2I, json={"prompt": "cat", "steps": 5}), 422, "prompt")


def test_send_images_false(client):
    _, info, body = generate(client, steps=5, seed=1, batch_size=2, send_images=False)
    assert body["images"] == []
    assert info["all_seeds"] == [1, 2] and len(info["infotexts"]) == 2


def test_save_images(models, tmp_path, client):
    app = create_app(ServeOptions(checkpoint=str(models / "digits"), device="cpu", save_dir=str(tmp_path / "out")))
    with TestClient(app) as saving:
        _, info, body = generate(saving, steps=5, seed=30, batch_size=2, save_images=True)
        assert info["saved"] is True
        files = sorted((tmp_path / "out").glob("*.png"))
        assert len(files) == 2
        for i, (path, data) in enumerate(zip(files, body["images"], strict=True)):
            assert path.read_bytes() == base64.b64decode(data)
            assert f"Seed: {30 + i}," in Image.open(path).text["parameters"]
        generate(saving, steps=5, seed=50, save_images=False)
        assert len(list((tmp_path / "out").glob("*.png"))) == 2
    _, info, body = generate(client, steps=5, seed=30, save_images=True)  # no --save-dir: harmless
    assert info["saved"] is False and len(body["images"]) == 1


def test_save_images_keeps_every_picture(models, tmp_path):
    app = create_app(ServeOptions(checkpoint=str(models / "digits"), device="cpu", save_dir=str(tmp_path)))
    with TestClient(app) as saving:
        for prompt in ("1", "2"):
            generate(saving, prompt=prompt, steps=5, seed=9, save_images=True)
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_ignored_fields_are_listed(client):
    _, info, body = generate(
        client,
        steps=5,
        seed=1,
        restore_faces=True,
        enable_hr=False,
        styles=["anime"],
        alwayson_scripts={"controlnet": {"args": []}},
        not_a_webui_field=3,
        denoising_strength=0.5,
    )
    assert info["ignored_fields"] == sorted(
        ["restore_faces", "enable_hr", "styles", "alwayson_scripts", "not_a_webui_field", "denoising_strength"]
    )
    assert body["parameters"]["not_a_webui_field"] == 3


def test_highest_seed_with_a_batch(client):
    _, info, _ = generate(client, steps=5, seed=2**32 - 1, batch_size=2)
    assert info["all_seeds"] == [2**32 - 1, 2**32]


# --- png-info -------------------------------------------------------------------------------------------


def test_png_info_round_trip(client):
    fields = {
        "prompt": "7",
        "negative_prompt": "2",
        "steps": 12,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 2.5,
        "seed": 5,
    }
    images, info, body = generate(client, **fields)
    for image in (body["images"][0], "data:image/png;base64," + body["images"][0]):
        response = client.post("/sdapi/v1/png-info", json={"image": image})
        assert response.status_code == 200
        result = response.json()
        assert result["info"] == info["infotexts"][0]
        assert result["items"] == {}
        expected = {
            "Prompt": "7",
            "Negative prompt": "2",
            "Steps": 12,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 2.5,
            "Seed": 5,
            "Size-1": 16,
            "Size-2": 16,
            "Model": "digits",
        }
        assert {key: result["parameters"].get(key) for key in expected} == expected
    # the parameters reproduce the image
    p = result["parameters"]
    again = txt(
        client,
        prompt=p["Prompt"],
        negative_prompt=p["Negative prompt"],
        steps=p["Steps"],
        sampler_name=p["Sampler"],
        scheduler=p["Schedule type"],
        cfg_scale=p["CFG scale"],
        seed=p["Seed"],
    )
    assert np.array_equal(again, images)


def test_png_info_of_other_pngs(client):
    result = client.post("/sdapi/v1/png-info", json={"image": png_b64(INIT)}).json()
    assert result == {"info": "", "items": {}, "parameters": {}}
    result = client.post(
        "/sdapi/v1/png-info",
        json={"image": png_b64(INIT, parameters="a cat\nSteps: 3, Seed: 4, Size: 8x6", Comment="hi")},
    ).json()
    assert result["info"] == "a cat\nSteps: 3, Seed: 4, Size: 8x6"
    assert result["items"] == {"Comment": "hi"}
    assert result["parameters"] == {"Prompt": "a cat", "Negative prompt": "", "Steps": 3, "Seed": 4, "Size-1": 8,
                                    "Size-2": 6}  # fmt: skip
    assert_error(client.post("/sdapi/v1/png-info", json={"image": "%%%"}), None, "image")
    assert_error(client.post("/sdapi/v1/png-info", json={}), 422, "image")


# --- img2img --------------------------------------------------------------------------------------------


def test_img2img_with_and_without_a_data_url(client):
    fields = {"steps": 10, "seed": 4, "prompt": "3", "denoising_strength": 0.6, "sampler_name": "Euler a"}
    plain, info, _ = generate(client, I2I, init_images=[png_b64(INIT)], **fields)
    prefixed, _, _ = generate(client, I2I, init_images=["data:image/png;base64," + png_b64(INIT)], **fields)
    assert np.array_equal(plain, prefixed)
    assert not np.array_equal(plain[0], INIT)
    assert info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in info["infotexts"][0]


def test_img2img_matches_the_python_api(client, pipe):
    fields = {"steps": 10, "seed": 4, "prompt": "3", "cfg_scale": 2, "denoising_strength": 0.6, "sampler_name": "DDIM"}
    images, _, _ = generate(client, I2I, init_images=[png_b64(INIT)], batch_size=2, **fields)
    expected = pipe.generate(
        init_image=INIT[..., None],
        strength=0.6,
        sampler="ddim",
        steps=10,
        seed=4,
        class_label="3",
        guidance_scale=2.0,
        num_images=2,
        batch_size=2,
    )
    assert np.array_equal(images, expected[..., 0])


def test_denoising_strength_zero_returns_the_input(client):
    images, _, _ = generate(client, I2I, init_images=[png_b64(INIT)], denoising_strength=0, steps=10, seed=1)
    assert np.array_equal(images[0], INIT)


def test_init_image_of_another_size_is_resized(client):
    big = np.random.default_rng(8).integers(0, 256, (40, 40, 3), np.uint8)
    images, info, _ = generate(client, I2I, init_images=[png_b64(big)], denoising_strength=0, steps=5, seed=1)
    assert images.shape == (1, 16, 16)
    assert np.array_equal(images[0], prepare_image(Image.fromarray(big), 1, 16, "resize")[..., 0])
    assert (info["width"], info["height"]) == (16, 16)
    generate(client, I2I, init_images=[png_b64(big)], denoising_strength=0.5, steps=5, seed=1)


def corner_mask(n: int) -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask[:n, :n] = 255
    return mask


@pytest.mark.parametrize("mask_blur", [4, 0, None])
def test_inpainting_keeps_pixels_outside_the_blurred_mask(client, mask_blur):
    mask = corner_mask(5)
    fields = {"init_images": [png_b64(INIT)], "mask": png_b64(mask), "denoising_strength": 1.0, "steps": 8, "seed": 3}
    if mask_blur is not None:
        fields["mask_blur"] = mask_blur
    images, info, _ = generate(client, I2I, prompt="3", sampler_name="Euler a", **fields)
    blur = 4 if mask_blur is None else mask_blur  # the clients' default
    alpha = blur_mask(mask > 127, blur, blur)
    kept, regenerated = alpha == 0, alpha >= 0.5
    # enough of each to test (blur 4 reaches 10 pixels; OpenCV's reflected border thins a corner mask)
    assert kept.sum() >= 60 and regenerated.sum() >= 8
    assert np.array_equal(images[0][kept], INIT[kept])
    assert (images[0][regenerated] != INIT[regenerated]).mean() > 0.5
    assert f"Mask blur: {blur}," in info["infotexts"][0]


def test_inpainting_mask_invert(client):
    mask = 255 - corner_mask(6)  # white outside the corner; inverted, the corner regenerates
    fields = {"init_images": [png_b64(INIT)], "mask": png_b64(mask), "mask_blur": 2, "steps": 8, "seed": 3}
    images, _, _ = generate(client, I2I, inpainting_mask_invert=1, denoising_strength=1.0, **fields)
    alpha = blur_mask(mask <= 127, 2, 2)
    kept = alpha == 0
    assert kept.sum() > 20
    assert np.array_equal(images[0][kept], INIT[kept])
    assert (images[0][alpha >= 0.5] != INIT[alpha >= 0.5]).mean() > 0.5
    plain, _, _ = generate(client, I2I, inpainting_mask_invert=0, denoising_strength=1.0, **fields)
    assert not np.array_equal(plain, images)


def test_inpainting_fill_modes(client):
    mask = corner_mask(5)
    kept, outputs = mask == 0, []
    for fill in (0, 1, 2, 3):
        images, _, _ = generate(
            client,
            I2I,
            init_images=[png_b64(INIT)],
            mask=png_b64(mask),
            mask_blur=0,
            inpainting_fill=fill,
            denoising_strength=0.5,
            sampler_name="DDIM",
            steps=8,
            seed=3,
        )
        assert np.array_equal(images[0][kept], INIT[kept])
        outputs.append(images[0].tobytes())
    assert len(set(outputs)) == 4  # each fill starts the sampler from another picture


def test_inpainting_without_blur_matches_the_python_api(client, pipe):
    mask = corner_mask(5)
    images, _, _ = generate(
        client,
        I2I,
        init_images=[png_b64(INIT)],
        mask=png_b64(mask),
        mask_blur=0,
        inpainting_fill=1,  # original: the init image goes to the sampler unchanged
        denoising_strength=0.8,
        prompt="3",
        cfg_scale=2,
        sampler_name="DDIM",
        steps=8,
        seed=3,
    )
    expected = pipe.generate(
        init_image=INIT[..., None],
        mask=mask > 127,
        strength=0.8,
        class_label="3",
        guidance_scale=2.0,
        sampler="ddim",
        steps=8,
        seed=3,
        num_images=1,
    )
    assert np.array_equal(images, expected[..., 0])


def test_rgba_mask_uses_its_alpha(client):
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[:6, :6, 3] = 255  # opaque black strokes on a transparent layer: regenerate there
    images, _, _ = generate(
        client,
        I2I,
        init_images=[png_b64(INIT)],
        mask=png_b64(mask),
        mask_blur=0,
        denoising_strength=1.0,
        steps=8,
        seed=3,
    )
    painted = mask[..., 3] > 128
    assert np.array_equal(images[0][~painted], INIT[~painted])
    assert (images[0][painted] != INIT[painted]).mean() > 0.5


def test_inpaint_full_res_is_accepted_and_listed_as_ignored(client):
    fields = {"init_images": [png_b64(INIT)], "mask": png_b64(corner_mask(6)), "steps": 5, "seed": 1}
    for value in (True, 1, False, 0):
        _, info, _ = generate(client, I2I, inpaint_full_res=value, inpaint_full_res_padding=32, **fields)
        assert "inpaint_full_res" in info["ignored_fields"] and "inpaint_full_res_padding" in info["ignored_fields"]


def test_ignored_fields_have_no_duplicates(client):
    fields = {"init_images": [png_b64(INIT)], "mask": png_b64(corner_mask(6)), "steps": 5, "seed": 1}
    _, info, _ = generate(client, I2I, inpaint_full_res=True, **fields)
    assert len(info["ignored_fields"]) == len(set(info["ignored_fields"])), info["ignored_fields"]


def test_mask_of_another_size_is_resized(client):
    big_init = np.kron(INIT, np.ones((2, 2), np.uint8))  # 32x32
    mask = np.zeros((64, 64), np.uint8)
    mask[:10, :10] = 255
    images, _, _ = generate(
        client, I2I, init_images=[png_b64(big_init)], mask=png_b64(mask), mask_blur=0, steps=5, seed=1
    )
    assert images.shape == (1, 16, 16)


# --- bad input ------------------------------------------------------------------------------------------


def truncated_png() -> str:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8)
    data = base64.b64decode(png_b64(noisy))
    return base64.b64encode(data[: len(data) * 2 // 3]).decode("ascii")


I2I_OK = {"init_images": [png_b64(INIT)], "steps": 5}
# (id, path, json body, contract status, field named in the error)
BAD_FIELDS = [
    ("unknown-sampler", T2I, {"sampler_name": "Euler z"}, 422, "sampler_name"),
    ("unknown-scheduler", T2I, {"scheduler": "Wavy"}, 422, "scheduler"),
    ("unsupported-scheduler", T2I, {"scheduler": "Beta"}, 422, "scheduler"),
    ("steps-0", T2I, {"steps": 0}, 422, "steps"),
    ("steps-over-max", T2I, {"steps": 201}, 422, "steps"),
    ("steps-string", T2I, {"steps": "many"}, 422, "steps"),
    ("cfg-string", T2I, {"cfg_scale": "high"}, 422, "cfg_scale"),
    ("cfg-negative", T2I, {"cfg_scale": -1}, 422, "cfg_scale"),
    ("batch-size-over-max", T2I, {"batch_size": 5}, 422, "batch_size"),
    ("images-over-max", T2I, {"batch_size": 4, "n_iter": 3}, 422, "n_iter"),
    ("seed-below", T2I, {"seed": -2}, 422, "seed"),
    ("seed-above", T2I, {"seed": 2**32}, 422, "seed"),
    ("subseed-above", T2I, {"subseed": 2**32, "subseed_strength": 0.5}, 422, "subseed"),
    ("subseed-strength", T2I, {"subseed_strength": 1.5}, 422, "subseed_strength"),
    ("width", T2I, {"width": 32}, 422, "width"),
    ("height", T2I, {"height": 8}, 422, "height"),
    ("width-zero", T2I, {"width": 0}, 422, "width"),
    ("eta-negative", T2I, {"eta": -0.5}, 422, "eta"),
    ("unknown-class", T2I, {"prompt": "11"}, 422, "prompt"),
    ("unknown-model", T2I, {"override_settings": {"sd_model_checkpoint": "nope"}}, 422, "sd_model_checkpoint"),
    ("override-not-object", T2I, {"override_settings": "unc"}, 422, "override_settings"),
    ("prompt-number", T2I, {"prompt": ["3"]}, 422, "prompt"),
    ("empty-init-images", I2I, {"init_images": [], "steps": 5}, 422, "init_images"),
    ("no-init-images", I2I, {"steps": 5}, 422, "init_images"),
    ("init-image-number", I2I, {"init_images": [3], "steps": 5}, 422, "init_images"),
    ("two-init-images", I2I, {**I2I_OK, "init_images": [png_b64(INIT)] * 2}, 422, "init_images"),
    ("denoising-above", I2I, {**I2I_OK, "denoising_strength": 1.5}, 422, "denoising_strength"),
    ("fill-4", I2I, {**I2I_OK, "inpainting_fill": 4}, 422, "inpainting_fill"),
    ("mask-blur-negative", I2I, {**I2I_OK, "mask_blur": -1}, 422, "mask_blur"),
    ("resize-mode-2", I2I, {**I2I_OK, "resize_mode": 2}, 422, "resize_mode"),
]
# The contract: 400 for bad base64 or images.
BAD_IMAGES = [
    ("broken-base64", I2I, {**I2I_OK, "init_images": ["@@not base64@@"]}, 422, "init_images"),
    ("not-an-image", I2I, {**I2I_OK, "init_images": [base64.b64encode(b"GIF? no").decode()]}, 422, "init_images"),
    ("truncated-png", I2I, {**I2I_OK, "init_images": [truncated_png()]}, 422, "init_images"),
    ("empty-string-image", I2I, {**I2I_OK, "init_images": [""]}, 422, "init_images"),
    ("broken-mask", I2I, {**I2I_OK, "mask": "@@"}, 422, "mask"),
    ("png-info-broken", "/sdapi/v1/png-info", {"image": "@@"}, 422, "image"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), [case[1:] for case in BAD_FIELDS + BAD_IMAGES],
                         ids=[case[0] for case in BAD_FIELDS + BAD_IMAGES])  # fmt: skip
def test_bad_fields_are_json_4xx_naming_the_field(client, path, body, status, field):
    assert_error(client.post(path, json=body), None, field)


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [case[1:] for case in BAD_FIELDS + BAD_IMAGES],
    ids=[case[0] for case in BAD_FIELDS + BAD_IMAGES],
)
def test_bad_fields_status(client, path, body, status, field):
    assert client.post(path, json=body).status_code == status


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"cfg_scale": NaN}', "cfg_scale"),
        (b'{"cfg_scale": Infinity}', "cfg_scale"),
        (b'{"cfg_scale": -Infinity}', "cfg_scale"),
        (b'{"denoising_strength": NaN, "init_images": ["x"]}', "denoising_strength"),
        (b'{"eta": NaN}', "eta"),
        (b'{"subseed_strength": NaN}', "subseed_strength"),
        (b'{"s_noise": Infinity}', "s_noise"),
    ],
)
def test_non_finite_numbers_are_422(client, raw, field):
    path = I2I if b"init_images" in raw else T2I
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 422, field)


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"", {"content-type": "application/json"}, 400),
        (b"", {}, 400),
        (b"[1, 2]", {"content-type": "application/json"}, None),
        (b'"a string"', {"content-type": "application/json"}, None),
        (b'{"steps": 5}', {"content-type": "text/plain"}, None),
        (b"steps=5", {"content-type": "application/x-www-form-urlencoded"}, None),
    ],
    ids=["not-json", "empty", "empty-no-type", "array", "string", "text-plain", "form"],
)
def test_bodies_that_are_not_a_json_object(client, content, headers, status):
    for path in (T2I, I2I, "/sdapi/v1/png-info"):
        assert_error(client.post(path, content=content, headers=headers), status, "body")


def test_huge_bodies_are_413(client):
    limit = int(LIMITS["max_body_mb"] * 1024 * 1024)
    big = b'{"prompt": "' + b"x" * (limit + 10) + b'"}'
    response = client.post(T2I, content=big, headers={"content-type": "application/json"})
    assert_error(response, 413, "body")

    def chunks():  # no content-length: chunked transfer
        yield b'{"prompt": "'
        for _ in range(limit // 10_000 + 2):
            yield b"x" * 10_000
        yield b'"}'

    response = client.post(I2I, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body")
    # a body just under the limit is read
    fits = b'{"steps": 5, "pad": "' + b"x" * (limit - 100) + b'"}'
    assert client.post(T2I, content=fits, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize(("method", "path"), [("GET", "/sdapi/v1/nope"), ("GET", T2I)])
def test_unknown_routes_and_methods_answer_with_error(client, method, path):
    response = client.request(method, path)
    assert response.status_code == (404 if path.endswith("nope") else 405)
    assert isinstance(response.json().get("error"), str)


# --- progress, interrupt and the queue (a real server) --------------------------------------------------

LONG = {"prompt": "3", "cfg_scale": 2, "sampler_name": "DDPM", "steps": 1000, "seed": 1}


class Background:
    """A request running on its own thread."""

    def __init__(self, url: str, body: dict, path: str = T2I) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(url + path, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            self.response = httpx.post(url, json=body, timeout=60)
        except BaseException as exc:  # reported by the test
            self.error = exc
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request hung"
        assert self.error is None, self.error
        return self.response


def wait_for_step(url: str, step: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = httpx.get(url + "/sdapi/v1/progress", timeout=10).json()
        if progress["state"]["sampling_step"] >= step:
            return progress
        time.sleep(0.02)
    raise AssertionError(f"sampling never reached step {step}")


def interrupt_until_done(url: str, requests: list[Background], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(r.thread.is_alive() for r in requests) and time.monotonic() < deadline:
        httpx.post(url + "/sdapi/v1/interrupt", timeout=10)
        time.sleep(0.05)


def test_progress_during_a_run(live):
    running = Background(live, {**LONG, "batch_size": 2, "n_iter": 2})
    try:
        first = wait_for_step(live, 2)
        second = wait_for_step(live, first["state"]["sampling_step"] + 2)
    finally:
        interrupt_until_done(live, [running])
    running.join(30)
    for progress in (first, second):
        assert 0 < progress["progress"] < 1
        state = progress["state"]
        assert state["job"] == "txt2img" and state["job_count"] == 2 and state["job_no"] == 0
        assert state["sampling_steps"] == 1000 and state["interrupted"] is False
        assert progress["eta_relative"] > 0
        assert progress["textinfo"] == f"Sampling step {state['sampling_step']}/1000"
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.format == "PNG" and preview.size == (16 * 2, 16)
    assert second["state"]["sampling_step"] > first["state"]["sampling_step"]
    assert second["progress"] > first["progress"]
    assert first["progress"] == pytest.approx(first["state"]["sampling_step"] / 2000)
    skipped = httpx.get(live + "/sdapi/v1/progress", params={"skip_current_image": True}).json()
    assert skipped["current_image"] is None
    idle = httpx.get(live + "/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["current_image"] is None


def test_interrupt_returns_what_it_has(live):
    started = time.monotonic()
    running = Background(live, {**LONG, "n_iter": 2})
    wait_for_step(live, 1)
    asked = time.monotonic()
    response = httpx.post(live + "/sdapi/v1/interrupt", timeout=10)
    assert response.status_code == 200 and response.json() == {}
    result = running.join(30)
    assert result.status_code == 200, result.text
    assert running.finished_at - asked < 3, "the request did not stop soon after the interrupt"
    assert running.finished_at - started < 15
    info = json.loads(result.json()["info"])
    assert info["interrupted"] is True
    assert len(result.json()["images"]) == 1  # the first batch's latest prediction; no second batch
    assert info["all_seeds"] == [1] and len(info["infotexts"]) == 1
    assert decode(result.json()["images"][0]).shape == (16, 16)
    after = httpx.post(live + T2I, json={"steps": 5, "seed": 1}, timeout=30)
    assert json.loads(after.json()["info"])["interrupted"] is False


def test_queue_full_is_429_and_nothing_hangs(live):
    requests = []
    try:
        for _ in range(4):
            requests.append(Background(live, LONG))
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while sum(not r.thread.is_alive() for r in requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        interrupt_until_done(live, requests)
    responses = [r.join(30) for r in requests]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429], statuses  # one runs, one waits (queue_size 1), two are refused
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "queue")
            assert response.headers.get("retry-after")


# --- basic auth -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(models):
    app = create_app(ServeOptions(checkpoint=str(models / "digits"), device="cpu", api_auth="u:p,v:q"))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("path", ["/sdapi/v1/samplers", "/", "/docs", "/openapi.json", "/static/app.js"])
def test_auth_is_required_everywhere(guarded, path):
    response = guarded.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    assert "authentication" in response.json()["error"]
    assert guarded.get(path, auth=("u", "p")).status_code == 200
    assert guarded.get(path, auth=("v", "q")).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        ("u", "q"),
        ("v", "p"),
        ("w", "p"),
        ("u", ""),
        ("u", "p,v"),
    ],
    ids=["wrong-password", "crossed", "unknown-user", "empty-password", "joined"],
)
def test_wrong_credentials_are_401(guarded, header):
    response = guarded.get("/sdapi/v1/samplers", auth=header)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("value", ["Basic !!!", "Basic", "Bearer dTpw", "basic " + base64.b64encode(b"up").decode()])
def test_malformed_authorization_headers_are_401(guarded, value):
    assert guarded.get("/sdapi/v1/samplers", headers={"authorization": value}).status_code == 401


def test_auth_then_a_generation(guarded):
    response = guarded.post(T2I, json={"steps": 5, "seed": 1}, auth=("v", "q"))
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert guarded.post(T2I, json={"steps": 5, "seed": 1}).status_code == 401


@pytest.mark.parametrize("value", ["u", "u:", ":p", "u:p,", "u:p,,v:q", "u:p,w"])
def test_bad_api_auth_strings_are_refused(models, value):
    with pytest.raises(InkwashError, match="api-auth"):
        create_app(ServeOptions(checkpoint=str(models / "digits"), device="cpu", api_auth=value))


# --- options and the command line -----------------------------------------------------------------------


def test_serve_options_hosts(models):
    default = ServeOptions(checkpoint=str(models / "digits"))
    assert default.host == "127.0.0.1" and default.bind_host == "127.0.0.1" and default.exposed is False
    listen = ServeOptions(checkpoint=str(models / "digits"), listen=True)
    assert listen.bind_host == "0.0.0.0" and listen.exposed is True
    for host, exposed in (("localhost", False), ("::1", False), ("127.0.0.2", False), ("0.0.0.0", True),
                          ("192.168.1.5", True), ("myhost.example", True)):  # fmt: skip
        assert ServeOptions(checkpoint="x", host=host).exposed is exposed, host
    with pytest.raises(InkwashError, match="--checkpoint"):
        ServeOptions().validate()
    with pytest.raises(InkwashError, match="not found"):
        create_app(ServeOptions(checkpoint=str(models / "missing"), device="cpu"))
    for bad, flag in (({"queue_size": 0}, "--queue-size"), ({"max_body_mb": 0}, "--max-body-mb"),
                      ({"port": 70000}, "--port"), ({"max_steps": 0}, "--max-steps"),
                      ({"max_images": 0}, "--max-images")):  # fmt: skip
        with pytest.raises(InkwashError, match=flag):
            create_app(ServeOptions(checkpoint=str(models / "digits"), device="cpu", **bad))


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inkwash", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ONE_THREAD,
    )


def test_cli_without_a_model_is_one_line():
    result = run_cli()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inkwash serve: error:") and "--checkpoint" in lines[0]


def test_cli_port_in_use_is_one_line(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--checkpoint", str(models / "digits"), "--port", str(port), "--device", "cpu")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot listen" in lines[0] and str(port) in lines[0]


def test_cli_serves(models):
    process = subprocess.Popen(
        [sys.executable, "-m", "inkwash", "serve", "--checkpoint", str(models / "digits"), "--port", "0",
         "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url, seen, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert process.poll() is None, f"inkwash serve exited: {''.join(seen)}"
                continue
            seen.append(line)
            match = re.search(r"(http://127\.0\.0\.1:(\d+))/", line)
            if match:
                url = match[1]
                assert int(match[2]) != 0
        assert url is not None, "".join(seen)
        assert "digits" in seen[-1] and "/docs" in seen[-1]
        response = httpx.get(url + "/sdapi/v1/samplers", timeout=30)
        assert response.status_code == 200 and len(response.json()) == 15
        response = httpx.post(url + T2I, json={"steps": 5, "seed": 1, "prompt": "2"}, timeout=30)
        assert response.status_code == 200 and len(response.json()["images"]) == 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
