"""inkwash.load on a diffusers DDPMPipeline / DDIMPipeline folder: DDIM, Euler, Euler a, DPM++ 2M and UniPC
agreement with diffusers, the scheduler's sampling settings, every sampler, img2img and masks, the CLI, and
the folders it refuses."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import inkwash
from inkwash.commands.cli import main
from inkwash.core.denoiser import ModelDenoiser
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.sigmas import build_sigmas
from inkwash.errors import InkwashError
from inkwash.evaluation.diffusers_bridge import diffusers_noise, run_scheduler
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


class RoundedT(torch.nn.Module):
    """The folder's network given the timestep rounded to an integer, as DPMSolverMultistepScheduler gives it
    with Karras sigmas (tests/test_diffusers_agreement.py, test_dpmpp_karras_rounds_the_network_timestep)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x, t, cond=None):
        return self.network(x, torch.as_tensor(t).round(), cond)


DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# name: (diffusers scheduler, its config on top of the folder's, inkwash sampler and options, stochastic,
# inkwash's sigmas: a step schedule (the one tests/test_diffusers_agreement.py maps the folder's "leading" spacing
# to) or None for the scheduler's own sigmas (DPM-Solver's and UniPC's "leading" is T // (steps + 1) apart, not
# inkwash's T // steps), measured max abs difference of the final state (torch 2.13 CPU, diffusers 0.42.1), the
# largest |x| then, and of the [-1, 1] images.
AGREEMENT = {
    # 4.6e-5 of |x| 219; images 1.8e-5
    "euler": ("EulerDiscreteScheduler", {}, "euler", {}, False, "leading"),
    # 9.2e-5 of 252; 2.1e-5
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", {}, True, "leading"),
    # 7.6e-5 of 219; 1.3e-5
    "dpmpp_2m": ("DPMSolverMultistepScheduler", DPMPP_2M, "dpmpp_2m", {}, False, None),
    "dpmpp_2m karras": (  # 4.9e-4 of 570 with the rounded timestep, images 1.6e-5; 8.8e-2 without it
        "DPMSolverMultistepScheduler", {**DPMPP_2M, "use_karras_sigmas": True}, "dpmpp_2m", {}, False, None
    ),
    # 1.1e-4 of 219; 1.1e-5
    "unipc": ("UniPCMultistepScheduler", {}, "unipc", {"order": 2, "variant": "bh2"}, False, None),
}  # fmt: skip


def _agreement(folder, pipe, name, *, round_t=None):
    """(diffusers' final state, inkwash's, and inkwash's with the network's timestep left fractional) for
    AGREEMENT[name], 10 steps from the same initial noise. Euler a's noise: inkwash's sampler draws what the
    scheduler's step draws from the same generator (diffusers_noise, as in tests/test_diffusers_agreement.py)."""
    cls, extra, sampler, options, stochastic, spacing = AGREEMENT[name]
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched = getattr(diffusers, cls).from_config(config, **extra)
    steps, shape = 10, (2, 3, 16, 16)
    sched.set_timesteps(steps)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    unet = pipe.model.unet
    with torch.no_grad():
        step_kwargs = {"generator": torch.Generator().manual_seed(5)} if stochastic else {}
        expected = run_scheduler(sched, lambda x, t: unet(x, t).sample, noise * sched.init_noise_sigma, **step_kwargs)
    if spacing is None:
        sigmas = sched.sigmas.double()
    else:
        sigmas = build_sigmas(pipe.schedule, steps, spacing)
        # the same timesteps; diffusers' float32 alpha_bar near t = 0 is only good to 1e-4 relative
        # (test_schedule_tables_match_diffusers), and its sigmas with it
        torch.testing.assert_close(sigmas, sched.sigmas.double(), rtol=1e-4, atol=0)
    # inkwash's x at sigma_max is noise * sqrt(1 + sigma_max^2): diffusers' init_noise_sigma for Euler's
    # "leading" spacing, and 1 times the VP state for DPM-Solver and UniPC.
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    results = []
    for denoiser in (ModelDenoiser(RoundedT(pipe.model), pipe.schedule, "eps"), pipe.denoiser):
        kwargs = (
            {"noise": diffusers_noise(torch.Generator().manual_seed(5), shape, torch.float32)} if stochastic else {}
        )
        with torch.no_grad():
            results.append(SAMPLERS[sampler].fn(denoiser, x, sigmas, **kwargs, **options).float())
    return expected, *results


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_samplers_agree_with_diffusers(folder, pipe, name):
    """inkwash's sampler on the loaded folder equals diffusers' scheduler from the folder's config, to float32
    rounding relative to the largest entry (1e-5, as for DDIM above; measured 2e-7 to 9e-7). With Karras sigmas
    DPMSolverMultistepScheduler rounds the timestep it gives the network, so there inkwash's network is given
    the rounded timestep too; every other scheduler here gives integer timesteps, which inkwash's t(sigma) hits
    (to float32 rounding), so rounding changes nothing."""
    expected, rounded, plain = _agreement(folder, pipe, name)
    got = rounded if "karras" in name else plain
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    image_diff = (got.clamp(-1, 1) - expected.clamp(-1, 1)).abs().max().item()
    print(f"inkwash {name} vs diffusers: max abs diff {diff:.2e} with max |x| {scale:.3g}; images {image_diff:.2e}")
    assert scale > 0.1
    assert diff < 1e-5 * max(1.0, scale)
    assert image_diff < 1e-4
    if "karras" in name:  # the rounding is what it takes: the fractional timestep is far outside tolerance
        assert (plain - expected).abs().max().item() > 10 * 1e-5 * scale


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


