"""The three-line Python API: ``inkwash.train``, ``inkwash.load`` and ``Pipeline.generate``, which gives the
pixels ``inkwash sample`` writes."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inkwash
from conftest import save_random_run
from inkwash.commands.cli import main
from inkwash.data.loading import to_uint8
from inkwash.errors import InkwashError
from inkwash.pipeline import read_init

NAMES = ["cat", "dog", "owl"]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return {"uncond": save_random_run(root / "uncond"), "cond": save_random_run(root / "cond", NAMES)}


@pytest.fixture(scope="module")
def init_and_mask(tmp_path_factory):
    """A 24x16 gradient picture (cropped to the model's square) and a 16x16 mask over its right half."""
    root = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.tile(np.linspace(0, 255, 24).astype(np.uint8), (16, 1))).save(root / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root / "init.png", root / "mask.png"


COMMON = {"num_images": 3, "batch_size": 2, "seed": 7}


@pytest.mark.parametrize(
    ("run", "flags", "options"),
    [
        ("uncond", ["--sampler", "dpmpp_2m", "--steps", "5"], {"sampler": "DPM++ 2M", "steps": 5}),
        (
            "uncond",
            ["--sampler", "Euler a", "--steps", "4", "--eta", "0.7"],
            {"sampler": "euler_ancestral", "steps": 4, "eta": 0.7},
        ),
        (
            "cond",
            ["--class", "dog", "--guidance-scale", "3", "--steps", "4"],
            {"class_label": "dog", "guidance_scale": 3.0, "steps": 4},
        ),
        (
            "cond",
            ["--grid-by-class", "--per-class", "2", "--guidance-scale", "2", "--sampler", "ddpm", "--steps", "3"],
            {"grid_by_class": True, "per_class": 2, "guidance_scale": 2.0, "sampler": "ddpm", "steps": 3},
        ),
        ("uncond", ["--init-image", "{init}", "--mask", "{mask}", "--strength", "0.6", "--steps", "6"], None),
    ],
    ids=["deterministic", "ancestral", "class-guidance", "grid-by-class", "img2img-mask"],
)
def test_generate_gives_the_pixels_that_inkwash_sample_writes(runs, init_and_mask, tmp_path, run, flags, options):
    init, mask = init_and_mask
    if options is None:
        options = {"init_image": str(init), "mask": str(mask), "strength": 0.6, "steps": 6}
    flags = [flag.format(init=init, mask=mask) for flag in flags]
    common = [f"--{name.replace('_', '-')}={value}" for name, value in COMMON.items()]
    assert main(["sample", "--checkpoint", str(runs[run]), "--out", str(tmp_path), *common, *flags]) == 0
    written = np.load(tmp_path / "samples.npz")["samples"]

    images = inkwash.load(runs[run]).generate(**COMMON, **options, show_progress=False)
    assert images.dtype == np.uint8 and images.shape == written.shape
    assert np.array_equal(images, written)
    assert np.unique(images).size > 2  # real pictures, not a constant


def test_init_and_mask_may_be_arrays_or_pil_images(runs, init_and_mask):
    init, mask = init_and_mask
    pipe = inkwash.load(runs["uncond"])
    settings = {"num_images": 2, "steps": 4, "strength": 0.7, "show_progress": False}
    from_files = pipe.generate(init_image=init, mask=str(mask), **settings)
    with Image.open(init) as picture, Image.open(mask) as drawn:
        from_pil = pipe.generate(init_image=picture, mask=drawn, **settings)
        from_arrays = pipe.generate(init_image=np.asarray(picture), mask=np.asarray(drawn) > 127, **settings)
    assert np.array_equal(from_pil, from_files) and np.array_equal(from_arrays, from_files)
    # The kept (left) half is the init picture's own pixels; the masked (right) half is generated.
    picture = to_uint8(read_init(init, 1, 16, show=False)[0])  # (1, 16, 16, 1)
    assert np.array_equal(from_files[:, :, :8], np.repeat(picture, 2, axis=0)[:, :, :8])
    assert not np.array_equal(from_files[:, :, 8:], np.repeat(picture, 2, axis=0)[:, :, 8:])
    # A batch (N, H, W, C), such as generate's own output, gives image i the init image i and seed i.
    first, second = from_files[0], from_files[1][::-1]
    batch = pipe.generate(init_image=np.stack([first, second]), **settings)
    assert np.array_equal(batch[0], pipe.generate(init_image=first, **settings)[0])
    assert np.array_equal(batch[1], pipe.generate(init_image=second, **settings)[1])


def test_the_pipeline_exposes_the_denoiser_schedule_config_and_classes(runs):
    pipe = inkwash.load(runs["cond"], device="cpu")
    assert pipe.class_names == NAMES and inkwash.load(runs["uncond"]).class_names == []
    assert isinstance(pipe.schedule, inkwash.NoiseSchedule) and isinstance(pipe.model, inkwash.UNet)
    assert pipe.config["unet"]["num_classes"] == 3 and pipe.image_shape == (1, 16, 16)
    x = torch.randn(2, 1, 16, 16) * 5.0
    sigma = torch.tensor([5.0, 5.0])
    with torch.no_grad():
        plain, dog = pipe.denoiser(x, sigma), pipe.denoiser(x, sigma, torch.tensor([1, 1]))
    assert plain.shape == x.shape and not torch.equal(plain, dog)  # D(x, sigma, cond) -> x0_hat
    assert "3 classes" in repr(pipe)


def test_generate_rejects_what_it_cannot_use(runs):
    pipe = inkwash.load(runs["cond"])
    with pytest.raises(TypeError, match=r"inkwash.load\(path, device=...\)"):
        pipe.generate(device="cpu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'out'"):
        pipe.generate(out="somewhere")
    with pytest.raises(TypeError, match="'colour'"):
        pipe.generate(colour="red")
    for options, fragment in [
        ({"sampler": "bogus"}, "unknown sampler 'bogus'"),
        ({"class_label": "emu"}, "unknown class 'emu'"),
        ({"guidance_scale": 2.0}, "--guidance-scale needs --class"),
        ({"mask": np.ones((16, 16), bool)}, "--mask needs --init-image"),
        ({"init_image": np.zeros((4, 4), np.float32)}, "must be uint8"),
        ({"schedule": "zigzag"}, "--schedule must be one of uniform,"),
        ({"guidance_scale": -1.0}, "--guidance-scale must be"),
        ({"strength": 1.5}, "--strength must be in [0, 1]"),
        ({"sampler": "ddpm", "eta": 0.5}, "--eta does not apply to the DDPM sampler"),
    ]:
        with pytest.raises(InkwashError, match=re.escape(fragment)):
            pipe.generate(num_images=1, steps=2, show_progress=False, **options)


def test_train_takes_keyword_arguments_or_a_train_config(monkeypatch):
    seen = []
    monkeypatch.setattr("inkwash.training.loop.train", lambda config, show_progress: seen.append(config))
    inkwash.train(data="digits", out="runs/x", steps=7)
    inkwash.train(inkwash.TrainConfig(out="runs/y", lr=5e-4), steps=9)
    assert (seen[0].out, seen[0].steps) == ("runs/x", 7)
    assert (seen[1].out, seen[1].lr, seen[1].steps) == ("runs/y", 5e-4, 9)
    with pytest.raises(TypeError, match="stepz"):
        inkwash.train(stepz=3)


def test_import_inkwash_stays_light():
    code = (
        "import sys, inkwash; assert inkwash.TrainConfig and inkwash.UNet and inkwash.NoiseSchedule; "
        "print(sorted(m for m in ('matplotlib', 'diffusers', 'inkwash.training.loop', 'inkwash.pipeline') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_readme_python_quick_start_runs(tmp_path, monkeypatch):
    """Every Python block of the README's "Quick start: Python", run in order in one namespace, in an empty
    folder. The training call keeps its own arguments but runs two steps of the tiny preset."""
    section = README.read_text(encoding="utf-8").split("## Quick start: Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks and blocks[0].startswith("import inkwash\n")
    code = "\n".join(blocks)
    for call in ("inkwash.train(", "inkwash.load(", ".generate("):
        assert call in code
    real_train = inkwash.train

    def quick_train(*args, **options):
        return real_train(*args, **{**options, "preset": "tiny", "batch_size": 8, "steps": 2}, show_progress=False)

    monkeypatch.setattr(inkwash, "train", quick_train)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    images = namespace["images"]
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (16, 16, 16, 1)
    assert any(tmp_path.rglob("model.safetensors"))  # the run folder was written where the snippet said


def test_compiled_sampling_matches_eager(runs):
    """``compile=True`` runs the network under torch.compile (on a CPU, a channels_last copy); the images agree
    with eager ones up to float rounding, and the eager path is untouched."""
    pipe = inkwash.load(runs["uncond"], device="cpu")
    options = {"sampler": "ddim", "steps": 6, "num_images": 2, "seed": 3, "show_progress": False}
    eager = pipe.generate(**options)
    compiled = pipe.generate(compile=True, **options)
    difference = np.abs(eager.astype(int) - compiled)
    assert difference.max() <= 2 and difference.mean() < 0.1
    assert pipe.compiled_denoiser() is pipe.compiled_denoiser()  # compiled once, then kept
    assert next(pipe.model.parameters()).is_contiguous()  # the pipeline's own network keeps its layout
    assert np.array_equal(pipe.generate(**options), eager)
