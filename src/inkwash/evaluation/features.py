"""Feature extractors for FID, KID and precision / recall: a registry of networks that map images to vectors.

* ``digits``: a small CNN classifier trained on the train half of the bundled digits (the test half
  is held out, and its accuracy is checked); the features are its penultimate layer, as Inception's
  pool layer is for FID. Trained once, in seconds, and cached as safetensors + JSON under the cache
  directory, so it works offline everywhere.
* ``random``: a convolutional network with fixed-seed random weights, for references without labels
  (folders). Features of randomly initialised networks still separate image distributions (Naeem et
  al. 2020, "Reliable fidelity and diversity metrics for generative models"; Lee et al. 2022,
  "Demystifying randomly initialized networks for evaluating generative models"); its scores are only
  comparable with themselves.
* ``inception``: the 2048-d pool3 features of the FID Inception-v3 (``inception.py``, pytorch-fid's
  network and preprocessing), for comparison with papers. inkwash downloads nothing: the weights are
  read from a local safetensors file converted once from pytorch-fid's .pth (see ``inception.py``).

Each extractor has an ``identity`` (its name and a hash of its weights) that keys the reference cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from inkwash.checkpoint import load_tensors
from inkwash.data.cache import cache_root
from inkwash.data.loading import split_indices
from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes, atomic_write_text

FEATURES = {
    "digits": "penultimate layer of a CNN classifier trained on the digits' train half (1x16x16 input)",
    "random": "a fixed-seed random-weight CNN, for any images (scores comparable only with themselves)",
    "inception": "FID Inception-v3 pool3 features (pytorch-fid's network; needs its weights, converted)",
}
CLASSIFIER_VERSION = 1  # bump when the recipe below changes; old cached weights are then ignored
CLASSIFIER_RECIPE = {"width": 16, "features": 128, "epochs": 2, "batch_size": 64, "lr": 2e-3, "seed": 0}


class DigitsClassifier(nn.Module):
    """Two conv stages (16 -> 8 -> 4 pixels) and a hidden layer whose activations are the features."""

    def __init__(self, width: int = 16, features: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, width, 8, 8)
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2 width, 4, 4)
            nn.Flatten(),
            nn.Linear(2 * width * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, num_classes))
        # Set after training so the features have unit mean square on the training digits, which keeps
        # KID's kernel (x . y / d + 1)^3 at the scale it has on Inception features.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class RandomFeatures(nn.Module):
    """Three random conv stages; features are each stage's spatial mean and std, concatenated (448)."""

    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        channels = 3
        for width in widths:
            conv = nn.Conv2d(channels, width, 3, padding=1)
            with torch.no_grad():
                # He initialisation keeps the activations' scale through the ReLUs.
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / (channels * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
            channels = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # (B, 3, H, W)
        out = []
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x if index == 0 else F.avg_pool2d(x, 2, ceil_mode=True)))
            out += [x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)]
        return torch.cat(out, dim=1)


@dataclass
class FeatureExtractor:
    """Maps images (N, C, H, W) in [-1, 1] to features (N, F) float64 with a network's ``features``."""

    name: str
    identity: str  # name and weights hash: keys the reference cache
    network: nn.Module
    input_size: int | None = None  # resized to this side (and made grayscale) first, when set
    batch_size: int = 500

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is None:
            return images
        images = images.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.shape[0] == 0:
            raise ValueError("no images to extract features from")
        self.network.eval()
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                batch = self._prepare(images[start : start + self.batch_size].float())
                out.append(self.network.features(batch).double())
        return torch.cat(out).numpy()


def weights_hash(network: nn.Module) -> str:
    """sha256 of the network's tensors in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _shifted(images: torch.Tensor) -> torch.Tensor:
    """The images and their eight one-pixel shifts (background -1 fills the border), (9 N, C, H, W)."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    return torch.cat([padded[..., dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)])


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).double().mean())


