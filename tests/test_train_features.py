"""The trainer's options: learning-rate schedules, Min-SNR weighting, non-finite steps, bf16, class
conditioning with label dropout, and what it writes while it runs."""

import itertools
import json
import math

import pytest
import torch

from inkwash.checkpoint import load_model
from inkwash.core.schedule import NoiseSchedule
from inkwash.data.loading import ImageData, load_digits
from inkwash.errors import InkwashError
from inkwash.training.log import read_log
from inkwash.training.loop import TrainConfig, train
from inkwash.training.objectives import diffusion_loss, learning_rate, min_snr_weight


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)


def tiny(out, **overrides) -> TrainConfig:
    settings = dict(out=str(out), preset="tiny", steps=4, batch_size=8, checkpoint_every=1000, log_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def record_loss_calls(monkeypatch, keep=lambda model: None) -> list[dict]:
    """Every call of the trainer's ``diffusion_loss`` from now on, as its ``x0`` and keyword tensors (cloned)
    and ``keep(model)`` taken before the call."""
    import inkwash.training.trainer as trainer

    calls, original = [], trainer.diffusion_loss

    def spy(model, schedule, x0, *args, **options):
        copies = {key: value.clone() for key, value in options.items() if isinstance(value, torch.Tensor)}
        calls.append({"x0": x0.clone(), "kept": keep(model), **copies})
        return original(model, schedule, x0, *args, **options)

    monkeypatch.setattr(trainer, "diffusion_loss", spy)
    return calls


def test_learning_rate_schedules():
    kwargs = dict(peak=1.0, warmup_steps=10, total_steps=110)
    assert learning_rate(0, schedule="constant", **kwargs) == pytest.approx(0.1)
    assert learning_rate(9, schedule="cosine", **kwargs) == pytest.approx(1.0)
    assert learning_rate(50, schedule="constant", **kwargs) == 1.0
    assert learning_rate(10, schedule="cosine", **kwargs) == pytest.approx(1.0)
    assert learning_rate(60, schedule="cosine", **kwargs) == pytest.approx(0.5)
    assert learning_rate(110, schedule="cosine", **kwargs) == pytest.approx(0.0, abs=1e-12)
    values = [learning_rate(s, schedule="cosine", **kwargs) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_min_snr_weights_put_every_target_on_the_same_x0_scale():
    """Hang et al. 2023: the weighted loss in any parameterization is min(snr, gamma) times the x0 error."""
    schedule = NoiseSchedule()
    t = torch.tensor([10, 300, 999])
    alpha_bar = schedule.alpha_bar[t]
    snr = alpha_bar / (1 - alpha_bar)
    x0_error = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)  # denoised minus x0, per sample
    # With x_t fixed, eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), so an x0 error e is an eps error of
    # -sqrt(snr) e and a v error of -e / sqrt(1 - ab) (v = (sqrt(ab) x_t - x0) / sqrt(1 - ab)).
    errors = {"x0": x0_error, "eps": -snr.sqrt() * x0_error, "v": -x0_error / (1 - alpha_bar).sqrt()}
    for gamma in (0.5, 5.0):
        expected = snr.clamp(max=gamma) * x0_error**2
        for prediction, error in errors.items():
            weighted = min_snr_weight(snr, gamma, prediction) * error**2
            assert torch.allclose(weighted, expected, rtol=1e-10), (prediction, gamma)


def test_min_snr_changes_the_loss_only_through_the_weights():
    schedule = NoiseSchedule()
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = diffusion_loss(zero, schedule, x0, torch.Generator().manual_seed(1))
    huge_gamma = diffusion_loss(zero, schedule, x0, torch.Generator().manual_seed(1), min_snr_gamma=1e12)
    weighted = diffusion_loss(zero, schedule, x0, torch.Generator().manual_seed(1), min_snr_gamma=5.0)
    assert huge_gamma.item() == pytest.approx(plain.item(), rel=1e-6)  # weight min(snr, inf) / snr = 1
    assert weighted.item() < plain.item()  # low-noise steps (snr > 5) are down-weighted


def test_input_perturbation_noises_the_input_and_keeps_the_target():
    """DDPM-IP (Ning et al. 2023): x_t = sqrt(ab) x0 + sqrt(1 - ab) (eps + gamma xi), target eps."""
    schedule = NoiseSchedule()
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def spy(x, t):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    gamma = 0.3
    loss = diffusion_loss(spy, schedule, x0, torch.Generator().manual_seed(1), input_perturbation=gamma)
    replay = torch.Generator().manual_seed(1)  # the same draws in the same order: t, eps, xi
    t = torch.randint(0, schedule.num_steps, (16,), generator=replay)
    eps = torch.randn(x0.shape, generator=replay)
    xi = torch.randn(x0.shape, generator=replay)
    alpha_bar = schedule.alpha_bar[t].reshape(-1, 1, 1, 1)
    expected_input = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * (eps + gamma * xi)
    x_t, t_seen = seen[0]
    assert torch.equal(t_seen, t.float())
    assert torch.allclose(x_t, expected_input.float(), atol=1e-6)
    assert loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)  # the target is eps, not eps + gamma xi
    # gamma = 0 is the plain objective with the plain draws (runs without the option are unchanged)
    seen.clear()
    diffusion_loss(spy, schedule, x0, torch.Generator().manual_seed(1), input_perturbation=0.0)
    assert torch.allclose(seen[0][0], (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps).float(), atol=1e-6)


