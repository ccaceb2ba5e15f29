"""One rule for which files of a folder are data: training data, evaluation references and folders of samples
all see the same files."""

import pytest
import torch
from PIL import Image

from inkwash.data.loading import load_folder, to_uint8
from inkwash.data.walk import list_files
from inkwash.evaluation.reference import load_reference
from inkwash.evaluation.report import load_samples

VISIBLE = {"a.png": 10, "sub/b.png": 20, "sub/deeper/c.png": 30}  # relative path: gray level
# Hidden files and files in hidden folders are RGB 12x12, so a sample folder whose shape were read from one
# of them would load as 3 x 12 x 12 instead of 1 x 8 x 8. ".git/d.png" sorts before every visible file.
HIDDEN = (".git/d.png", ".hidden.png", "sub/.e.png", "sub/.cache/f.png", "sub/.cache/deep/g.png")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("INKWASH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    for rel, value in VISIBLE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), value).save(root / rel)
    for rel in HIDDEN:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (250, 0, 0)).save(root / rel)
    (root / "notes.txt").write_text("not an image")  # tried (no extension filter), then skipped as unknown
    return root


def test_the_walker_skips_hidden_files_and_folders_and_sorts_by_relative_path(folder):
    names = [path.relative_to(folder).as_posix() for path in list_files(folder)]
    assert names == ["a.png", "notes.txt", "sub/b.png", "sub/deeper/c.png"]


def test_training_data_references_and_sample_folders_see_the_same_files(folder):
    tried = [path.relative_to(folder).as_posix() for path in list_files(folder)]
    data = load_folder(folder, 1, 8, show_progress=False)
    assert to_uint8(data.images)[:, 0, 0, 0].tolist() == list(VISIBLE.values())
    assert data.skipped_by_reason == {"unknown format": 1}

    reference = load_reference(str(folder), (1, 8, 8))
    assert [entry[0].replace("\\", "/") for entry in reference.source["files"]] == tried
    assert torch.equal(reference.images, data.images)

    samples = load_samples(folder)
    assert samples.shape == (3, 1, 8, 8)
    assert torch.equal(samples, data.images)
