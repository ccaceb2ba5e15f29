"""MNIST, Fashion-MNIST and CIFAR-10 read from their official binary formats, with https downloads checked by SHA-256.

MNIST and Fashion-MNIST are IDX files (LeCun et al. 1998): a big-endian header of magic, then one
uint32 per dimension, then the raw bytes. CIFAR-10 is read from its *binary* version (Krizhevsky
2009): records of 1 label byte and 3,072 pixel bytes (1,024 red, then green, then blue, row-major).
The python version of CIFAR-10 is a set of pickles, and inkwash never unpickles a file it is given.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np

from inkwash.errors import InkwashError
from inkwash.files import atomic_write_bytes
from inkwash.progress import progress

STANDARD_DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR_META = "batches.meta.txt"
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_RECORD = 1 + 3 * 32 * 32

# name -> (base URL, {file name: sha256}). Every base URL is https. The SHA-256s are those of the
# authors' original files (the ones whose MD5s the authors publish), as recorded in TensorFlow
# Datasets' url_checksums/{mnist,fashion_mnist,cifar10}.txt; the byte sizes in the comments too.
# The MNIST files on PyTorch's S3 mirror are byte for byte LeCun's originals, and Fashion-MNIST is
# served from the data folder of Zalando's official repository, which holds the same files as
# their http-only S3 website.
DOWNLOADS: dict[str, tuple[str, dict[str, str]]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            # 9,912,422 bytes
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            # 28,881 bytes
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            # 1,648,877 bytes
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            # 4,542 bytes
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        {
            # 26,421,880 bytes
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            # 29,515 bytes
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            # 4,422,102 bytes
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            # 5,148 bytes
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/",
        # 170,052,171 bytes
        {CIFAR_ARCHIVE: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"},
    ),
}

# https for the network; file:// only reads a local file (a local mirror, or the tests' fake server).
ALLOWED_SCHEMES = ("https", "file")


def download(url: str, dest: Path, sha256: str, show_progress: bool = True) -> None:
    """Fetch ``url`` into a temporary file next to ``dest``, check its SHA-256, then rename it into place.

    Only https (and file://, which reads a local file) URLs are accepted: a plain http download is refused.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise InkwashError(f"refusing to download {url}: only https URLs are allowed, not {scheme or 'no scheme'}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            if urllib.parse.urlsplit(response.geturl()).scheme.lower() not in ALLOWED_SCHEMES:
                raise InkwashError(
                    f"refusing to download {url}: it redirects to {response.geturl()}, which is not https"
                )
            total = int(response.headers.get("Content-Length") or 0) or None
            desc = f"downloading {dest.name}"
            with progress(total=total, desc=desc, unit="B", unit_scale=True, disable=not show_progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise InkwashError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}; "
                "the download was deleted"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise InkwashError(f"download of {url} failed: {getattr(exc, 'reason', exc)}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fetch(name: str, file: str, folder: Path, show_progress: bool) -> Path:
    base, checksums = DOWNLOADS[name]
    dest = folder / file
    download(base + file, dest, checksums[file], show_progress)
    return dest


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a uint8 array of the shape its header gives."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise InkwashError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InkwashError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise InkwashError(f"{path} holds IDX type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InkwashError(f"{path} is truncated (incomplete header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise InkwashError(
            f"{path} is truncated or corrupt: its header says {shape}, it holds {len(raw) - header} bytes"
        )
    # A copy, because arrays over bytes are read-only and torch wants to own writable memory.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_idx_dataset(
    name: str, data_dir: Path, split: str, download: bool, show_progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MNIST or Fashion-MNIST from ``data_dir/NAME/`` (or ``data_dir`` itself): uint8 (N, 28, 28, 1), labels."""
    folders = [data_dir / name, data_dir]
    paths = []
    for stem in IDX_FILES[split]:
        path = _find_idx(folders, stem)
        if path is None and download:
            path = _fetch(name, f"{stem}.gz", data_dir / name, show_progress)
        if path is None:
            raise InkwashError(
                f"{name} file {stem}(.gz) not found in {folders[0]} or {folders[1]}; pass --download to fetch it"
            )
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InkwashError(f"{paths[0]} and {paths[1]} do not match: images {images.shape}, labels {labels.shape}")
    if labels.size and labels.max() >= 10:
        raise InkwashError(f"{paths[1]} holds label {labels.max()}; {name} has 10 classes")
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return images[..., None], labels.astype(np.int64), list(classes)


def read_cifar_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary batches as uint8 (N, 32, 32, 3) and int64 (N,) labels."""
    records = []
    for path in paths:
        raw = path.read_bytes()
        if not raw or len(raw) % CIFAR_RECORD:
            raise InkwashError(f"{path} is not a CIFAR-10 binary batch (size {len(raw)} is not a multiple of 3073)")
        records.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD))
    table = np.concatenate(records)
    labels = table[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise InkwashError(f"CIFAR-10 batch holds label {labels.max()}; CIFAR-10 has 10 classes")
    pixels = table[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planar RGB -> (N, H, W, C)
    return np.ascontiguousarray(pixels), labels


def _extract_cifar(archive: Path, folder: Path) -> None:
    """Copy only the expected regular files out of the archive: member paths are never trusted."""
    wanted = {f"{CIFAR_FOLDER}/{name}" for names in CIFAR_FILES.values() for name in names} | {
        f"{CIFAR_FOLDER}/{CIFAR_META}"
    }
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    data = tar.extractfile(member).read()
                    atomic_write_bytes(folder / PurePosixPath(member.name).name, data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InkwashError(f"cannot extract {archive}: {exc}") from None


def _cifar_classes(folder: Path) -> list[str]:
    meta = folder / CIFAR_META
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = [line.strip() for line in meta.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if len(names) != 10:
        raise InkwashError(f"{meta} lists {len(names)} class names; CIFAR-10 has 10")
    return names


def load_cifar10(
    data_dir: Path, split: str, download: bool, show_progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 (binary version) from ``data_dir/cifar-10-batches-bin/`` (or ``data_dir`` itself)."""
    names = CIFAR_FILES[split]
    folder = next((f for f in (data_dir / CIFAR_FOLDER, data_dir) if all((f / n).is_file() for n in names)), None)
    if folder is None and download:
        folder = data_dir / CIFAR_FOLDER
        archive = _fetch("cifar10", CIFAR_ARCHIVE, data_dir, show_progress)
        try:
            _extract_cifar(archive, folder)
        finally:
            archive.unlink(missing_ok=True)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InkwashError(f"the CIFAR-10 archive lacks {', '.join(missing)}")
    if folder is None:
        hint = ""
        if (data_dir / "cifar-10-batches-py").is_dir():
            hint = " (found cifar-10-batches-py, the pickled python version, which inkwash never unpickles)"
        raise InkwashError(
            f"CIFAR-10 binary batches ({', '.join(names)}) not found in {data_dir / CIFAR_FOLDER}{hint}; "
            f"pass --download or extract {DOWNLOADS['cifar10'][0]}{CIFAR_ARCHIVE} into {data_dir}"
        )
    pixels, labels = read_cifar_batches([folder / n for n in names])
    return pixels, labels, _cifar_classes(folder)


def load_standard(
    name: str, data_dir: str | Path, split: str = "train", download: bool = False, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One of STANDARD_DATASETS as uint8 (N, H, W, C) pixels, int64 (N,) labels and the class names."""
    if split not in SPLITS:
        raise InkwashError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name == "cifar10":
        return load_cifar10(Path(data_dir), split, download, show_progress)
    return load_idx_dataset(name, Path(data_dir), split, download, show_progress)
