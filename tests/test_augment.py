import math

import numpy as np
import pytest
import torch

from inkwash.core.unet import UNet, preset
from inkwash.data.augment import AUGMENT_DIM, _shift, augment


def one_bright_pixel(batch: int, row: int, col: int, size: int = 16) -> torch.Tensor:
    images = torch.full((batch, 1, size, size), -1.0)
    images[:, :, row, col] = 1.0
    return images


def where_it_goes(row: int, col: int, label: torch.Tensor, size: int) -> tuple[int, int]:
    """The pixel (row, col) after the transform a label describes, worked out by hand: flips mirror an index,
    a counter-clockwise quarter turn takes (r, c) to (size - 1 - c, r), a shift adds pixels."""
    last = size - 1
    if label[0] == 1:
        col = last - col
    if label[1] == 1:
        row = last - row
    turns = round(math.atan2(float(label[3]), float(label[2]) + 1.0) / (math.pi / 2)) % 4
    for _ in range(turns):
        row, col = last - col, row
    return row + round(float(label[5]) * size), col + round(float(label[4]) * size)


def test_probability_zero_changes_nothing_and_labels_say_so():
    images = torch.rand(8, 3, 12, 12)
    out, labels = augment(images, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)
    assert labels.shape == (8, AUGMENT_DIM) and not labels.any()


def test_each_label_describes_what_happened_to_its_image():
    # Rows and columns 6 and 9 only map onto each other under flips and turns, far from the border.
    images = one_bright_pixel(200, 6, 9)
    out, labels = augment(images, 1.0, torch.Generator().manual_seed(1))
    assert (labels[:, :2] == 1).all()  # probability 1: both flips, a turn, and a shift drawn for every image
    assert not ((labels[:, 2] == 0) & (labels[:, 3] == 0)).any()
    seen = set()
    for image, label in zip(out, labels, strict=True):
        row, col = where_it_goes(6, 9, label, 16)
        expected = one_bright_pixel(1, row, col)[0]
        assert torch.equal(image, expected), label
        seen.add((round(float(label[4]) * 16), round(float(label[5]) * 16)))
    assert seen == {(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)}  # up to 1/8 of 16 pixels each way


def test_shift_fills_the_border_by_reflection():
    image = torch.arange(36.0).reshape(1, 1, 6, 6)
    moved = _shift(image, torch.tensor([2]), torch.tensor([-1]), pad=2)
    padded = np.pad(image[0, 0].numpy(), 2, mode="reflect")
    # right by 2 and up by 1: output (r, c) is input (r + 1, c - 2), read from the reflected padding
    expected = padded[2 + 1 : 2 + 1 + 6, 2 - 2 : 2 - 2 + 6]
    assert np.array_equal(moved[0, 0].numpy(), expected)


def test_each_transform_applies_with_the_given_probability():
    _, labels = augment(torch.rand(4000, 1, 16, 16), 0.3, torch.Generator().manual_seed(2))
    sd = math.sqrt(0.3 * 0.7 / 4000)
    turned = (labels[:, 2] != 0) | (labels[:, 3] != 0)
    shifted = (labels[:, 4] != 0) | (labels[:, 5] != 0)
    for rate, expected in [
        (labels[:, 0].mean(), 0.3),
        (labels[:, 1].mean(), 0.3),
        (turned.float().mean(), 0.3),
        (shifted.float().mean(), 0.3 * 24 / 25),  # a drawn shift of (0, 0) moves nothing
    ]:
        assert abs(float(rate) - expected) < 5 * sd
    untouched = ~labels.any(dim=1)
    assert abs(float(untouched.float().mean()) - 0.7**3 * (1 - 0.3 * 24 / 25)) < 5 * sd


def test_a_seed_repeats_its_augmentation():
    images = torch.rand(16, 1, 16, 16)
    first = augment(images, 0.5, torch.Generator().manual_seed(3))
    again = augment(images, 0.5, torch.Generator().manual_seed(3))
    other = augment(images, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_images_must_be_square():
    with pytest.raises(ValueError, match="square"):
        augment(torch.rand(2, 1, 8, 16), 0.5, torch.Generator())


def test_network_reads_labels_and_zero_labels_mean_none():
    torch.manual_seed(0)
    model = UNet(preset("tiny", augment_dim=AUGMENT_DIM)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    x, t = torch.randn(3, 1, 16, 16), torch.rand(3) * 999
    with torch.no_grad():
        plain = model(x, t)
        zero = model(x, t, augment_labels=torch.zeros(3, AUGMENT_DIM))
        flipped = model(x, t, augment_labels=torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 3))
    assert torch.equal(plain, zero)  # sampling passes no labels: exactly "not augmented"
    assert not torch.allclose(plain, flipped, atol=1e-4)
    with pytest.raises(ValueError, match="augment_dim"):
        UNet(preset("tiny"))(x, t, augment_labels=torch.zeros(3, AUGMENT_DIM))


def test_transforms_choose_which_kinds_apply():
    images = torch.rand(500, 1, 16, 16)
    out, labels = augment(images, 1.0, torch.Generator().manual_seed(5), transforms=("shift",))
    assert not labels[:, :4].any()  # no flips, no turns
    assert labels[:, 4:].any(dim=1).float().mean() > 0.9
    unshifted = ~labels.any(dim=1)
    assert torch.equal(out[unshifted], images[unshifted])
    with pytest.raises(ValueError, match="unknown augmentation 'zoom'"):
        augment(images, 0.5, torch.Generator(), transforms=("zoom",))
