"""Evaluation: score generated images against a reference, each score beside its real-data floor.

``score_images`` runs the chosen metrics on a set of images, ``sample_images`` draws them from a model,
and ``periodic_eval`` is the hook for scoring a model during training (``report.py`` is ``inkwash
eval``). Scores are a flat ``dict[str, float]`` (``fid``, ``fid_floor``, ``kid``, ``kid_std``,
...): every score ``X`` that has a floor has ``X_floor``, the same metric between the reference's train
half (as many images as there are samples, when it has that many) and its test half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from inkwash.core.denoiser import ModelDenoiser, PlacedDenoiser
from inkwash.core.sigmas import build_sigmas
from inkwash.errors import InkwashError
from inkwash.evaluation.features import default_features, get_extractor
from inkwash.evaluation.likelihood import bits_per_dim
from inkwash.evaluation.metrics import frechet_distance_features, kernel_inception_distance, precision_recall
from inkwash.evaluation.reference import SPLIT_SEED, Reference, load_reference, reference_features
from inkwash.evaluation.swd import sliced_wasserstein_pyramid
from inkwash.sampling.generate import generate
from inkwash.sampling.options import (
    DEFAULT_STEPS,
    sampler_options,
)
from inkwash.sampling.samplers import get_sampler

METRICS = {
    "fid": "Fréchet distance between Gaussians fitted to the features (Heusel et al. 2017); lower is better",
    "kid": "kernel distance, unbiased MMD^2 with a cubic kernel (Bińkowski et al. 2018); lower is better",
    "pr": "improved precision (fidelity) and recall (coverage), k = 3 (Kynkäänniemi et al. 2019); higher is better",
    "swd": "sliced Wasserstein distance on Laplacian-pyramid patches x 1e3 (Karras et al. 2018); lower is better",
    "nll": "bits/dim from the variational bound on held-out images (Ho et al. 2020); needs a checkpoint",
}
DEFAULT_METRICS = ("fid", "kid", "pr", "swd")
FEATURE_METRICS = ("fid", "kid", "pr")


@dataclass
class MetricSettings:
    """How the metrics are computed (the defaults of the papers where they have one)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    features: str | None = None  # None: default_features(reference)
    inception_weights: str | None = None  # None: inception.weights_path()
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    nll_terms: int | None = 100  # None: all T - 1 KL terms
    seed: int = 0
    cache: str | None = None  # None: inkwash.data.cache.cache_root()

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise InkwashError(f"unknown metric(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")


def _subset(count: int, size: int) -> np.ndarray:
    """A fixed-seed choice of min(size, count) of ``count`` rows, so the floor does not depend on file order."""
    return np.sort(np.random.default_rng(SPLIT_SEED + 1).permutation(count)[: min(size, count)])


def score_images(
    images: torch.Tensor,
    reference: Reference,
    settings: MetricSettings | None = None,
    *,
    denoiser: ModelDenoiser | None = None,
    show_progress: bool = False,
) -> tuple[dict[str, float], dict[str, int]]:
    """Score images (N, C, H, W) in [-1, 1] against the reference's test half; returns (scores, counts).

    ``nll`` scores ``denoiser`` (a ModelDenoiser, which carries its schedule) on test-half images.
    """
    settings = settings or MetricSettings()
    settings.validate()
    metrics = settings.metrics
    if "nll" in metrics and denoiser is None:
        raise InkwashError("the nll metric needs a model: evaluate a --checkpoint, not --samples")
    if images.shape[0] < 2:
        raise InkwashError(f"evaluation needs at least 2 samples, got {images.shape[0]}")
    if tuple(images.shape[1:]) != tuple(reference.images.shape[1:]):
        raise InkwashError(
            f"samples are {tuple(images.shape[1:])} but the reference is {tuple(reference.images.shape[1:])}"
        )
    floor_rows = _subset(len(reference.train_index), images.shape[0])
    counts = {"samples": images.shape[0], "reference": len(reference.test_index), "floor": len(floor_rows)}
    scores: dict[str, float] = {}
    if any(m in metrics for m in FEATURE_METRICS):
        extractor = get_extractor(
            settings.features or default_features(reference.name),
            settings.cache,
            show_progress=show_progress,
            inception_weights=settings.inception_weights,
        )
        train, test = reference_features(reference, extractor.identity, extractor, settings.cache)
        pairs = {"": extractor(images), "_floor": train[floor_rows]}
        for suffix, fake in pairs.items():
            if "fid" in metrics:
                scores["fid" + suffix] = frechet_distance_features(test, fake)
            if "kid" in metrics:
                mean, std = kernel_inception_distance(
                    test, fake, settings.kid_subsets, settings.kid_subset_size, settings.seed
                )
                scores["kid" + suffix], scores["kid_std" + suffix] = mean, std
            if "pr" in metrics:
                if min(len(fake), len(test)) <= settings.pr_k:
                    raise InkwashError(f"precision and recall need more than k = {settings.pr_k} images in each set")
                scores["precision" + suffix], scores["recall" + suffix] = precision_recall(test, fake, settings.pr_k)
    if "swd" in metrics:
        real = reference.test
        for suffix, fake in {"": images, "_floor": reference.train[torch.from_numpy(floor_rows)]}.items():
            levels = sliced_wasserstein_pyramid(fake, real, seed=settings.seed)
            scores.update({key + suffix: value for key, value in levels.items()})
    if "nll" in metrics:
        held_out = reference.test[torch.from_numpy(_subset(len(reference.test_index), images.shape[0]))]
        counts["nll_images"] = held_out.shape[0]
        bpd = bits_per_dim(
            PlacedDenoiser(denoiser, network_device(denoiser)),  # fp32 on the network's device
            denoiser.schedule,
            held_out,
            num_terms=settings.nll_terms,
            seed=settings.seed,
            show_progress=show_progress,
        )
        scores["nll_bpd"] = float(bpd.mean())
    return scores, counts


