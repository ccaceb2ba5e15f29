import gzip
import hashlib
import io
import os
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import inkwash.data.loading
from inkwash.data import standard as datasets_std
from inkwash.data.loading import load_data, load_digits, load_folder, random_flip, to_uint8
from inkwash.errors import InkwashError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's folder cache out of the real ~/.cache and out of the folders it loads."""
    cache = tmp_path_factory.mktemp("inkwash-cache")
    monkeypatch.setenv("INKWASH_CACHE", str(cache))
    return cache


def test_digits_are_the_uci_set():
    data = load_digits(16)
    assert len(data) == 1797
    assert data.shape == (1, 16, 16)
    assert data.labels is not None and sorted(set(data.labels.tolist())) == list(range(10))
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    assert data.images.min() == -1.0 and data.images.max() > 0.9
    assert load_digits(8).shape == (1, 8, 8)


def test_training_on_digits_holds_out_the_evaluation_test_half(tmp_path):
    from inkwash.evaluation.reference import load_reference

    every = load_digits(16)
    train, test = load_data("digits", 1, 16), load_data("digits", 1, 16, split="test")
    assert (len(train), len(test)) == (901, 896)
    reference = load_reference("digits", (1, 16, 16))
    assert torch.equal(train.images, reference.train) and torch.equal(test.images, reference.test)
    # disjoint halves that together are the whole set, with the class proportions kept
    rows = {tuple(image.flatten().tolist()) for image in every.images}
    assert len({tuple(im.flatten().tolist()) for im in torch.cat([train.images, test.images])}) == len(rows)
    assert (train.labels.bincount() - test.labels.bincount()).abs().max() <= 1
    with pytest.raises(InkwashError, match="digits split"):
        load_digits(16, "validation")
    with pytest.raises(InkwashError, match="a test split exists only for digits"):
        load_data(str(tmp_path), 1, 16, split="test")


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
    reasons = "1 empty, 1 of unknown format, 1 unreadable (truncated or corrupt)"
    assert err == [f"warning: skipped 3 of 6 files in {tmp_path}: {reasons}"]
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


# --- the broken corpus ---------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png() -> bytes:
    """A PNG header claiming 100000 x 100000 8-bit gray pixels (1e10, over any sane limit), and no data."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def write_broken_corpus(root):
    """Five files that must be skipped and eight good ones in unusual modes; returns the good ones' names."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    (root / "bad_truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "bad_zero.jpg").write_bytes(b"")
    (root / "bad_text.jpg").write_text("this is not a JPEG\n")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "bad_tiny.png")
    (root / "bad_bomb.png").write_bytes(_bomb_png())

    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "good_a_rgb.png")
    wide = np.full((8, 8), 1000, np.uint16)
    wide[:, 4:] = 50000
    Image.fromarray(wide).save(root / "good_b_16bit.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * (254 * 3))
    palette.paste(1, (4, 0, 8, 8))
    palette.save(root / "good_c_palette.png", transparency=0)
    la = Image.new("LA", (8, 8), (60, 255))
    la.paste((0, 0), (0, 4, 8, 8))  # transparent bottom half
    la.save(root / "good_d_la.png")
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    cmyk.paste((0, 0, 0, 255), (4, 0, 8, 8))
    cmyk.save(root / "good_e_cmyk.tif")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(root / "good_f_rgba.png")
    sideways = Image.new("RGB", (16, 8), (255, 0, 0))
    sideways.paste((0, 0, 255), (8, 0, 16, 8))  # red left, blue right as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": red ends on top
    sideways.save(root / "good_g_exif.jpg", exif=exif.tobytes(), quality=95)
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (0, 0, 4, 8))
    bilevel.save(root / "good_h_bilevel.png")
    return sorted(p.name for p in root.iterdir() if p.name.startswith("good_"))


