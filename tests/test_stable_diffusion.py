"""inkwash.load on a Stable Diffusion folder (a tiny random one built here): agreement with diffusers'
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline for DDIM, Euler, Euler a, DPM++ 2M (plain and Karras)
and UniPC with classifier-free guidance; per-sample seeds; sizes; inpainting; the CLI; the folders it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import inkwash
from inkwash.commands.cli import main
from inkwash.errors import InkwashError
from inkwash.interop.random_folders import build_stable_diffusion
from inkwash.interop.stable_diffusion import StableDiffusion
from inkwash.sampling.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

PROMPT, NEGATIVE = "a watercolor of a lighthouse", "blurry"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    build_stable_diffusion(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder) -> StableDiffusion:
    return inkwash.load(folder, device="cpu")


@pytest.fixture(scope="module")
def reference(folder):
    """diffusers' own pipeline on the same folder."""
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _generators(seed: int, count: int) -> list[torch.Generator]:
    """diffusers draws image i's noise from generator i: inkwash's per-sample streams (seed + i)."""
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def _with_scheduler(reference, cls: str, **config):
    scheduler = getattr(diffusers, cls).from_config(reference.scheduler.config, **config)
    pipeline = diffusers.StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _compare(got: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference of images in [0, 1]."""
    return float(np.abs(got - expected).max())


# name: diffusers scheduler, its config on top of the folder's, inkwash's sampler, step schedule and options.
# The folder's scheduler config is Stable Diffusion 1.5's (leading spacing, steps_offset 1, set_alpha_to_one
# false). DPM-Solver's and UniPC's "leading" spacing is T // (steps + 1) apart, which no inkwash schedule
# has, so they are compared with "trailing" on both sides.
TXT2IMG = {
    "ddim": ("DDIMScheduler", {}, "ddim", None, {"eta": 0.0}),
    "euler": ("EulerDiscreteScheduler", {}, "euler", None, {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", None, {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, "dpmpp_2m", "trailing", {}
    ),
    "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, "unipc", "trailing", {}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TXT2IMG))
def test_txt2img_agrees_with_diffusers(pipe, reference, name):
    """The same prompt, negative prompt, guidance 7.5, 8 steps and per-image seeds give the same images as
    diffusers' StableDiffusionPipeline with the matching scheduler (two images in one batch)."""
    cls, config, sampler, schedule, options = TXT2IMG[name]
    theirs = _with_scheduler(reference, cls, **config)
    step_kwargs = {"eta": 0.0} if name == "ddim" else {}
    with torch.no_grad():
        expected = theirs(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=2,
            generator=_generators(11, 2), output_type="np", height=64, width=64, **step_kwargs,
        ).images  # fmt: skip
    got = pipe.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=8, schedule=schedule, num_images=2,
        seed=11, show_progress=False, precision="fp32", **options,
    )  # fmt: skip
    assert got.shape == (2, 64, 64, 3)
    assert expected.std() > 0.01 and not np.allclose(expected[0], expected[1])
    diff = _compare(got.astype(np.float64) / 255, expected)
    print(f"{name}: max abs difference of the [0, 1] images after uint8 rounding {diff:.2e}")
    assert diff <= 1 / 255 + 1e-6  # within one level of 255


def _float_images(pipe, **given) -> np.ndarray:
    """inkwash's images (N, H, W, 3) in [0, 1], before uint8 rounding."""
    init_image, mask = given.pop("init_image", None), given.pop("mask", None)
    job = pipe.prepare(
        pipe.sample_options(show_progress=False, precision="fp32", **given), init_image=init_image, mask=mask
    )
    return (pipe.run(job).images.permute(0, 2, 3, 1).double().numpy() + 1) / 2


