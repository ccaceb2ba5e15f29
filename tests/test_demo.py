import json
from pathlib import Path

from inkwash.demo import run_demo


def test_demo_writes_every_picture(tmp_path):
    summary = run_demo(tmp_path, minutes=0.05, preset="tiny", num_images=4, full_ddpm_images=2)
    for path in summary["pictures"].values():
        assert Path(path).is_file(), path
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["nfe"] == {"ddpm_100": 100, "ddim_50": 50, "ddpm_1000": 1000}
    assert saved["train_steps"] >= 1
    assert (tmp_path / "samples" / "samples.npz").is_file()
    # The demo trains class-conditionally and draws one grid row per digit (num_images // 10 each, at least 1).
    by_class = json.loads((tmp_path / "samples" / "sampling.json").read_text())
    assert by_class["labels"] == list(range(10))
    full = json.loads((tmp_path / "samples_ddpm1000" / "sampling.json").read_text())
    assert full["labels"] == [0, 1]  # image i gets digit i mod 10
