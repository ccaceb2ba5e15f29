import pytest
import torch

from inkwash.core.rng import SampleRNG, sample_seeds
from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import build_sigmas
from inkwash.sampling.generate import generate


def test_per_sample_noise_does_not_depend_on_batch():
    together = SampleRNG(sample_seeds(7, 5))
    alone = [SampleRNG([seed]) for seed in sample_seeds(7, 5)]
    for _ in range(3):  # successive draws stay aligned too
        batch = together.randn((1, 4, 4))
        singles = torch.cat([rng.randn((1, 4, 4)) for rng in alone])
        assert torch.equal(batch, singles)
    assert sample_seeds(7, 3, start=2) == [9, 10, 11]


def test_different_seeds_give_different_noise():
    a, b = SampleRNG([1, 2]).randn((8,))
    assert not torch.equal(a, b)


def _generate(denoiser, sampler, batch_size, **kwargs):
    sigmas = build_sigmas(NoiseSchedule(), 6)
    return generate(
        denoiser,
        (1, 16, 16),
        sigmas,
        sampler=sampler,
        num_images=5,
        batch_size=batch_size,
        seed=42,
        show_progress=False,
        **kwargs,
    )


def test_images_do_not_depend_on_batch_size(tiny_denoiser):
    for sampler, options in (("ddpm", {}), ("ddim", {"eta": 0.5})):
        runs = [_generate(tiny_denoiser, sampler, bs, sampler_options=options) for bs in (1, 2, 5)]
        for other in runs[1:]:
            # Pixels within 1/255 on the 0..255 scale (2/255 in [-1, 1]).
            assert (runs[0].images - other.images).abs().max().item() <= 2 / 255
        assert runs[0].nfe == 6
        assert runs[0].images.std() > 0.01  # the images are not trivially constant


def test_seed_changes_images(tiny_denoiser):
    sigmas = build_sigmas(NoiseSchedule(), 4)
    a = generate(tiny_denoiser, (1, 16, 16), sigmas, num_images=2, seed=0, show_progress=False)
    b = generate(tiny_denoiser, (1, 16, 16), sigmas, num_images=2, seed=1, show_progress=False)
    assert not torch.allclose(a.images, b.images)


def test_trajectory_is_recorded(tiny_denoiser):
    result = _generate(tiny_denoiser, "ddim", 5, record=[0, 3, 5])
    assert [round(s, 6) for s, _, _ in result.trajectory] == [
        round(v, 6) for v in build_sigmas(NoiseSchedule(), 6)[[0, 3, 5]].tolist()
    ]
    assert result.trajectory[0][1].shape == (5, 1, 16, 16)


def _overshooting(x, sigma, cond=None):
    """A denoiser whose x0 estimates leave [-1, 1]: 1.6 tanh of the variance-preserving state shifted by
    one pixel, so that each pixel's estimate depends on another pixel's state."""
    return 1.6 * torch.tanh(x.roll(1, dims=-1) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt())


def test_clipping_ddim_keeps_the_networks_noise_as_diffusers_does():
    """generate(clip_denoised=True) with DDIM clips x0 in the sampler (clip_range) and steps along the
    unclipped estimate's noise; DDPM and the others get a clipping denoiser."""
    from inkwash.core.denoiser import ClampedDenoiser
    from inkwash.sampling.samplers import sample_ddim

    sigmas = build_sigmas(NoiseSchedule(), 6)
    clipped = _generate(_overshooting, "ddim", 5, clip_denoised=True, record=range(6))
    raw = _generate(_overshooting, "ddim", 5, record=range(6))
    rederived = _generate(ClampedDenoiser(_overshooting), "ddim", 5)
    assert max(d.abs().max().item() for _, _, d in raw.trajectory) > 1.5  # the clip acts
    assert max(d.abs().max().item() for _, _, d in clipped.trajectory) <= 1.0  # and is what is reported
    first = clipped.trajectory[0][1]
    direct = sample_ddim(_overshooting, first, sigmas, clip_range=1.0)
    torch.testing.assert_close(clipped.images, direct.clamp(-1, 1))
    assert (clipped.images - rederived.images).abs().max() > 1e-2  # the other convention differs
    ddpm = _generate(_overshooting, "ddpm", 5, clip_denoised=True)
    assert torch.equal(ddpm.images, _generate(ClampedDenoiser(_overshooting), "ddpm", 5).images)
    with pytest.raises(ValueError, match="clip_range"):
        sample_ddim(_overshooting, first, sigmas, clip_range=0.0)


def test_own_clip_flag_matches_the_samplers_that_take_clip_range():
    """The registry says which samplers clip x0 themselves; each such sampler takes ``clip_range`` and
    the flag is set for DDIM alone, so ``generate`` never passes the argument to one that lacks it."""
    import inspect

    from inkwash.sampling.samplers import SAMPLERS

    flagged = {sid for sid, info in SAMPLERS.items() if info.own_clip}
    assert flagged == {"ddim"}
    for sid in flagged:
        assert "clip_range" in inspect.signature(SAMPLERS[sid].fn).parameters


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_sampling_autocasts_the_network_and_stays_close(tiny_denoiser, precision):
    dtypes = []
    hook = tiny_denoiser.network.out_conv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    try:
        exact = _generate(tiny_denoiser, "ddim", 5)
        dtypes.clear()
        low = _generate(tiny_denoiser, "ddim", 5, precision=precision)
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float16}
    assert low.images.dtype == torch.float32 and low.nfe == exact.nfe
    # A random network amplifies rounding at a few saturated pixels; the bulk of the image agrees
    # (measured mean differences: 0.0013 bf16, 0.0002 fp16, on [-1, 1]).
    difference = (low.images - exact.images).abs()
    assert 0 < difference.mean() <= 0.01
    assert difference.median() <= 2 / 255