@pytest.mark.parametrize("kind", ["StableDiffusionXLPipeline", "KandinskyPipeline", "StableDiffusionInpaintPipeline"])
def test_unknown_pipeline_class(folder, tmp_path, kind):
    bad = _copy(folder, tmp_path)
    _edit(bad / "model_index.json", _class_name=kind)
    with pytest.raises(InkwashError, match=f"{kind} folders are not supported yet"):
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
    _edit(bad / "model_index.json", _class_name="StableDiffusionXLPipeline")
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "StableDiffusionXLPipeline" in err and len(err.strip().splitlines()) == 1


# ---- the scheduler's sampling settings -------------------------------------------------------------------


def _folder_with(folder, tmp_path, **scheduler_fields):
    copy = _copy(folder, tmp_path)
    _edit(copy / "scheduler" / "scheduler_config.json", **scheduler_fields)
    return inkwash.load(copy, device="cpu")


def _job(pipe, **given):
    return pipe.prepare(pipe.sample_options(num_images=1, show_progress=False, **given))


@pytest.mark.parametrize(
    ("spacing", "schedule"), [("leading", "leading"), ("trailing", "trailing"), ("linspace", "uniform")]
)
def test_timestep_spacing_is_the_default_schedule(folder, tmp_path, spacing, schedule):
    pipe = _folder_with(folder, tmp_path, timestep_spacing=spacing)
    assert pipe.config["sampling"]["timestep_spacing"] == spacing
    for sampler in ("ddim", "dpmpp_2m", "euler"):  # every sampler's default, whatever its own
        job = _job(pipe, sampler=sampler, steps=7)
        assert job.schedule == schedule
        assert torch.equal(job.sigmas, build_sigmas(pipe.schedule, 7, schedule))
    assert _job(pipe, sampler="euler", steps=7, schedule="karras").schedule == "karras"  # given per call: it wins
    # inkwash sample without --schedule (SampleOptions.schedule None) gets it too
    options = inkwash.sampling.options.SampleOptions(checkpoint=str(folder), out="", steps=7, show_progress=False)
    assert pipe.prepare(options).schedule == schedule


def test_unknown_timestep_spacing(folder, tmp_path):
    with pytest.raises(InkwashError, match="timestep_spacing='sometimes'"):
        _folder_with(folder, tmp_path, timestep_spacing="sometimes")


@pytest.mark.parametrize(
    ("clip_sample", "clip_range", "clip_denoised"), [(False, 1.0, False), (True, 1.0, True), (True, 2.0, False)]
)
def test_clip_sample_is_the_default_clip_denoised(folder, tmp_path, clip_sample, clip_range, clip_denoised):
    pipe = _folder_with(folder, tmp_path, clip_sample=clip_sample, clip_sample_range=clip_range)
    assert pipe.config["sampling"]["clip_sample"] is clip_sample
    assert pipe.config["sampling"]["clip_sample_range"] == clip_range
    assert pipe.sample_options().clip_denoised is clip_denoised
    assert pipe.sample_options(clip_denoised=not clip_denoised).clip_denoised is (not clip_denoised)


def test_clip_sample_changes_the_images(folder, tmp_path):
    """The untrained network's x0 estimates leave [-1, 1], so the default clip shows in the pixels."""
    options = {"sampler": "ddim", "steps": 4, "num_images": 1, "seed": 0, "show_progress": False}
    clipped = _folder_with(folder, tmp_path / "a", clip_sample=True).generate(**options)
    plain = _folder_with(folder, tmp_path / "b", clip_sample=False).generate(**options)
    assert not np.array_equal(clipped, plain)
    assert np.array_equal(
        clipped, _folder_with(folder, tmp_path / "c", clip_sample=False).generate(clip_denoised=True, **options)
    )


