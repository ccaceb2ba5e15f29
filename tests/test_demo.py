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
