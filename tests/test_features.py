import json

import numpy as np
import pytest
import torch

from inkwash.data.loading import load_digits
from inkwash.errors import InkwashError
from inkwash.evaluation import features
from inkwash.evaluation.features import FEATURES, accuracy, digits_classifier, get_extractor, weights_hash
from inkwash.evaluation.reference import split_indices


def test_digits_classifier_reaches_95_percent_on_the_held_out_half(feature_cache):
    model, record = digits_classifier(feature_cache)
    data = load_digits(16)
    train, test = split_indices(len(data), data.labels)
    assert len(test) > 850 and not set(train) & set(test)
    held_out = accuracy(model, data.images[test], data.labels[test])
    assert held_out >= 0.95
    assert record["test_accuracy"] == pytest.approx(held_out)


def test_classifier_is_read_from_the_cache_without_training(feature_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(features, "train_digits_classifier", fail)
    model, record = digits_classifier(feature_cache)
    assert record["weights_sha256"] == weights_hash(model)
    saved = json.loads((feature_cache / "features" / "digits-classifier-v1.json").read_text())
    assert saved == record


def test_a_tampered_classifier_cache_is_not_used(feature_cache, tmp_path, monkeypatch):
    # Copy the cache, then damage the weights: the hash no longer matches and it is retrained.
    for name in ("digits-classifier-v1.safetensors", "digits-classifier-v1.json"):
        (tmp_path / "features").mkdir(exist_ok=True)
        (tmp_path / "features" / name).write_bytes((feature_cache / "features" / name).read_bytes())
    record_path = tmp_path / "features" / "digits-classifier-v1.json"
    record = json.loads(record_path.read_text())
    record["weights_sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    retrained = []

    def stand_in(show_progress=False):  # an untrained network, so the test need not train one
        retrained.append(1)
        return features.DigitsClassifier(), 0.0

    monkeypatch.setattr(features, "train_digits_classifier", stand_in)
    model, record = digits_classifier(tmp_path)
    assert retrained == [1]
    assert record["test_accuracy"] == 0.0 and record["weights_sha256"] == weights_hash(model)
    assert json.loads(record_path.read_text()) == record  # the damaged record was replaced


def test_digits_features_are_the_penultimate_layer(feature_cache):
    extractor = get_extractor("digits", feature_cache)
    images = load_digits(16).images[:20]
    out = extractor(images)
    assert out.shape == (20, 128) and out.dtype == np.float64
    assert extractor.identity.startswith("digits-classifier:")
    # Colour or a different size are converted: grayscale, resized to 16x16.
    rgb = extractor(images.expand(-1, 3, -1, -1))
    assert np.allclose(rgb, out, atol=1e-5)
    assert extractor(torch.nn.functional.interpolate(images, size=32, mode="nearest")).shape == (20, 128)


def test_random_features_are_fixed_by_their_seed():
    first, second = get_extractor("random"), get_extractor("random")
    assert first.identity == second.identity
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = first(images)
    assert out.shape == (6, 448)
    assert np.array_equal(out, second(images))
    assert not np.allclose(out[0], out[1])
    assert first(images[:, :1]).shape == (6, 448)  # grayscale works too


def test_unknown_features_are_an_error():
    assert set(FEATURES) == {"digits", "random", "inception"}  # inception: see test_inception.py
    with pytest.raises(InkwashError, match="unknown features"):
        get_extractor("vgg")
