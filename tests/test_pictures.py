import numpy as np
import torch
from PIL import Image

from inkwash.core.schedule import NoiseSchedule
from inkwash.data.loading import load_digits
from inkwash.pictures import loss_curve, noising_strip, reverse_strip, sample_grid, save_png


def test_noising_strip_goes_from_image_to_noise(tmp_path):
    images = load_digits(16).images[:2]
    ts = [0, 100, 500, 1000]
    strip = noising_strip(NoiseSchedule(), images, ts, torch.Generator().manual_seed(0))
    save_png(strip, tmp_path / "n.png")
    pixels = np.asarray(Image.open(tmp_path / "n.png").convert("L")).astype(float)
    cell = 64
    top = 14 + 2
    first = pixels[top : top + cell, 2 : 2 + cell]
    last_x = 2 + 3 * (cell + 2)
    last = pixels[top : top + cell, last_x : last_x + cell]
    clean = ((images[0, 0].numpy() + 1) * 127.5).repeat(4, 0).repeat(4, 1)
    assert np.abs(first - clean).max() <= 1.0  # t = 0 is the clean image
    # At t = 1000 nothing of the digit is left: uncorrelated with the clean image.
    assert abs(np.corrcoef(first.ravel(), last.ravel())[0, 1]) < 0.3


def test_grid_and_reverse_strip_sizes():
    images = torch.rand(10, 1, 16, 16) * 2 - 1
    grid = sample_grid(images)
    assert grid.size == (4 * 66 + 2, 3 * 66 + 2)
    trajectory = [(80.0, images * 80, images), (1.0, images, images)]
    strip = reverse_strip(trajectory, images, num_images=2)
    assert strip.height == 14 + 4 * 66 + 2


def test_loss_curve(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss,lr,images_per_sec\n10,1.0,0.001,5\n20,0.5,0.001,5\n")
    loss_curve(tmp_path / "log.csv", tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (600, 350)