def test_broken_corpus_skips_exactly_the_bad_files_with_reasons(tmp_path, capsys):
    good = write_broken_corpus(tmp_path)
    assert Image.open(tmp_path / "good_b_16bit.png").mode.startswith("I")  # really a 16-bit file
    data = load_folder(tmp_path, channels=3, image_size=8, show_progress=False)
    assert len(data) == len(good) == 8
    assert data.skipped == 5
    assert data.skipped_by_reason == {"empty": 1, "unknown format": 1, "unreadable": 1, "too small": 1, "bomb": 1}
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: skipped 5 of 13 files in {tmp_path}: 1 empty, 1 of unknown format, "
        "1 unreadable (truncated or corrupt), 1 too small (a side under 8 px), "
        f"1 over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
    ]
    rgb, wide, palette, la, cmyk, rgba, exif, bilevel = to_uint8(data.images).astype(int)  # (8, 8, 3) each
    assert (rgb == [10, 20, 30]).all()
    # 16-bit scaled by 257 (65535 -> 255), not clipped: 1000 -> 4, 50000 -> 195
    assert (wide[:, :4] == 4).all() and (wide[:, 4:] == 195).all()
    assert (palette[:, :4] == 255).all() and (palette[:, 4:] == [0, 0, 255]).all()
    assert (la[:4] == 60).all() and (la[4:] == 255).all()
    assert (cmyk[:, :4] == [255, 0, 0]).all() and (cmyk[:, 4:] == 0).all()
    assert np.abs(rgba - [255, 127, 127]).max() <= 1
    # EXIF orientation 6 turns the 16x8 picture upright (8x16, red on top); the center crop keeps rows 4..12
    assert np.abs(exif[:3] - [255, 0, 0]).max() < 40 and np.abs(exif[5:] - [0, 0, 255]).max() < 40
    assert (bilevel[:, :4] == 255).all() and (bilevel[:, 4:] == 0).all()


def test_warning_tier_of_the_bomb_limit_is_respected(tmp_path, monkeypatch, capsys):
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; inkwash skips those too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (12, 12), 7).save(tmp_path / "a_over.png")  # 144 pixels: the warning tier
    Image.new("L", (9, 9), 7).save(tmp_path / "b_under.png")  # 81 pixels
    data = load_folder(tmp_path, 1, 9, show_progress=False)
    assert len(data) == 1 and data.skipped_by_reason == {"bomb": 1}
    assert "1 over Pillow's decompression-bomb limit of 100 pixels" in capsys.readouterr().err


def test_minimum_side_follows_a_smaller_image_size(tmp_path):
    Image.new("L", (5, 5), 7).save(tmp_path / "five.png")
    assert len(load_folder(tmp_path, 1, 4, show_progress=False)) == 1
    with pytest.raises(InkwashError, match="no readable images"):
        load_folder(tmp_path, 1, 16, show_progress=False)


def test_resize_mode_squashes_instead_of_cropping(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 20, 10))
    image.paste((0, 0, 255), (20, 0, 30, 10))
    image.save(tmp_path / "a.png")
    cropped = to_uint8(load_folder(tmp_path, 3, 10, show_progress=False).images)[0].astype(int)
    squashed = to_uint8(load_folder(tmp_path, 3, 10, show_progress=False, resize_mode="resize").images)[0]
    assert np.abs(cropped - [0, 255, 0]).max() <= 2  # only the middle third survives the crop
    assert (squashed[:, 0] == [255, 0, 0]).all() and (squashed[:, 5] == [0, 255, 0]).all()
    assert (squashed[:, -1] == [0, 0, 255]).all()
    with pytest.raises(InkwashError, match="resize mode"):
        load_folder(tmp_path, 3, 10, resize_mode="stretch")


# --- class folders -------------------------------------------------------------------------------


def _write_classes(root):
    for rel, value in [("cat/a.png", 100), ("cat/sub/b.png", 101), ("dog/c.png", 200), ("ant/d.png", 50)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), value).save(root / rel)
    (root / "stray.png").write_bytes((root / "dog" / "c.png").read_bytes())
    (root / ".thumbs").mkdir()
    Image.new("L", (8, 8), 0).save(root / ".thumbs" / "x.png")  # hidden: never seen
    (root / "no_files").mkdir()  # an empty folder is not a class


def test_class_subfolders_give_sorted_labels(tmp_path, capsys):
    _write_classes(tmp_path)
    data = load_data(str(tmp_path), 1, 8, show_progress=False, class_cond=True)
    assert data.class_names == ["ant", "cat", "dog"]
    values = to_uint8(data.images)[:, 0, 0, 0].tolist()
    pairs = sorted(zip(values, data.labels.tolist(), strict=True))
    assert pairs == [(50, 0), (100, 1), (101, 1), (200, 2)]
    assert data.labels.dtype == torch.int64
    assert data.skipped_by_reason == {"outside classes": 1}
    assert f"skipped 1 of 5 files in {tmp_path}: 1 outside the class folders" in capsys.readouterr().err
    unlabeled = load_folder(tmp_path, 1, 8, show_progress=False)
    assert unlabeled.labels is None and unlabeled.class_names is None and len(unlabeled) == 5