def network_device(denoiser: ModelDenoiser) -> torch.device:
    """Where the denoiser's network lives (the CPU for a network without parameters)."""
    return next(denoiser.network.parameters(), torch.empty(0)).device


def sample_images(
    denoiser: ModelDenoiser,
    image_shape: Sequence[int],
    num_samples: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    schedule: str | None = None,  # None: the sampler's default_schedule, as inkwash sample
    eta: float | None = None,
    seed: int = 0,
    batch_size: int = 250,
    clip_denoised: bool = True,
    show_progress: bool = False,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    precision: str = "fp32",
) -> torch.Tensor:
    """``num_samples`` images (N, C, H, W) from a model denoiser, as ``inkwash sample`` draws them, on the
    network's device (``precision``: see ``sampling.generate``); the images come back on the CPU.

    ``labels`` (N,) condition a class-conditional model (see ``class_prior_labels``); with them,
    ``guidance_scale`` != 1 applies classifier-free guidance against the model's "no class" index.
    """
    info = get_sampler(sampler)
    num_classes = int(getattr(getattr(denoiser.network, "config", None), "num_classes", 0) or 0)
    if guidance_scale != 1.0 and (labels is None or num_classes == 0):
        raise InkwashError("--guidance-scale needs a class-conditional checkpoint (train with --class-cond)")
    steps = steps or DEFAULT_STEPS.get(info.id, 50)
    if steps > denoiser.schedule.num_steps:
        raise InkwashError(f"--steps must be at most {denoiser.schedule.num_steps}, got {steps}")
    sigmas = build_sigmas(denoiser.schedule, steps, schedule or info.default_schedule)
    result = generate(
        denoiser,
        tuple(image_shape),
        sigmas,
        sampler=info.id,
        num_images=num_samples,
        batch_size=batch_size,
        seed=seed,
        sampler_options=sampler_options(info.id, eta=eta),
        show_progress=show_progress,
        clip_denoised=clip_denoised,
        labels=labels,
        guidance_scale=guidance_scale,
        null_label=num_classes if labels is not None and num_classes > 0 else None,
        device=network_device(denoiser),
        precision=precision,
    )
    return result.images


def class_prior_labels(num_classes: int, counts: Sequence[int] | None, num_samples: int, seed: int = 0) -> torch.Tensor:
    """(N,) class labels in the proportions of the training set's class frequencies ``counts``
    (uniform when they are unknown), in a seeded random order: a class-conditional model then
    samples p(x) = sum_y p(y) p(x | y), the distribution an unconditional model is scored on.

    The labels are stratified, not drawn i.i.d.: class k gets N p_k images rounded by the largest
    remainder (ties to the lower index), so the sample's class proportions match the prior to
    within one image. An i.i.d. draw adds multinomial noise (about ±10% per class at N = 1000)
    that the real-data test split, cut per class, does not have, and FID counts it as error.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if counts is None or len(counts) != num_classes or min(counts) < 0 or sum(counts) <= 0:
        weights = torch.ones(num_classes, dtype=torch.float64)
    else:
        weights = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    quota = weights / weights.sum() * num_samples  # (K,)
    per_class = quota.floor().long()
    remainder = quota - per_class
    short = num_samples - int(per_class.sum())
    order = sorted(range(num_classes), key=lambda k: (-float(remainder[k]), k))  # largest remainder first
    per_class[order[:short]] += 1
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (N,) sorted by class
    generator = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(num_samples, generator=generator)]


def periodic_eval(
    model_denoiser: ModelDenoiser,
    image_shape: Sequence[int],
    reference: str | Reference,
    metrics: Sequence[str] = ("fid", "kid"),
    num_samples: int = 500,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 250,
    features: str | None = None,
    cache: str | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sample ``num_samples`` images from the model and score them; the trainer's ``--eval-every`` hook.
    ``labels`` (N,) condition a class-conditional model (see ``class_prior_labels``).

    ``reference`` is ``digits``, a folder, an .npz, or a loaded ``Reference`` (pass one to avoid
    reloading a folder each time; features are cached on disk either way). Returns the flat scores,
    e.g. ``{"fid": ..., "fid_floor": ..., "kid": ..., "kid_std": ..., ...}``; the keys depend only on
    ``metrics`` and the image size, so they can be CSV columns. The network is put in eval mode and
    restored to its previous mode afterwards.
    """
    settings = MetricSettings(metrics=tuple(metrics), features=features, seed=seed, cache=cache)
    settings.validate()
    if isinstance(reference, str):
        reference = load_reference(reference, tuple(image_shape))
    was_training = model_denoiser.training
    model_denoiser.eval()
    try:
        images = sample_images(
            model_denoiser,
            image_shape,
            num_samples,
            sampler=sampler,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            labels=labels,
        )
        scores, _ = score_images(images, reference, settings, denoiser=model_denoiser)
    finally:
        model_denoiser.train(was_training)
    return scores