def train_digits_classifier(show_progress: bool = False) -> tuple[DigitsClassifier, float]:
    """Train the classifier on the digits' train half; returns it and its test-half accuracy.

    Adam on cross-entropy, with every one-pixel shift of each training digit as augmentation.
    Deterministic for a given PyTorch build: the global RNG is forked and seeded.
    """
    from inkwash.data.loading import load_digits
    from inkwash.progress import progress

    recipe = CLASSIFIER_RECIPE
    data = load_digits(16)
    train_index, test_index = split_indices(len(data), data.labels)
    train_images, train_labels = _shifted(data.images[train_index]), data.labels[train_index].repeat(9)
    with torch.random.fork_rng():
        torch.manual_seed(recipe["seed"])
        model = DigitsClassifier(recipe["width"], recipe["features"])
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
        steps_per_epoch = math.ceil(len(train_labels) / recipe["batch_size"])
        total = recipe["epochs"] * steps_per_epoch
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=total)
        model.train()
        bar = progress(
            total=total, desc="training the digits feature classifier", unit="step", disable=not show_progress
        )
        for _ in range(recipe["epochs"]):
            for batch in torch.randperm(len(train_labels)).split(recipe["batch_size"]):
                loss = F.cross_entropy(model(train_images[batch]), train_labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
        bar.close()
    model.eval()
    with torch.no_grad():
        model.feature_scale.copy_(model.body(data.images[train_index]).square().mean().rsqrt())
    return model, accuracy(model, data.images[test_index], data.labels[test_index])


def digits_classifier(
    directory: str | Path | None = None, show_progress: bool = False
) -> tuple[DigitsClassifier, dict]:
    """The cached digits classifier and its record (test accuracy, recipe), trained on first use."""
    folder = Path(directory or cache_root()) / "features"
    stem = f"digits-classifier-v{CLASSIFIER_VERSION}"
    weights_path, record_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    model = DigitsClassifier(CLASSIFIER_RECIPE["width"], CLASSIFIER_RECIPE["features"])
    if weights_path.is_file() and record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            model.load_state_dict(load_tensors(weights_path))
            if record.get("recipe") == CLASSIFIER_RECIPE and record.get("weights_sha256") == weights_hash(model):
                return model.eval(), record
        except (InkwashError, json.JSONDecodeError, RuntimeError, UnicodeDecodeError):
            pass  # unreadable or stale: retrain and overwrite below
    model, test_accuracy = train_digits_classifier(show_progress)
    record = {"test_accuracy": test_accuracy, "recipe": CLASSIFIER_RECIPE, "weights_sha256": weights_hash(model)}
    atomic_write_bytes(weights_path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return model, record


def get_extractor(
    name: str,
    directory: str | Path | None = None,
    show_progress: bool = False,
    inception_weights: str | Path | None = None,
) -> FeatureExtractor:
    """The named feature extractor (see FEATURES); ``directory`` overrides the cache directory and
    ``inception_weights`` the safetensors file of ``inception`` (see ``inception.weights_path``)."""
    if name == "digits":
        model, record = digits_classifier(directory, show_progress)
        return FeatureExtractor("digits", f"digits-classifier:{record['weights_sha256']}", model, input_size=16)
    if name == "random":
        network = RandomFeatures()
        return FeatureExtractor("random", f"random-conv:{weights_hash(network)}", network)
    if name == "inception":
        from inkwash.evaluation.inception import load_inception

        network = load_inception(inception_weights)
        identity = f"inception-fid:{weights_hash(network)}"
        if torch.cuda.is_available():
            network = network.cuda()  # features() moves each batch to the network and back
        return FeatureExtractor("inception", identity, network, batch_size=100)
    raise InkwashError(f"unknown features {name!r}; choose from {', '.join(FEATURES)}")


def default_features(reference: str) -> str:
    """``digits`` for the digits reference, ``random`` for anything else."""
    return "digits" if reference == "digits" else "random"