def test_class_cond_without_subfolders_is_an_error(tmp_path):
    Image.new("L", (8, 8), 0).save(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InkwashError, match="needs one subfolder per class"):
        load_folder(tmp_path, 1, 8, show_progress=False, class_cond=True)


# --- the on-disk cache ---------------------------------------------------------------------------


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded a file although the cache should have been used")


def test_cache_hit_skips_decoding_and_repeats_the_warning(tmp_path, isolated_cache, monkeypatch, capsys):
    _write_folder(tmp_path)
    first = load_folder(tmp_path, 3, 8, show_progress=False)
    first_err = capsys.readouterr().err
    assert len(list((isolated_cache / "datasets").glob("*.npz"))) == 1  # under $INKWASH_CACHE by default
    monkeypatch.setattr(inkwash.data.loading, "_decode", _no_decoding)
    second = load_folder(tmp_path, 3, 8, show_progress=False)
    assert torch.equal(first.images, second.images)
    assert second.skipped_by_reason == first.skipped_by_reason and second.skipped == 3
    assert capsys.readouterr().err == first_err
    with pytest.raises(AssertionError, match="decoded a file"):  # other settings are another entry
        load_folder(tmp_path, 3, 4, show_progress=False)


def test_stale_cache_is_never_used(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 10).save(folder / "a.png")
    load_folder(folder, 1, 8, show_progress=False, cache_dir=cache_dir)
    before = os.stat(folder / "a.png").st_mtime_ns
    Image.new("L", (8, 8), 240).save(folder / "a.png")  # same name, same byte size: only the mtime differs
    os.utime(folder / "a.png", ns=(before + 10**9, before + 10**9))
    changed = load_folder(folder, 1, 8, show_progress=False, cache_dir=cache_dir)
    assert to_uint8(changed.images).min() == 240
    Image.new("L", (8, 8), 70).save(folder / "b.png")  # an added file
    assert len(load_folder(folder, 1, 8, show_progress=False, cache_dir=cache_dir)) == 2
    (folder / "b.png").unlink()  # a removed file
    assert len(load_folder(folder, 1, 8, show_progress=False, cache_dir=cache_dir)) == 1
    assert len(list(cache_dir.glob("*.npz"))) == 1  # a stale entry is overwritten, not kept beside
    unlabeled_then_labeled = tmp_path / "classes"
    _write_classes(unlabeled_then_labeled)
    load_folder(unlabeled_then_labeled, 1, 8, show_progress=False, cache_dir=cache_dir)
    assert load_folder(unlabeled_then_labeled, 1, 8, False, class_cond=True, cache_dir=cache_dir).labels is not None


def test_torn_cache_file_is_a_miss_and_cache_false_writes_nothing(tmp_path, isolated_cache):
    Image.new("L", (8, 8), 33).save(tmp_path / "a.png")
    load_folder(tmp_path, 1, 8, show_progress=False)
    (entry,) = (isolated_cache / "datasets").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    assert to_uint8(load_folder(tmp_path, 1, 8, show_progress=False).images).max() == 33
    with np.load(entry, allow_pickle=False) as archive:  # rewritten whole, and readable without pickle
        assert archive["pixels"].shape == (1, 8, 8, 1)
    entry.unlink()
    load_folder(tmp_path, 1, 8, show_progress=False, cache=False)
    assert not list((isolated_cache / "datasets").glob("*.npz"))


# --- random flips --------------------------------------------------------------------------------


