"""The tiny VAE recipe (configs/vae_tiny.py, the main job's VAE) learns: at
2000 of its 3000 steps it reaches >= 27.5 dB PSNR on the shapes validation set
(measured 28.0-28.1; the full 3000 steps reach 29.2 dB, benchmarks/RESULTS.md,
"The tiny VAE recipe"), and its latents come out about unit variance. Two
thirds of the steps keep this, CI's longest test, near 8 CPU minutes."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

import tfjax.vae
from tfjax.config.files import load_config_file
from tfjax.vae.io import META_FILE
from tfjax.vae.train import load_images, to_float, train_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  return load_config_file(os.path.join(ROOT, "configs", "vae_tiny.py"))


@pytest.mark.long
def test_tiny_vae_reaches_27_5db_in_2000_steps(tmp_path):
  config = _config()
  config.vae.train_steps = 2000
  start = time.time()
  path = train_vae(config, str(tmp_path))
  seconds = time.time() - start
  meta = json.load(open(os.path.join(path, META_FILE)))
  print(f"tiny VAE: {meta['metrics']} in {seconds:.0f}s wall")
  assert meta["metrics"]["psnr"] >= 27.5, meta["metrics"]
  assert os.path.isfile(os.path.join(path, "recon_grid.png"))

  vae = tfjax.vae.load(path)
  assert (vae.downsample, vae.latent_channels) == (8, 8)
  images = load_images(config, "validation", 64)
  z = np.asarray(vae.encode(to_float(images)))
  assert z.shape == (64, 8, 8, 8)
  scaled = (z - vae.shift) * vae.scale
  assert 0.7 < scaled.std() < 1.4 and abs(scaled.mean()) < 0.3