@pytest.mark.parametrize("name", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_txt2img_float_images_agree_with_diffusers(pipe, reference, name):
    """The same comparison before rounding to uint8: fp32 tolerance (measured below 2e-6)."""
    cls, config, sampler, schedule, options = TXT2IMG[name]
    theirs = _with_scheduler(reference, cls, **config)
    with torch.no_grad():
        expected = theirs(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=2,
            generator=_generators(3, 2), output_type="np", height=64, width=64,
        ).images  # fmt: skip
    got = _float_images(
        pipe, prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=8, schedule=schedule, num_images=2,
        seed=3, **options,
    )  # fmt: skip
    diff = _compare(got, expected)
    print(f"{name}: max abs difference of the float images {diff:.2e}")
    assert diff < 1e-4


class RoundedT(torch.nn.Module):
    """The network given the rounded timestep, as DPMSolverMultistepScheduler gives it with Karras sigmas."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x, t, cond=None):
        return self.network(x, torch.as_tensor(t).round(), cond)


def test_dpmpp_2m_karras_agrees_with_diffusers(pipe, reference):
    """DPM++ 2M with Karras sigmas: the scheduler's own sigmas and the rounded timestep it gives the network."""
    theirs = _with_scheduler(reference, "DPMSolverMultistepScheduler", use_karras_sigmas=True)
    with torch.no_grad():
        expected = theirs(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=2,
            generator=_generators(5, 2), output_type="np", height=64, width=64,
        ).images  # fmt: skip
    options = pipe.sample_options(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler="dpmpp_2m", steps=8, num_images=2, seed=5,
        show_progress=False, precision="fp32",
    )  # fmt: skip
    job = pipe.prepare(options)
    job.sigmas = theirs.scheduler.sigmas.double()
    network = pipe.denoiser.network
    pipe.denoiser.network = RoundedT(network)
    try:
        got = (pipe.run(job).images.permute(0, 2, 3, 1).double().numpy() + 1) / 2
    finally:
        pipe.denoiser.network = network
    assert _compare(got, expected) < 1e-4


@pytest.mark.parametrize(("name", "strength"), [("ddim", 0.6), ("euler", 0.5), ("dpmpp_2m", 0.75)])
def test_img2img_agrees_with_diffusers(pipe, reference, name, strength):
    """img2img: inkwash encodes the init image with the VAE (its posterior mean) and noises it to the strength's
    level; diffusers' img2img pipeline given those latents (a 4-channel image is taken as latents) and the same
    per-image generators gives the same images."""
    cls, config, sampler, schedule, options = TXT2IMG[name]
    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    got = _float_images(
        pipe, prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=10, schedule=schedule, num_images=2,
        seed=9, init_image=init, strength=strength, **options,
    )  # fmt: skip
    latents = pipe.encode(torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1)
    scheduler = getattr(diffusers, cls).from_config(reference.scheduler.config, **config)
    theirs = diffusers.StableDiffusionImg2ImgPipeline(**{**reference.components, "scheduler": scheduler})
    theirs.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = theirs(
            PROMPT, image=latents, negative_prompt=NEGATIVE, strength=strength, num_inference_steps=10,
            guidance_scale=7.5, num_images_per_prompt=2, generator=_generators(9, 2), output_type="np",
        ).images  # fmt: skip
    diff = _compare(got, expected)
    print(f"img2img {name}: max abs difference {diff:.2e}")
    assert diff < 1e-4


def test_per_sample_seeds_across_batch_sizes(pipe):
    common = {"prompt": PROMPT, "sampler": "euler_ancestral", "steps": 4, "num_images": 3, "seed": 7}
    one = _float_images(pipe, batch_size=1, **common)
    three = _float_images(pipe, batch_size=3, **common)
    assert np.abs(one - three).max() < 1e-5
    assert not np.allclose(three[0], three[1])
    assert np.array_equal(_float_images(pipe, batch_size=1, **{**common, "num_images": 1}), one[:1])


def test_prompts_and_guidance_change_the_images(pipe):
    common = {"sampler": "dpmpp_2m", "steps": 4, "num_images": 1, "seed": 1, "show_progress": False}
    base = pipe.generate(prompt=PROMPT, **common)
    assert not np.array_equal(base, pipe.generate(prompt="a red bicycle", **common))
    assert not np.array_equal(base, pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, **common))
    assert not np.array_equal(base, pipe.generate(prompt=PROMPT, guidance_scale=1.0, **common))
    assert np.array_equal(base, pipe.generate(prompt=PROMPT, guidance_scale=7.5, **common))  # the default


