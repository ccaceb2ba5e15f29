"""inkwash.load on a diffusers DDPMPipeline / DDIMPipeline folder: DDIM agreement with diffusers, every
sampler, img2img and masks, the CLI, and the folders it refuses."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import inkwash
from inkwash.commands.cli import main
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.sigmas import build_sigmas
from inkwash.errors import InkwashError
from inkwash.pipeline import Pipeline
from inkwash.sampling.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _unet(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def _save(folder, channels: int = 3, pipeline=None, **scheduler_config):
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False, **scheduler_config)
    pipe = (pipeline or diffusers.DDPMPipeline)(unet=_unet(channels), scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "pipe"
    _save(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    return inkwash.load(folder, device="cpu")


def test_loads_as_a_pipeline(pipe, folder):
    assert isinstance(pipe, Pipeline)
    assert pipe.image_shape == (3, 16, 16)
    assert pipe.class_names == []
    assert pipe.schedule.num_steps == 1000
    assert pipe.config["prediction"] == "eps"
    assert str(folder) in repr(pipe)


@pytest.mark.parametrize(
    ("pipeline", "channels", "prediction"),
    [
        ("DDIMPipeline", 3, "epsilon"),
        ("DDPMPipeline", 3, "epsilon"),
        ("DDIMPipeline", 1, "v_prediction"),
        ("DDIMPipeline", 3, "sample"),
    ],
)
def test_ddim_agrees_with_diffusers(tmp_path, pipeline, channels, prediction):
    saved = _save(tmp_path / "pipe", channels, getattr(diffusers, pipeline), prediction_type=prediction)
    pipe = inkwash.load(tmp_path / "pipe", device="cpu")
    steps, shape = 10, (2, channels, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    # diffusers' DDIM from the folder's scheduler config: leading spacing, steps_offset 0, set_alpha_to_one.
    ddim = diffusers.DDIMPipeline(
        unet=saved.unet, scheduler=diffusers.DDIMScheduler.from_config(saved.scheduler.config)
    )
    ddim.set_progress_bar_config(disable=True)
    assert ddim.scheduler.config.timestep_spacing == "leading" and ddim.scheduler.config.set_alpha_to_one
    ddim.scheduler.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in ddim.scheduler.timesteps:
            x = ddim.scheduler.step(ddim.unet(x, t).sample, t, x, eta=0.0).prev_sample
    sigmas = build_sigmas(pipe.schedule, steps, "leading")
    with torch.no_grad():
        got = SAMPLERS["ddim"].fn(pipe.denoiser, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, eta=0.0)
    # The untrained network's eps-prediction states are far from [-1, 1] (|x| ~ 200): compare relative to the
    # largest entry, and the images diffusers' pipeline returns in absolute terms. diffusers works in float32
    # (eps 4e-7, v 3e-7 relative; x0-prediction 4e-6, as its eps = (x_t - sqrt(a) x0) / sqrt(1 - a) near t = 0
    # scales float32 rounding up 100x).
    scale = x.abs().max().item()
    diff = (got - x).abs().max().item()
    images = ddim(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=steps, eta=0.0,
                  output_type="np").images  # fmt: skip
    expected = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    image_diff = (got.clamp(-1, 1) - expected).abs().max().item()
    print(f"inkwash ddim vs diffusers ({pipeline}, {prediction}): max abs diff {diff:.2e} with max |x| {scale:.3g};"
          f" [-1, 1] images {image_diff:.2e}")  # fmt: skip
    assert scale > 0.1  # a real comparison, not two zeros
    assert diff < 1e-5 * max(1.0, scale)
    assert image_diff < 1e-4


def test_beta_schedules_match_diffusers():
    for name, ours in (("linear", "linear"), ("scaled_linear", "scaled_linear"), ("squaredcos_cap_v2", "cosine"),
                       ("sigmoid", "sigmoid")):  # fmt: skip
        theirs = diffusers.DDPMScheduler(beta_schedule=name, beta_start=0.001, beta_end=0.03).betas
        mine = NoiseSchedule(ScheduleConfig(ours, 1000, 0.001, 0.03)).betas
        assert torch.allclose(mine.float(), theirs, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(pipe, sampler):
    images = pipe.generate(sampler=sampler, steps=4, num_images=2, seed=1, show_progress=False)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_per_sample_seeds_across_batch_sizes(pipe):
    common = {"sampler": "dpmpp_2m", "steps": 5, "num_images": 3, "seed": 7, "show_progress": False}
    one = pipe.generate(batch_size=1, **common).astype(int)
    three = pipe.generate(batch_size=3, **common).astype(int)
    assert np.abs(one - three).max() <= 1
    assert not np.array_equal(three[0], three[1])


def test_img2img_and_mask(pipe):
    init = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)
    mask[:, 8:] = True
    options = {"sampler": "euler", "steps": 6, "num_images": 2, "seed": 0, "show_progress": False}
    images = pipe.generate(init_image=init, strength=0.5, mask=mask, **options)
    assert images.shape == (2, 16, 16, 3)
    assert np.abs(images[:, :, :8].astype(int) - init[None, :, :8]).max() <= 2  # kept where the mask is black
    assert pipe.generate(init_image=init, strength=0.5, **options).shape == (2, 16, 16, 3)


def test_grayscale_v_prediction(tmp_path):
    _save(tmp_path / "pipe", channels=1, prediction_type="v_prediction")
    pipe = inkwash.load(tmp_path / "pipe", device="cpu")
    assert pipe.config["prediction"] == "v" and pipe.image_shape == (1, 16, 16)
    assert pipe.generate(sampler="unipc", steps=3, num_images=2, show_progress=False).shape == (2, 16, 16, 1)


def test_cli_sample(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(folder), "--out", str(out), "--steps", "3", "--num-images", "2"]) == 0
    assert (out / "000001.png").is_file() and (out / "grid.png").is_file()
    assert np.load(out / "samples.npz")["samples"].shape == (2, 16, 16, 3)


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_unet(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    shutil.rmtree(bad / "unet")
    with pytest.raises(InkwashError, match="unet"):
        inkwash.load(bad, device="cpu")


def test_bin_only_weights(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").rename(bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(InkwashError, match=r"\.bin"):
        inkwash.load(bad, device="cpu")


def test_stable_diffusion_folder(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    _edit(bad / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(InkwashError, match="StableDiffusionPipeline folders are not supported yet"):
        inkwash.load(bad, device="cpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [("beta_schedule", "exotic"), ("prediction_type", "flow"), ("trained_betas", [0.1, 0.2]), ("timestep_type", "x")],
)
def test_unsupported_scheduler_field(folder, tmp_path, field, value):
    bad = _copy(folder, tmp_path)
    _edit(bad / "scheduler" / "scheduler_config.json", **{field: value})
    with pytest.raises(InkwashError, match=field):
        inkwash.load(bad, device="cpu")


def test_cli_reports_bad_folder(folder, tmp_path, capsys):
    bad = _copy(folder, tmp_path)
    _edit(bad / "model_index.json", _class_name="StableDiffusionPipeline")
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) != 0
    assert "StableDiffusionPipeline" in capsys.readouterr().err
