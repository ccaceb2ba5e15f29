import json

import pytest
import torch
from safetensors import safe_open

from inkwash.data.loading import load_digits
from inkwash.errors import InkwashError
from inkwash.training.log import read_log
from inkwash.training.loop import EpochSampler, TrainConfig, diffusion_loss, train


def test_tiny_training_run_loss_falls(tmp_path):
    result = train(
        TrainConfig(
            out=str(tmp_path),
            preset="tiny",
            steps=60,
            batch_size=32,
            lr=2e-3,
            warmup_steps=5,
            log_every=5,
            checkpoint_every=1000,
        ),
        show_progress=False,
    )
    log = read_log(tmp_path / "log.csv")
    assert log["step"][-1] == 60
    first, last = log["loss"][0], sum(log["loss"][-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert result.steps == 60
    assert set(log) == {"step", "loss", "lr", "images_per_sec", "skipped"}
    assert log["skipped"][-1] == 0


def test_training_is_deterministic_under_a_seed(tmp_path):
    data = load_digits(16)
    results = []
    for name in ("a", "b"):
        train(
            TrainConfig(out=str(tmp_path / name), preset="tiny", steps=3, batch_size=4, checkpoint_every=1000),
            data=data,
            show_progress=False,
        )
        results.append((tmp_path / name / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes())
    assert results[0] == results[1]


def test_loss_is_eps_mse_at_uniform_t():
    from inkwash.core.schedule import NoiseSchedule

    class Perfect(torch.nn.Module):
        """Knows x0 = 0, so eps = x_t / sqrt(1 - alpha_bar_t): its loss is exactly zero."""

        def forward(self, x_t, t):
            alpha_bar = NoiseSchedule().alpha_bar[t.long()].float()
            return x_t / (1 - alpha_bar).sqrt().reshape(-1, 1, 1, 1)

    x0 = torch.zeros(16, 1, 4, 4)
    loss = diffusion_loss(Perfect(), NoiseSchedule(), x0, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), NoiseSchedule(), x0, torch.Generator().manual_seed(0))
    assert 0.7 < zero.item() < 1.3  # E[eps^2] = 1


def test_epoch_sampler_visits_every_item_once_per_epoch():
    sampler = EpochSampler(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([sampler.next() for _ in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))


def test_x0_and_v_targets():
    from inkwash.core.schedule import NoiseSchedule

    schedule = NoiseSchedule()
    x0 = torch.full((8, 1, 4, 4), 0.5)

    class KnowsX0(torch.nn.Module):
        def forward(self, x_t, t):
            return torch.full_like(x_t, 0.5)

    assert diffusion_loss(KnowsX0(), schedule, x0, torch.Generator().manual_seed(0), "x0").item() < 1e-12

    class KnowsV(torch.nn.Module):
        """v = (sqrt(alpha_bar) x_t - x0) / sqrt(1 - alpha_bar) when x0 is known."""

        def forward(self, x_t, t):
            alpha_bar = schedule.alpha_bar[t.long()].float().reshape(-1, 1, 1, 1)
            return (alpha_bar.sqrt() * x_t - 0.5) / (1 - alpha_bar).sqrt()

    assert diffusion_loss(KnowsV(), schedule, x0, torch.Generator().manual_seed(0), "v").item() < 1e-8


def test_zero_terminal_snr_needs_v_or_x0(tmp_path):
    import pytest

    from inkwash.errors import InkwashError

    with pytest.raises(InkwashError, match="zero-terminal-snr"):
        train(TrainConfig(out=str(tmp_path), preset="tiny", steps=1, zero_terminal_snr=True), show_progress=False)


def test_dropout_option_overrides_the_preset(tmp_path):
    import pytest

    from inkwash.checkpoint import read_config
    from inkwash.errors import InkwashError

    train(TrainConfig(out=str(tmp_path), preset="digits", steps=1, batch_size=2, dropout=0.0), show_progress=False)
    assert read_config(tmp_path)["unet"]["dropout"] == 0.0
    with pytest.raises(InkwashError, match="--dropout"):
        train(TrainConfig(out=str(tmp_path / "bad"), preset="tiny", steps=1, dropout=1.0), show_progress=False)


def test_width_and_patch_options_override_the_preset_and_load_back(tmp_path):
    from inkwash import load
    from inkwash.checkpoint import read_config

    train(
        TrainConfig(out=str(tmp_path), preset="tiny", steps=2, batch_size=2, base_channels=8, patch_size=2),
        show_progress=False,
    )
    unet = read_config(tmp_path)["unet"]
    assert (unet["base_channels"], unet["patch_size"]) == (8, 2)
    pipe = load(str(tmp_path))
    assert pipe.generate(num_images=1, steps=2, seed=0).shape == (1, 16, 16, 1)  # NHWC pixels
    with pytest.raises(InkwashError, match="patch size 3"):
        train(TrainConfig(out=str(tmp_path / "bad"), preset="tiny", steps=1, patch_size=3), show_progress=False)


def test_cosine_lr_decays_by_the_end_of_a_time_limited_run(tmp_path):
    # The demo trains for a time, not a step count: the cosine decay must follow the estimated last
    # step, not the nominal --steps (which a time-limited run never reaches).
    config = TrainConfig(
        out=str(tmp_path),
        preset="tiny",
        steps=1_000_000,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        lr_schedule="cosine",
        time_limit=4.0,
        log_every=1,
        checkpoint_every=1_000_000,
    )
    result = train(config, data=load_digits(16, "train"), show_progress=False)
    log = read_log(tmp_path / "log.csv")
    assert result.steps < 1_000_000
    assert max(log["lr"]) > 0.5 * config.lr
    assert log["lr"][-1] < 0.2 * config.lr, log["lr"][-5:]


def test_adam_betas_reach_the_optimizer_and_follow_the_run_on_resume(tmp_path):
    def saved_betas(step):
        path = tmp_path / "checkpoints" / f"step_{step:08d}" / "optimizer.safetensors"
        with safe_open(str(path), "pt") as handle:
            return [group["betas"] for group in json.loads(handle.metadata()["param_groups"])]

    def config(steps, beta2, **extra):
        return TrainConfig(
            out=str(tmp_path), preset="tiny", steps=steps, batch_size=4, checkpoint_every=1, adam_beta2=beta2, **extra
        )

    data = load_digits(16, "train")
    train(config(2, 0.99), data=data, show_progress=False)
    assert saved_betas(2) == [[0.9, 0.99]]
    # On resume the weights and moments come from the checkpoint, the settings from this run.
    train(config(3, 0.95, resume="latest"), data=data, show_progress=False)
    assert saved_betas(3) == [[0.9, 0.95]]
    with pytest.raises(InkwashError, match="--adam-beta1"):
        train(TrainConfig(out=str(tmp_path / "bad"), preset="tiny", steps=1, adam_beta1=1.0), show_progress=False)
