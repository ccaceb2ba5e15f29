"""``inkwash export --diffusers``: a run written as a diffusers DDPMPipeline folder. The UNet2DModel's outputs, the
images DDPMPipeline (and DDIM on its scheduler config) samples from it, and the images inkwash samples from the
folder read back all equal inkwash's own for the same noise; what cannot be mapped exactly is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import inkwash
from inkwash.checkpoint import load_model, save_checkpoint
from inkwash.commands.cli import main
from inkwash.core.denoiser import ClampedDenoiser
from inkwash.core.schedule import NoiseSchedule, ScheduleConfig
from inkwash.core.sigmas import build_sigmas
from inkwash.core.unet import UNet, UNetConfig, preset
from inkwash.errors import InkwashError
from inkwash.evaluation.diffusers_bridge import diffusers_noise
from inkwash.interop.diffusers_folder import schedule_from_config
from inkwash.interop.export import export_diffusers, scheduler_config, weight_map
from inkwash.sampling.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

GRAY = UNetConfig(
    image_size=16,
    in_channels=1,
    base_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    head_channels=32,
)
# Three levels, two resblocks each, attention at full resolution, and heads narrower than the widths.
RGB = UNetConfig(
    image_size=16,
    in_channels=3,
    base_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16, 4),
    head_channels=16,
)


# Images (in [-1, 1], or [0, 1] from diffusers) agree to float32 precision scaled by sigma: an eps-prediction
# network's x0 = x - sigma * eps turns its ~3e-6 output differences into ~3e-4 at the first steps' sigma ~100.
IMAGE_TOLERANCE = 1e-3  # an eighth of a uint8 level


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter, the zero-initialised output convolutions included, so no tensor is trivially
    equal on both sides and every one reaches the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def save_run(path, config: UNetConfig, prediction: str = "eps", schedule: ScheduleConfig | None = None):
    """A run folder holding one checkpoint of a random ``config`` UNet, with EMA weights unlike the raw ones."""
    torch.manual_seed(0)
    model = _randomize(UNet(config), 1)
    ema = _randomize(UNet(config), 2)
    run_config = {
        "unet": config.to_dict(),
        "schedule": (schedule or ScheduleConfig()).to_dict(),
        "prediction": prediction,
        "data": {
            "source": "test",
            "shape": [config.in_channels, config.image_size, config.image_size],
            "num_images": 0,
            "class_names": [],
        },
        "step": 1,
    }
    save_checkpoint(path / "checkpoints" / "step_00000001", run_config, model, ema)
    return path


@pytest.fixture(scope="module", params=[("gray", "eps"), ("rgb", "v")], ids=["gray-eps", "rgb-v"])
def exported(request, tmp_path_factory):
    name, prediction = request.param
    root = tmp_path_factory.mktemp(f"export-{name}")
    run = save_run(root / "run", GRAY if name == "gray" else RGB, prediction)
    return run, export_diffusers(run, root / "ddpm")


def test_the_folder_is_a_ddpm_pipeline_in_safetensors(exported):
    _, out = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is True and scheduler["num_train_timesteps"] == 1000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_unet_outputs_match(exported):
    run, out = exported
    model, _, config = load_model(run)
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet", use_safetensors=True).eval()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, config["unet"]["in_channels"], 16, 16, generator=generator)
    t = torch.tensor([0.0, 17.5, 500.0, 999.0])
    with torch.no_grad():
        expected, got = model(x, t), unet(x, t).sample
    diff, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    print(f"UNet2DModel vs inkwash UNet ({config['prediction']}): max abs diff {diff:.2e} with max |out| {scale:.3g}")
    assert scale > 0.1
    assert diff < 1e-5 * max(1.0, scale)


def test_weight_map_uses_every_tensor_once():
    model = UNet(RGB)
    entries = weight_map(model)
    assert set(entries) == set(model.state_dict())
    targets = [target for names, _ in entries.values() for target in names]
    from inkwash.interop.export import diffusers_unet

    assert sorted(targets) == sorted(diffusers_unet(model).state_dict())


def test_a_network_trained_with_augmentation_labels_exports_exactly(tmp_path):
    """Sampling gives the augmentation embedding zeros and it has no bias, so it is left out of the export and
    the UNet2DModel still computes what inkwash does."""
    config = UNetConfig(**{**GRAY.to_dict(), "augment_dim": 6})
    run = save_run(tmp_path / "run", config)
    out = export_diffusers(run, tmp_path / "ddpm")
    model, _, _ = load_model(run)
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet", use_safetensors=True).eval()
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6)), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        expected, got = model(x, t), unet(x, t).sample
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


def _inkwash_ddpm(run, steps: int, seed: int, shape) -> torch.Tensor:
    """inkwash's DDPM (clipping its x0, as DDPMScheduler(clip_sample=True) does) on the draws DDPMPipeline makes
    from a generator seeded ``seed``: the initial noise, then one draw per step."""
    pipe = inkwash.load(run, device="cpu")
    sigmas = build_sigmas(pipe.schedule, steps, "leading")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator)
    with torch.no_grad():
        return SAMPLERS["ddpm"].fn(
            ClampedDenoiser(pipe.denoiser),
            noise * math.sqrt(1 + float(sigmas[0]) ** 2),
            sigmas,
            noise=diffusers_noise(generator, shape, torch.float32),
        )


def test_ddpm_pipeline_samples_what_inkwash_samples(exported):
    run, out = exported
    ddpm = diffusers.DDPMPipeline.from_pretrained(out, use_safetensors=True)
    ddpm.set_progress_bar_config(disable=True)
    channels = ddpm.unet.config.in_channels
    images = ddpm(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=10,
                  output_type="np").images  # fmt: skip
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).double()  # (B, C, H, W) in [0, 1]
    got = (_inkwash_ddpm(run, 10, 3, (2, channels, 16, 16)) / 2 + 0.5).clamp(0, 1)
    diff = (got - expected).abs().max().item()
    inside = ((expected > 0.01) & (expected < 0.99)).double().mean().item()
    print(
        f"DDPMPipeline vs inkwash ddpm, 10 steps: max abs diff {diff:.2e} in [0, 1] ({inside:.0%} of pixels unclipped)"
    )
    assert inside > 0.2  # a real comparison, not two saturated images
    assert diff < IMAGE_TOLERANCE


def test_ddim_on_the_exported_scheduler_matches_inkwash(exported):
    run, out = exported
    ddpm = diffusers.DDPMPipeline.from_pretrained(out, use_safetensors=True)
    ddim = diffusers.DDIMPipeline(unet=ddpm.unet, scheduler=diffusers.DDIMScheduler.from_config(ddpm.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    shape = (2, ddpm.unet.config.in_channels, 16, 16)
    # use_clipped_model_output: the noise re-derived from the clipped x0, i.e. inkwash's DDIM on a ClampedDenoiser.
    # The default pairing (clip x0 but keep the network's noise: inkwash's default DDIM, clip_range=1) agrees step
    # by step too, but with this random eps-network it doubles float32 rounding at every step (1e-6 after the
    # first, 0.09 after 20), which measures the network's conditioning, not the mapping.
    images = ddim(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=20, eta=0.0,
                  use_clipped_model_output=True, output_type="np").images  # fmt: skip
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).double()  # (B, C, H, W) in [0, 1]
    pipe = inkwash.load(run, device="cpu")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    sigmas = build_sigmas(pipe.schedule, 20, "leading")
    with torch.no_grad():
        x = SAMPLERS["ddim"].fn(ClampedDenoiser(pipe.denoiser), noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    diff = ((x / 2 + 0.5).clamp(0, 1) - expected).abs().max().item()
    print(f"DDIMPipeline on the exported scheduler config vs inkwash ddim, 20 steps: max abs diff {diff:.2e} in [0, 1]")
    assert diff < IMAGE_TOLERANCE


@pytest.mark.parametrize(("sampler", "options"), [("ddim", {}), ("DPM++ 2M", {"schedule": "karras"})])
def test_the_folder_reads_back_as_the_same_model(exported, sampler, options):
    run, out = exported
    kwargs = {"num_images": 2, "sampler": sampler, "steps": 8, "seed": 11, "show_progress": False, **options}
    original, again = inkwash.load(run, device="cpu"), inkwash.load(out, device="cpu")
    assert again.config["sampling"]["schedule"] == "leading" and again.config["sampling"]["clip_denoised"]
    floats = [pipe.run(pipe.prepare(pipe.sample_options(**kwargs))).images for pipe in (original, again)]
    diff = (floats[0] - floats[1]).abs().max().item()
    pixels = np.abs(original.generate(**kwargs).astype(int) - again.generate(**kwargs).astype(int))
    print(f"inkwash.load(OUT) vs inkwash.load(RUN), {sampler}: max abs diff {diff:.2e} in [-1, 1]; "
          f"{np.count_nonzero(pixels)} of {pixels.size} uint8 pixels differ, by at most {pixels.max()}")  # fmt: skip
    assert diff < IMAGE_TOLERANCE
    assert pixels.max() <= 1  # float32 rounding can cross a uint8 rounding boundary, and no more


def test_no_ema_exports_the_raw_weights(tmp_path):
    run = save_run(tmp_path / "run", GRAY)
    export_diffusers(run, tmp_path / "raw", use_ema=False)
    export_diffusers(run, tmp_path / "ema")
    model, _, _ = load_model(run, use_ema=False)
    raw = diffusers.UNet2DModel.from_pretrained(tmp_path / "raw" / "unet")
    ema = diffusers.UNet2DModel.from_pretrained(tmp_path / "ema" / "unet")
    assert torch.equal(raw.conv_in.weight, model.input_conv.weight)
    assert not torch.equal(ema.conv_in.weight, model.input_conv.weight)


@pytest.mark.parametrize(
    "schedule",
    [
        ScheduleConfig("linear"),
        ScheduleConfig("cosine"),
        ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012),
        ScheduleConfig("sigmoid", 500, 1e-4, 0.02),
        ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True),
    ],
    ids=["linear", "cosine", "scaled_linear", "sigmoid", "zero_terminal_snr"],
)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_every_schedule_and_prediction_maps_both_ways(schedule, prediction):
    config = scheduler_config(NoiseSchedule(schedule), prediction)
    scheduler = diffusers.DDPMScheduler(**config)
    assert torch.allclose(scheduler.alphas_cumprod.double(), NoiseSchedule(schedule).alpha_bar, rtol=1e-5, atol=1e-6)
    read_back, read_prediction = schedule_from_config(dict(scheduler.config), "test")
    assert read_back.config == schedule and read_prediction == prediction


def test_overwrite_replaces_an_earlier_export(tmp_path):
    run = save_run(tmp_path / "run", GRAY)
    out = export_diffusers(run, tmp_path / "ddpm")
    with pytest.raises(InkwashError, match="exists and is not empty; pass --overwrite"):
        export_diffusers(run, out)
    (out / "stale.txt").write_text("from before")
    export_diffusers(run, out, use_ema=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm", "run"]  # the old folder and the temporary gone


def _refusal(error: InkwashError, fragment: str) -> None:
    message = str(error)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (preset("tiny"), "GroupNorm layers use 16, 32 groups"),
        (preset("digits", patch_size=1, num_classes=10), "class-conditional (10 classes)"),
        (preset("digits", patch_size=1, channel_mult=(2, 2)), "channel_mult starts at 2"),
        (preset("digits", patch_size=1, out_channels=2), "2 output channels for 1 input channels"),
        (
            preset("digits", patch_size=1, base_channels=48, num_groups=16, attention_resolutions=(16,)),
            "attention layers have heads of",
        ),
        (preset("digits"), "patch size is 2"),
    ],
    ids=["tiny", "class-conditional", "channel-mult", "out-channels", "head-dims", "patch"],
)
def test_networks_diffusers_cannot_hold_are_refused(tmp_path, config, fragment):
    run = save_run(tmp_path / "run", config)
    with pytest.raises(InkwashError) as error:
        export_diffusers(run, tmp_path / "ddpm")
    _refusal(error.value, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written


def test_bad_outputs_and_checkpoints_are_refused(tmp_path):
    run = save_run(tmp_path / "run", GRAY)
    with pytest.raises(InkwashError) as error:
        export_diffusers(tmp_path / "missing", tmp_path / "out")
    _refusal(error.value, "checkpoint directory not found")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(InkwashError) as error:
        export_diffusers(run, tmp_path / "notes", overwrite=True)
    _refusal(error.value, "not a diffusers pipeline folder")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(InkwashError) as error:
        export_diffusers(run, run, overwrite=True)
    _refusal(error.value, "would replace the checkpoint it exports")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InkwashError) as error:
        export_diffusers(run, tmp_path / "file")
    _refusal(error.value, "must be a folder, got a file")
    (tmp_path / "empty").mkdir()
    assert export_diffusers(run, tmp_path / "empty").joinpath("model_index.json").is_file()


def test_cli_exports_and_refuses_in_one_line(tmp_path, capsys):
    run = save_run(tmp_path / "run", GRAY)
    tiny = save_run(tmp_path / "tiny", preset("tiny"))
    assert main(["export", "--checkpoint", str(run), "--diffusers", str(tmp_path / "ddpm"), "--no-ema"]) == 0
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    for args, fragment in [
        ([str(run), str(tmp_path / "ddpm")], "pass --overwrite"),
        ([str(tiny), str(tmp_path / "other")], "GroupNorm layers use"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "other")], "checkpoint directory not found"),
    ]:
        assert main(["export", "--checkpoint", args[0], "--diffusers", args[1]]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("inkwash export: error: ") and fragment in lines[0]
    assert main(["export", "--checkpoint", str(run), "--diffusers", str(tmp_path / "ddpm"), "--overwrite"]) == 0


def test_cli_end_to_end(tmp_path):
    run = save_run(tmp_path / "run", GRAY)
    command = [sys.executable, "-m", "inkwash", "export", "--checkpoint", str(run), "--diffusers", str(tmp_path / "d")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'd'}" in result.stdout
    missing = subprocess.run(command[:6], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--diffusers" in missing.stderr.strip().splitlines()[-1]
