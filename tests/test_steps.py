import pytest
import torch

from inkwash.core.schedule import NoiseSchedule
from inkwash.core.sigmas import STEP_SCHEDULES, build_sigmas, timesteps_for

SCHEDULE = NoiseSchedule()


@pytest.mark.parametrize("kind", STEP_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50, 999, 1000])
def test_descending_and_ending_in_zero(kind, steps):
    sigmas = build_sigmas(SCHEDULE, steps, kind)
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1].item() == 0.0
    assert torch.all(sigmas[:-1] > 0)
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_spacings_match_lin_et_al_table_2():
    assert timesteps_for(SCHEDULE, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps_for(SCHEDULE, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps_for(SCHEDULE, 10, "uniform").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # Trailing when the step count does not divide T.
    assert timesteps_for(SCHEDULE, 3, "trailing").tolist() == [999, 666, 332]


def test_full_schedule_uses_every_timestep():
    for kind in ("uniform", "leading", "trailing"):
        sigmas = build_sigmas(SCHEDULE, 1000, kind)
        assert torch.equal(sigmas[:-1], SCHEDULE.sigmas.flip(0))


def test_karras_endpoints_and_rho():
    sigmas = build_sigmas(SCHEDULE, 20, "karras", rho=7.0)
    assert sigmas[0].item() == pytest.approx(SCHEDULE.sigma_max)
    assert sigmas[-2].item() == pytest.approx(SCHEDULE.sigma_min)
    ramp = sigmas[:-1] ** (1 / 7.0)
    assert torch.allclose(ramp[1:] - ramp[:-1], (ramp[1] - ramp[0]).expand(19), rtol=1e-9)


def test_exponential_is_log_linear():
    log = build_sigmas(SCHEDULE, 12, "exponential")[:-1].log()
    assert torch.allclose(log[1:] - log[:-1], (log[1] - log[0]).expand(11), rtol=1e-9)


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match="steps"):
        build_sigmas(SCHEDULE, steps)


def test_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown step schedule"):
        build_sigmas(SCHEDULE, 10, "cosine")


def test_validate_sigmas():
    from inkwash.core.sigmas import validate_sigmas

    validate_sigmas(build_sigmas(SCHEDULE, 10, "karras"))
    for bad in ([3.0, 3.0, 0.0], [1.0, 2.0, 0.0], [float("inf"), 0.0], [1.0, -1.0], []):
        with pytest.raises(ValueError, match="sigmas"):
            validate_sigmas(torch.tensor(bad, dtype=torch.float64))
