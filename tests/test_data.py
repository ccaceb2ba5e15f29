import numpy as np
import pytest
from PIL import Image

from inkwash.data import load_data, load_digits, load_folder, to_uint8
from inkwash.errors import InkwashError


def test_digits_are_the_uci_set():
    data = load_digits(16)
    assert len(data) == 1797
    assert data.shape == (1, 16, 16)
    assert data.labels is not None and sorted(set(data.labels.tolist())) == list(range(10))
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    assert data.images.min() == -1.0 and data.images.max() > 0.9
    assert load_digits(8).shape == (1, 8, 8)


def _write_folder(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "wide.png")
    Image.new("L", (10, 10), 128).save(root / "sub" / "gray.jpg")
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent -> white
    rgba.save(root / "sub" / "deeper" / "clear.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "notes.txt").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")


def test_folder_loading_converts_crops_and_counts_skips(tmp_path, capsys):
    _write_folder(tmp_path)
    data = load_folder(tmp_path, channels=3, image_size=8, show_progress=False)
    assert len(data) == 3
    assert data.skipped == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipped 3 unreadable file(s) of 6 in {tmp_path}"]
    pixels = to_uint8(data.images)
    assert pixels.shape == (3, 8, 8, 3)
    by_mean = sorted(pixels.reshape(3, -1, 3).mean(1).tolist())
    # gray 128, pure red, and the transparent image composited on white
    assert any(np.allclose(m, [128, 128, 128], atol=1) for m in by_mean)
    assert any(np.allclose(m, [255, 0, 0], atol=1) for m in by_mean)
    assert any(np.allclose(m, [255, 255, 255], atol=1) for m in by_mean)


def test_grayscale_model_channels(tmp_path):
    _write_folder(tmp_path)
    data = load_data(str(tmp_path), channels=1, image_size=4, show_progress=False)
    assert data.shape == (1, 4, 4)


def test_center_crop_keeps_the_middle(tmp_path):
    image = Image.new("L", (30, 10), 0)
    image.paste(255, (10, 0, 20, 10))  # a white middle third
    image.save(tmp_path / "a.png")
    data = load_folder(tmp_path, channels=1, image_size=10, show_progress=False)
    assert to_uint8(data.images).min() > 200


def test_missing_folder(tmp_path):
    with pytest.raises(InkwashError, match="not found"):
        load_folder(tmp_path / "nope", 1, 16)


def test_folder_of_only_broken_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(InkwashError, match="no readable images"):
        load_folder(tmp_path, 1, 16, show_progress=False)