def test_input_perturbation_is_validated_and_recorded(tmp_path):
    with pytest.raises(InkwashError, match="--input-perturbation must be in"):
        train(tiny(tmp_path / "bad", input_perturbation=float("nan")), show_progress=False)
    train(tiny(tmp_path / "ip", steps=2, input_perturbation=0.1), show_progress=False)
    saved = json.loads((tmp_path / "ip" / "checkpoints" / "step_00000002" / "config.json").read_text())
    assert saved["train"]["input_perturbation"] == 0.1


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, digits):
    images = digits.images.clone()
    images[::2] = float("nan")  # half the images poison any batch they are in
    poisoned = ImageData(images, digits.labels, digits.class_names, "poisoned")
    result = train(tiny(tmp_path / "some", steps=8, batch_size=1, max_nonfinite=8), data=poisoned, show_progress=False)
    assert 0 < result.skipped_steps < 8
    model, _, _ = load_model(tmp_path / "some", use_ema=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = read_log(tmp_path / "some" / "log.csv")
    assert log["skipped"][-1] == result.skipped_steps

    all_bad = ImageData(torch.full_like(images, float("nan")), None, None, "nan")
    with pytest.raises(InkwashError, match="3 non-finite steps in a row"):
        train(tiny(tmp_path / "all", steps=10, max_nonfinite=3), data=all_bad, show_progress=False)


def test_a_bf16_training_step_is_finite_and_close_to_fp32(tmp_path, digits):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        result = train(tiny(out, steps=1, precision=precision, warmup_steps=0), data=digits, show_progress=False)
        runs[precision] = (result.first_loss, load_model(out, use_ema=False)[0])
    assert math.isfinite(runs["bf16"][0])
    # Same seed, so the same batch, timesteps and noise: only the arithmetic differs.
    assert runs["bf16"][0] == pytest.approx(runs["fp32"][0], rel=0.03)
    for a, b in zip(runs["fp32"][1].parameters(), runs["bf16"][1].parameters(), strict=True):
        assert torch.isfinite(b).all()
        # One AdamW step moves each weight by about lr = 1e-3; bf16 may flip the sign of tiny gradients.
        assert (a - b).abs().max().item() < 2.5e-3


def _scaler_state(run_dir):
    from inkwash.checkpoint import step_dirs
    from inkwash.training.resume import load_state

    return load_state(step_dirs(run_dir)[-1] / "state.safetensors").scaler


def test_fp16_trains_on_a_cpu_with_the_loss_scaler(tmp_path, digits):
    """CPU autocast to fp16 takes the same path as a GPU's: scaled loss, unscale, clip, scaler step."""
    from inkwash.training.trainer import make_scaler

    assert isinstance(make_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
    assert make_scaler("bf16", torch.device("cpu")) is None and make_scaler("fp32", torch.device("cpu")) is None
    result = train(tiny(tmp_path, steps=3, device="cpu", precision="fp16"), data=digits, show_progress=False)
    assert math.isfinite(result.final_loss) and result.skipped_steps == 0
    state = _scaler_state(tmp_path)
    assert state["scale"] == 2.0**16 and state["_growth_tracker"] == 3  # three good steps at the initial scale


def test_fp16_overflow_skips_the_step_and_backs_the_scale_off(tmp_path, digits, monkeypatch):
    """Start at a loss scale of 2^24, where the fp16 gradients overflow: each such step is skipped,
    the scale halves, and training goes on once the gradients fit."""
    import inkwash.training.trainer as trainer

    monkeypatch.setattr(
        trainer, "make_scaler", lambda precision, device: torch.amp.GradScaler(device.type, init_scale=2.0**24)
    )
    result = train(
        tiny(tmp_path, steps=12, device="cpu", precision="fp16", max_nonfinite=12), data=digits, show_progress=False
    )
    state = _scaler_state(tmp_path)
    assert 1 <= result.skipped_steps < 12
    assert state["scale"] == 2.0**24 * 0.5**result.skipped_steps  # one back-off per skipped step
    assert state["_growth_tracker"] == 12 - result.skipped_steps  # the good steps after the last overflow
    model, _, _ = load_model(tmp_path, use_ema=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert read_log(tmp_path / "log.csv")["skipped"][-1] == result.skipped_steps


def test_fp16_stops_after_max_nonfinite_steps_in_a_row(tmp_path, digits):
    all_bad = ImageData(torch.full_like(digits.images, float("nan")), None, None, "nan")
    with pytest.raises(InkwashError, match="2 non-finite steps in a row"):
        train(
            tiny(tmp_path, steps=10, device="cpu", precision="fp16", max_nonfinite=2), data=all_bad, show_progress=False
        )


def test_fp16_resume_restores_the_loss_scale_exactly(tmp_path, digits, monkeypatch):
    import inkwash.training.trainer as trainer

    monkeypatch.setattr(
        trainer, "make_scaler", lambda precision, device: torch.amp.GradScaler(device.type, init_scale=2.0**24)
    )
    settings = dict(device="cpu", precision="fp16", max_nonfinite=12, checkpoint_every=3)
    train(tiny(tmp_path / "straight", steps=10, **settings), data=digits, show_progress=False)
    train(tiny(tmp_path / "split", steps=3, **settings), data=digits, show_progress=False)
    train(tiny(tmp_path / "split", steps=10, resume="latest", **settings), data=digits, show_progress=False)
    assert _scaler_state(tmp_path / "split") == _scaler_state(tmp_path / "straight")
    straight, _, _ = load_model(tmp_path / "straight", use_ema=False)
    split, _, _ = load_model(tmp_path / "split", use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), split.parameters(), strict=True))


def test_label_dropout_feeds_the_null_class_at_the_requested_rate(tmp_path, digits, monkeypatch):
    calls = record_loss_calls(monkeypatch)
    train(tiny(tmp_path, steps=20, batch_size=50, class_cond=True, cond_drop=0.3), data=digits, show_progress=False)
    labels = torch.cat([call["labels"] for call in calls])
    null = (labels == 10).float().mean().item()
    assert 0.24 < null < 0.36  # 1000 draws at p = 0.3: 4 standard deviations is 0.058
    assert set(labels[labels != 10].tolist()) == set(range(10))


def test_class_conditional_run_keeps_class_names_and_writes_grids(tmp_path, digits):
    out = tmp_path / "run"
    train(tiny(out, steps=2, class_cond=True, sample_every=2), data=digits, show_progress=False)
    model, _, config = load_model(out)
    assert model.config.num_classes == 10
    assert config["data"]["class_names"] == [str(d) for d in range(10)]
    from PIL import Image

    grid = Image.open(out / "samples" / "step_00000002.png")
    assert (out / "samples" / "latest.png").is_file()
    assert grid.height > grid.width  # one row of 8 per class: 10 rows


def test_class_cond_needs_labels(tmp_path, digits):
    unlabeled = ImageData(digits.images, None, None, "folder")
    with pytest.raises(InkwashError, match="--class-cond needs labelled data"):
        train(tiny(tmp_path, class_cond=True), data=unlabeled, show_progress=False)


def test_tensorboard_logs_scalars(tmp_path, digits):
    pytest.importorskip("tensorboard")
    train(tiny(tmp_path, steps=2, tensorboard=True), data=digits, show_progress=False)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_every_logs_scores_and_plots_them(tmp_path, digits, feature_cache, monkeypatch):
    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    config = tiny(tmp_path, steps=2, eval_every=2, eval_metrics="swd", eval_samples=16, log_every=1)
    train(config, data=digits, show_progress=False)
    log = read_log(tmp_path / "log.csv")
    assert math.isnan(log["swd"][0]) and log["swd"][1] > 0 and log["swd_floor"][1] > 0
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_eval_every_scores_a_class_conditional_model_on_labels_from_the_class_prior(
    tmp_path, digits, feature_cache, monkeypatch
):
    import inkwash.evaluation.evaluate as evaluate_module
    from inkwash.evaluation.evaluate import class_prior_labels

    monkeypatch.setenv("INKWASH_CACHE", str(feature_cache))
    seen = []
    real = evaluate_module.periodic_eval

    def spy(*args, **kwargs):
        seen.append(kwargs["labels"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "periodic_eval", spy)
    config = tiny(tmp_path, steps=2, eval_every=2, eval_metrics="swd", eval_samples=16, class_cond=True, seed=4)
    train(config, data=digits, show_progress=False)
    counts = torch.bincount(digits.labels, minlength=10).tolist()
    assert len(seen) == 1 and torch.equal(seen[0], class_prior_labels(10, counts, 16, seed=4))


def test_channels_last_trains_like_the_default_layout(tmp_path, digits):
    losses = {}
    for name, channels_last in (("default", False), ("channels_last", True)):
        result = train(tiny(tmp_path / name, steps=2, channels_last=channels_last), data=digits, show_progress=False)
        losses[name] = result.final_loss
    assert losses["channels_last"] == pytest.approx(losses["default"], rel=1e-3)


def test_grad_accum_draws_micro_batches_per_optimizer_step(tmp_path, digits, monkeypatch):
    """--grad-accum 2 with --batch-size 4: two micro-batches of 4 per optimizer step, and the logged
    images/s counts all eight."""
    import inkwash.training.trainer as trainer

    draws = []
    original = trainer.diffusion_loss

    def record(model, schedule, x0, generator, prediction, **kwargs):
        draws.append(x0.shape[0])
        return original(model, schedule, x0, generator, prediction, **kwargs)

    monkeypatch.setattr(trainer, "diffusion_loss", record)
    result = train(tiny(tmp_path, steps=3, batch_size=4, grad_accum=2), data=digits, show_progress=False)
    assert draws == [4] * 6 and result.steps == 3
    assert result.images_per_sec == pytest.approx(3 * 8 / result.seconds, rel=1e-6)


def test_two_micro_batches_of_4_give_the_gradient_of_one_batch_of_8(tmp_path, digits, monkeypatch):
    """The same eight images with the same (t, noise) each: the accumulated gradient that reaches the
    optimizer must equal the one-batch gradient. Without the division by --grad-accum it is twice as large."""
    import inkwash.training.trainer as trainer

    original_loss, original_clip = trainer.diffusion_loss, torch.nn.utils.clip_grad_norm_

    def per_image_noise(model, schedule, x0, generator, prediction, **kwargs):
        # Each image draws its t and noise from a generator seeded by its own pixels, so the draws do
        # not depend on how the batch is split.
        losses = []
        for image in x0:
            seed = int(image.double().abs().sum().item() * 1e4)
            losses.append(original_loss(model, schedule, image[None], torch.Generator().manual_seed(seed), prediction))
        return torch.stack(losses).mean()

    gradients = {}

    def record(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        gradients[run] = [p.grad.detach().clone() for p in parameters]
        return original_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(trainer, "diffusion_loss", per_image_noise)
    monkeypatch.setattr(trainer.nn.utils, "clip_grad_norm_", record)
    for run, (batch_size, grad_accum) in {"one": (8, 1), "two": (4, 2)}.items():
        config = tiny(tmp_path / run, steps=1, batch_size=batch_size, grad_accum=grad_accum, dropout=0.0, device="cpu")
        train(config, data=digits, show_progress=False)
    one, two = gradients["one"], gradients["two"]
    assert len(one) == len(two) and any(g.abs().max() > 0 for g in one)
    for a, b in zip(one, two, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


def test_augmentation_trains_the_network_on_augmented_images_with_their_labels(tmp_path, digits, monkeypatch):
    """``--augment P``: the loss sees augmented images with matching labels, the network gets an augmentation
    embedding that trains, and P is validated and recorded."""
    calls = record_loss_calls(monkeypatch, keep=lambda model: model.augment_emb.weight.detach().clone())
    with pytest.raises(InkwashError, match="--augment must be in"):
        train(tiny(tmp_path / "bad", augment=1.5), data=digits, show_progress=False)
    out = tmp_path / "run"
    train(tiny(out, steps=3, batch_size=32, augment=0.5, warmup_steps=0), data=digits, show_progress=False)
    labels = torch.cat([call["augment_labels"] for call in calls])
    assert labels.shape == (96, 6)
    assert 0.25 < (labels[:, 0] == 1).float().mean() < 0.75  # x-flips at p = 0.5, 96 draws
    unaugmented = ~labels.any(dim=1)
    assert 0 < unaugmented.sum() < 96
    originals = digits.images.flatten(1)
    for call in calls:  # an image with all-zero labels is a training image, untouched
        for image, label in zip(call["x0"], call["augment_labels"], strict=True):
            if not label.any():
                assert (originals == image.flatten()).all(dim=1).any()
    model, _, config = load_model(out, use_ema=False)
    assert config["unet"]["augment_dim"] == 6 and config["train"]["augment"] == 0.5
    assert not torch.equal(model.augment_emb.weight, calls[0]["kept"])  # the embedding trained


def test_augment_transforms_picks_the_transforms_and_is_validated(tmp_path, digits, monkeypatch):
    calls = record_loss_calls(monkeypatch)
    with pytest.raises(InkwashError, match="--augment-transforms must name some of xflip, yflip, rotate, shift"):
        train(tiny(tmp_path / "bad", augment=0.5, augment_transforms="shift,zoom"), data=digits, show_progress=False)
    train(
        tiny(tmp_path / "run", steps=2, batch_size=32, augment=0.9, augment_transforms="shift"),
        data=digits,
        show_progress=False,
    )
    labels = torch.cat([call["augment_labels"] for call in calls])
    assert not labels[:, :4].any() and labels[:, 4:].any()