def test_sizes(pipe):
    assert pipe.image_shape == (3, 64, 64)
    images = pipe.generate(prompt=PROMPT, width=48, height=80, steps=2, num_images=1, show_progress=False)
    assert images.shape == (1, 80, 48, 3)
    with pytest.raises(InkwashError, match="--width must be a positive multiple of 8, got 50"):
        pipe.generate(prompt=PROMPT, width=50, steps=2, show_progress=False)
    # an init image sets the size when none is given (rounded down to a multiple of 8)
    init = np.full((70, 41, 3), 128, dtype=np.uint8)
    images = pipe.generate(prompt=PROMPT, init_image=init, strength=0.5, steps=4, num_images=1, show_progress=False)
    assert images.shape == (1, 64, 40, 3)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(pipe, sampler):
    images = pipe.generate(prompt=PROMPT, sampler=sampler, steps=3, num_images=2, show_progress=False)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_inpainting_keeps_the_unmasked_pixels(pipe):
    init = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:40, 20:52] = True
    images = pipe.generate(
        prompt=PROMPT, init_image=init, mask=mask, strength=0.8, steps=6, num_images=2, seed=2, show_progress=False
    )
    assert np.array_equal(images[:, ~mask], np.broadcast_to(init[~mask], images[:, ~mask].shape))
    assert np.abs(images[:, mask].astype(int) - init[mask]).mean() > 5  # generated where white


def test_class_options_are_refused(pipe):
    for given in ({"class_label": "3"}, {"negative_class": "1"}, {"grid_by_class": True}):
        with pytest.raises(InkwashError, match="a Stable Diffusion folder takes --prompt"):
            pipe.generate(prompt=PROMPT, show_progress=False, **given)


def test_prompt_on_a_class_model_is_refused(tmp_path):
    run = tmp_path / "run"
    inkwash.train(data="digits", out=str(run), steps=1, preset="tiny", batch_size=4, show_progress=False)
    with pytest.raises(InkwashError, match="--prompt needs a text-conditional model"):
        inkwash.load(run, device="cpu").generate(prompt="a three", num_images=1, steps=2, show_progress=False)


def test_reverse_trajectory_is_decoded(pipe):
    job = pipe.prepare(pipe.sample_options(prompt=PROMPT, steps=5, num_images=2, show_progress=False))
    result = pipe.run(job)
    assert result.images.shape == (2, 3, 64, 64)
    assert result.trajectory and all(x.shape == (2, 4, 8, 8) for _, x, _ in result.trajectory)  # latents
    decoded = pipe.decode_trajectory(result.trajectory)
    assert len(decoded) == len(result.trajectory) and all(x.shape == (1, 3, 64, 64) for _, x, _ in decoded)


def test_cli_sample(folder, tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--checkpoint", str(folder), "--out", str(out), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--width", "72", "--height", "56", "--steps", "3", "--num-images", "2",
            "--sampler", "Euler a"]  # fmt: skip
    assert main(args) == 0
    assert np.load(out / "samples.npz")["samples"].shape == (2, 56, 72, 3)
    summary = json.loads((out / "sampling.json").read_text())
    assert summary["guidance_scale"] == 7.5 and summary["options"]["prompt"] == PROMPT
    assert (out / "reverse.png").is_file() and (out / "grid.png").is_file()


def test_cli_bad_width(folder, tmp_path, capsys):
    args = ["sample", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), "--prompt", "x", "--width", "30"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "--width must be a positive multiple of 8" in err and len(err.strip().splitlines()) == 1