def test_random_flip_is_seeded_and_flips_about_half():
    batch = torch.arange(2000, dtype=torch.float32).reshape(1000, 1, 1, 2)  # (B, C, H, W), rows [2i, 2i+1]
    first = random_flip(batch, torch.Generator().manual_seed(3))
    assert torch.equal(first, random_flip(batch, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, random_flip(batch, torch.Generator().manual_seed(4)))
    flipped = first[:, 0, 0, 0] > first[:, 0, 0, 1]
    kept = torch.equal(first[~flipped], batch[~flipped])
    assert kept and torch.equal(first[flipped], batch[flipped].flip(-1))
    assert 430 < int(flipped.sum()) < 570  # Binomial(1000, 1/2): 4.4 standard deviations either side


# --- standard datasets ---------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_split(folder, split, images, labels, gz):
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    for name, array in [(f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)]:
        payload = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


def _tiny_mnist(seed, n=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def test_mnist_idx_round_trip_both_splits(tmp_path):
    train_images, train_labels = _tiny_mnist(0)
    test_images, test_labels = _tiny_mnist(1, n=3)
    _write_idx_split(tmp_path / "mnist", "train", train_images, train_labels, gz=True)
    _write_idx_split(tmp_path / "mnist", "test", test_images, test_labels, gz=False)
    data = load_data("mnist", 1, 28, show_progress=False, data_dir=tmp_path)
    assert np.array_equal(to_uint8(data.images)[..., 0], train_images)
    assert data.labels.tolist() == train_labels.tolist() and data.class_names == [str(d) for d in range(10)]
    test = load_data("mnist", 1, 28, show_progress=False, data_dir=tmp_path, split="test")
    assert np.array_equal(to_uint8(test.images)[..., 0], test_images)
    assert test.labels.tolist() == test_labels.tolist()
    rgb = load_data("mnist", 3, 32, show_progress=False, data_dir=tmp_path)
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_fashion_mnist_files_directly_in_data_dir(tmp_path):
    images, labels = _tiny_mnist(2)
    _write_idx_split(tmp_path, "train", images, labels, gz=False)
    data = load_data("fashion-mnist", 1, 28, show_progress=False, data_dir=tmp_path)
    assert np.array_equal(to_uint8(data.images)[..., 0], images)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert len(data.class_names) == 10


def test_corrupt_or_missing_idx_files(tmp_path):
    images, labels = _tiny_mnist(0)
    _write_idx_split(tmp_path / "mnist", "train", images, labels, gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(InkwashError, match="truncated"):
        load_data("mnist", 1, 28, show_progress=False, data_dir=tmp_path)
    with pytest.raises(InkwashError, match="--download"):
        load_data("mnist", 1, 28, show_progress=False, data_dir=tmp_path, split="test")
    with pytest.raises(InkwashError, match="split"):
        load_data("mnist", 1, 28, show_progress=False, data_dir=tmp_path, split="valid")
    assert len(load_data("digits", 1, 16, show_progress=False, split="test")) == 896  # digits' held-out half


def _cifar_bytes(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    planar = pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1)  # (N, H, W, C) -> (N, 3072) R, G, B planes
    return b"".join(bytes([label]) + row.tobytes() for label, row in zip(labels, planar, strict=True))


def _write_cifar(folder, seed=0):
    """Five train images (one per batch file) and two test images; returns them."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7, 1, 2], dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        (folder / f"data_batch_{i + 1}.bin").write_bytes(_cifar_bytes(pixels[i : i + 1], labels[i : i + 1]))
    (folder / "test_batch.bin").write_bytes(_cifar_bytes(pixels[5:], labels[5:]))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return pixels, labels


def test_cifar10_binary_round_trip(tmp_path):
    pixels, labels = _write_cifar(tmp_path / "cifar-10-batches-bin")
    data = load_data("cifar10", 3, 32, show_progress=False, data_dir=tmp_path)
    assert np.array_equal(to_uint8(data.images), pixels[:5])
    assert data.labels.tolist() == labels[:5].tolist()
    assert data.class_names[0] == "airplane" and data.class_names[9] == "truck"
    test = load_data("cifar10", 3, 32, show_progress=False, data_dir=tmp_path, split="test")
    assert np.array_equal(to_uint8(test.images), pixels[5:]) and test.labels.tolist() == [1, 2]
    assert load_data("cifar10", 1, 16, show_progress=False, data_dir=tmp_path).shape == (1, 16, 16)


def test_cifar10_python_version_is_refused(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04.")
    with pytest.raises(InkwashError, match="never unpickles"):
        load_data("cifar10", 3, 32, show_progress=False, data_dir=tmp_path)


# --- downloads (file:// URLs to files the test writes; nothing touches the network) --------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serve_mnist(tmp_path, monkeypatch, corrupt_labels=False):
    source = tmp_path / "server"
    images, labels = _tiny_mnist(5)
    _write_idx_split(source, "train", images, labels, gz=True)
    checksums = {p.name: _sha256(p.read_bytes()) for p in source.iterdir()}
    if corrupt_labels:
        checksums["train-labels-idx1-ubyte.gz"] = "0" * 64
    monkeypatch.setitem(datasets_std.DOWNLOADS, "mnist", (source.as_uri() + "/", checksums))
    return images, labels


def test_download_verifies_and_places_files(tmp_path, monkeypatch):
    images, labels = _serve_mnist(tmp_path, monkeypatch)
    data_dir = tmp_path / "data"
    data = load_data("mnist", 1, 28, show_progress=False, data_dir=data_dir, download=True)
    assert np.array_equal(to_uint8(data.images)[..., 0], images) and data.labels.tolist() == labels.tolist()
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]


def test_download_checksum_mismatch_deletes_the_file(tmp_path, monkeypatch):
    _serve_mnist(tmp_path, monkeypatch, corrupt_labels=True)
    data_dir = tmp_path / "data"
    with pytest.raises(InkwashError, match=r"checksum mismatch.*deleted") as raised:
        load_data("mnist", 1, 28, show_progress=False, data_dir=data_dir, download=True)
    assert [p.name for p in (data_dir / "mnist").iterdir()] == ["train-images-idx3-ubyte.gz"]  # no .part left
    assert f"expected sha256 {'0' * 64}, got " in str(raised.value) and "\n" not in str(raised.value)


def test_every_standard_download_is_https_and_sha256():
    assert set(datasets_std.DOWNLOADS) == set(datasets_std.STANDARD_DATASETS)
    for name, (base, checksums) in datasets_std.DOWNLOADS.items():
        assert base.startswith("https://") and base.endswith("/"), name
        assert checksums, name
        for file, checksum in checksums.items():
            assert (base + file).startswith("https://"), (name, file)
            assert re.fullmatch(r"[0-9a-f]{64}", checksum), (name, file, checksum)
    # The files the loaders fetch are exactly the ones with a checksum.
    for name in ("mnist", "fashion-mnist"):
        stems = [stem for split in datasets_std.SPLITS for stem in datasets_std.IDX_FILES[split]]
        assert sorted(datasets_std.DOWNLOADS[name][1]) == sorted(f"{stem}.gz" for stem in stems)
    assert list(datasets_std.DOWNLOADS["cifar10"][1]) == [datasets_std.CIFAR_ARCHIVE]
    # No two files share a checksum (a copy-paste slip would).
    all_checksums = [c for _, checksums in datasets_std.DOWNLOADS.values() for c in checksums.values()]
    assert len(set(all_checksums)) == len(all_checksums)


@pytest.mark.parametrize(
    "url", ["http://example.invalid/train-images-idx3-ubyte.gz", "ftp://example.invalid/x.gz", "example.invalid/x"]
)
def test_download_refuses_a_url_that_is_not_https(tmp_path, url):
    with pytest.raises(InkwashError, match=r"refusing to download .*only https") as raised:
        datasets_std.download(url, tmp_path / "x", "0" * 64, show_progress=False)
    assert "\n" not in str(raised.value)
    assert not list(tmp_path.iterdir())  # nothing created, not even the folder's temporary .part


def test_download_refuses_an_https_url_that_redirects_to_http(tmp_path, monkeypatch):
    class Redirected(io.BytesIO):
        @property
        def headers(self):
            return {}

        def geturl(self):
            return "http://example.invalid/x"

    monkeypatch.setattr(datasets_std.urllib.request, "urlopen", lambda url, timeout: Redirected(b"data"))
    with pytest.raises(InkwashError, match=r"refusing to download https://example.invalid/x: it redirects to http://"):
        datasets_std.download("https://example.invalid/x", tmp_path / "x", _sha256(b"data"), show_progress=False)
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary .part


def test_download_failure_is_a_clear_error(tmp_path):
    with pytest.raises(InkwashError, match=r"download of .* failed"):
        datasets_std.download((tmp_path / "nowhere" / "x").as_uri(), tmp_path / "x", "0" * 64, show_progress=False)
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary .part


def test_cifar10_download_extracts_only_the_expected_members(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    pixels, labels = _write_cifar(staging / "cifar-10-batches-bin", seed=4)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        evil = tarfile.TarInfo("cifar-10-batches-bin/../../evil.bin")
        tar.addfile(evil, io.BytesIO(b""))
    source = tmp_path / "server"
    source.mkdir()
    (source / "cifar-10-binary.tar.gz").write_bytes(archive.getvalue())
    checksums = {"cifar-10-binary.tar.gz": _sha256(archive.getvalue())}
    monkeypatch.setitem(datasets_std.DOWNLOADS, "cifar10", (source.as_uri() + "/", checksums))
    data_dir = tmp_path / "data"
    data = load_data("cifar10", 3, 32, show_progress=False, data_dir=data_dir, download=True)
    assert np.array_equal(to_uint8(data.images), pixels[:5]) and data.labels.tolist() == labels[:5].tolist()
    assert sorted(p.name for p in data_dir.rglob("*")) == sorted(
        ["cifar-10-batches-bin", "batches.meta.txt", "test_batch.bin"] + [f"data_batch_{i}.bin" for i in range(1, 6)]
    )
    assert not (tmp_path / "evil.bin").exists()