def test_steps_offset_shifts_the_leading_timesteps(folder, tmp_path):
    """diffusers adds steps_offset to the "leading" timesteps only: 10 steps with offset 1 are 901, 801, ..., 1."""
    pipe = _folder_with(folder, tmp_path, steps_offset=1)
    assert pipe.config["sampling"]["steps_offset"] == 1
    sigmas = _job(pipe, sampler="ddim", steps=10).sigmas
    assert torch.equal(sigmas[:-1], pipe.schedule.sigmas[torch.arange(901, 0, -100)])
    scheduler = diffusers.DDIMScheduler(steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(901, 0, -100))
    for spacing in ("trailing", "uniform"):  # the other spacings ignore it, as diffusers' do
        assert torch.equal(_job(pipe, steps=10, schedule=spacing).sigmas, build_sigmas(pipe.schedule, 10, spacing))
    with pytest.raises(InkwashError, match="steps_offset"):
        _folder_with(folder, tmp_path / "bad", steps_offset=-1)


def test_set_alpha_to_one_false_ends_ddim_and_plms_at_sigma_min(folder, tmp_path):
    """Stable Diffusion's PNDM / DDIM settings: the last step of DDIM and PLMS lands on alpha_bar[0]; the other
    samplers still end at sigma 0. Without an offset the last timestep is 0 already and nothing changes."""
    pipe = _folder_with(folder, tmp_path, steps_offset=1, set_alpha_to_one=False)
    for sampler in ("ddim", "plms"):
        sigmas = _job(pipe, sampler=sampler, steps=10).sigmas
        assert float(sigmas[-1]) == float(pipe.schedule.sigmas[0]) and float(sigmas[-2]) > float(sigmas[-1])
    assert float(_job(pipe, sampler="euler", steps=10).sigmas[-1]) == 0.0
    plain = _folder_with(folder, tmp_path / "plain", set_alpha_to_one=False)
    assert float(_job(plain, sampler="ddim", steps=10).sigmas[-1]) == 0.0
    with pytest.raises(InkwashError, match="set_alpha_to_one"):
        _folder_with(folder, tmp_path / "bad", set_alpha_to_one="no")


def test_eval_samples_a_pixel_folder_with_nll(folder, tmp_path):
    reference = tmp_path / "reference.npz"
    np.savez(reference, images=np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    report = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(folder), "--reference", str(reference), "--num-samples", "4", "--steps", "2",
            "--metrics", "swd,nll", "--nll-terms", "2", "--json", str(report)]  # fmt: skip
    assert main(args) == 0
    scores = json.loads(report.read_text())
    assert scores["counts"]["samples"] == 4 and scores["scores"]["nll_bpd"] > 0


@pytest.mark.parametrize("where", ["inside", "scheduler_dir", "beside"])
def test_bare_unet_folder_with_a_scheduler_config(folder, pipe, tmp_path, where):
    """A folder written by UNet2DModel.save_pretrained, with the scheduler config in it or beside it, loads as
    the same model as the pipeline folder it came from."""
    bare = tmp_path / "model" / "unet"
    shutil.copytree(folder / "unet", bare)
    source = folder / "scheduler" / "scheduler_config.json"
    target = {"inside": bare / "scheduler_config.json", "scheduler_dir": bare / "scheduler" / "scheduler_config.json",
              "beside": tmp_path / "model" / "scheduler" / "scheduler_config.json"}[where]  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    loaded = inkwash.load(bare, device="cpu")
    assert loaded.config["pipeline"] == "UNet2DModel" and loaded.image_shape == pipe.image_shape
    options = {"sampler": "ddim", "steps": 4, "num_images": 2, "seed": 3, "show_progress": False}
    assert np.array_equal(loaded.generate(**options), pipe.generate(**options))


def test_bare_unet_folder_without_a_scheduler_config(folder, tmp_path):
    bare = tmp_path / "unet"
    shutil.copytree(folder / "unet", bare)
    with pytest.raises(InkwashError, match="a bare UNet2DModel folder needs a scheduler config"):
        inkwash.load(bare, device="cpu")


@pytest.mark.parametrize(
    "fields",
    [
        {"num_train_timesteps": 500},
        {"beta_start": 0.0005, "beta_end": 0.03},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ],
)
def test_scheduler_fields_give_diffusers_alpha_bar(folder, tmp_path, fields):
    """num_train_timesteps, beta_start / beta_end, beta_schedule and rescale_betas_zero_snr: the loaded schedule's
    alpha_bar is diffusers' alphas_cumprod for the same config."""
    loaded = _folder_with(folder, tmp_path, **fields)
    config = json.loads((tmp_path / "copy" / "scheduler" / "scheduler_config.json").read_text())
    theirs = diffusers.DDPMScheduler.from_config(config)
    assert loaded.schedule.num_steps == theirs.config.num_train_timesteps
    torch.testing.assert_close(loaded.schedule.alpha_bar, theirs.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    if fields.get("rescale_betas_zero_snr"):
        assert float(loaded.schedule.alpha_bar[-1]) == 0.0 and loaded.config["prediction"] == "v"