# ---- folders it refuses ----------------------------------------------------------------------------------


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_component(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    _edit(bad / "model_index.json", text_encoder=[None, None])
    with pytest.raises(InkwashError, match="names no text_encoder component"):
        inkwash.load(bad, device="cpu")
    shutil.rmtree(bad / "vae")
    _edit(bad / "model_index.json", text_encoder=["transformers", "CLIPTextModel"])
    with pytest.raises(InkwashError, match="missing the vae/ folder"):
        inkwash.load(bad, device="cpu")


def test_pickled_weights_only(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / "text_encoder" / "model.safetensors").rename(bad / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(InkwashError, match=r"only pickled \.bin weights"):
        inkwash.load(bad, device="cpu")


def test_config_that_does_not_match_its_weights(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    _edit(bad / "unet" / "config.json", block_out_channels=[16, 32])
    with pytest.raises(InkwashError, match="do its config and weights match"):
        inkwash.load(bad, device="cpu")


@pytest.mark.parametrize(
    ("component", "changes", "message"),
    [
        ("unet", {"in_channels": 9}, "inpainting UNets with 9 input channels are not supported"),
        ("unet", {"addition_embed_type": "text_time"}, "addition_embed_type"),
        ("unet", {"cross_attention_dim": 32}, "32-wide text embeddings"),
        ("unet", {"_class_name": "UNet2DModel"}, "only UNet2DConditionModel"),
        ("scheduler", {"prediction_type": "flow"}, "prediction_type='flow'"),
    ],
)
def test_unsupported_configs(folder, tmp_path, component, changes, message):
    bad = _copy(folder, tmp_path)
    if changes.get("_class_name"):
        _edit(bad / "model_index.json", unet=["diffusers", changes["_class_name"]])
    else:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        _edit(bad / component / name, **changes)
    with pytest.raises(InkwashError, match=message):
        inkwash.load(bad, device="cpu")


def test_cli_reports_a_bad_folder_in_one_line(folder, tmp_path, capsys):
    bad = _copy(folder, tmp_path)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o"), "--prompt", "x"]) != 0
    err = capsys.readouterr().err
    assert "missing the unet weights" in err and len(err.strip().splitlines()) == 1


def test_half_precision_weights(folder):
    half = inkwash.load(folder, device="cpu", precision="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    images = half.generate(prompt=PROMPT, steps=3, num_images=1, show_progress=False, precision="bf16")
    assert images.shape == (1, 64, 64, 3)


def test_eval_samples_a_stable_diffusion_folder(folder, tmp_path, capsys):
    reference = tmp_path / "reference.npz"
    np.savez(reference, images=np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8))
    report = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(folder), "--reference", str(reference), "--num-samples", "4", "--steps", "2",
            "--metrics", "swd", "--prompt", PROMPT, "--batch-size", "2", "--json", str(report)]  # fmt: skip
    assert main(args) == 0
    scores = json.loads(report.read_text())
    assert scores["counts"]["samples"] == 4 and scores["scores"]["swd"] > 0
    assert scores["settings"]["prompt"] == PROMPT
    capsys.readouterr()
    assert main([*args[:-2], "--metrics", "nll"]) != 0
    assert "nll metric needs a pixel-space model" in capsys.readouterr().err


@pytest.mark.parametrize(("picked", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_auto_precision_picks_the_weights_dtype(folder, monkeypatch, picked, dtype):
    """``--precision auto`` (what inkwash sample, eval and serve pass to the loader) holds a Stable Diffusion
    folder's weights in the dtype auto picks on the device (INKWASH_PRECISION stands in for the CPU's flags)."""
    monkeypatch.setenv("INKWASH_PRECISION", picked)
    loaded = inkwash.load(folder, device="cpu", precision="auto")
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    assert {p.dtype for p in loaded.vae.parameters()} == {dtype}
    assert loaded.config["weights_precision"] == picked


def test_fp16_variant_weights_load(folder, pipe, tmp_path):
    """A folder that ships only ``*.fp16.safetensors`` weights (the "fp16 variant" layout) loads them."""
    variant = _copy(folder, tmp_path)
    for component, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):  # fmt: skip
        (variant / component / f"{stem}.safetensors").rename(variant / component / f"{stem}.fp16.safetensors")
    loaded = inkwash.load(variant, device="cpu")
    common = {"prompt": PROMPT, "steps": 3, "num_images": 1, "seed": 4, "show_progress": False}
    assert np.array_equal(loaded.generate(**common), pipe.generate(**common))
