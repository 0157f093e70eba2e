"""Fréchet Inception Distance with a user-supplied Inception feature extractor.

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between Gaussians
fitted to the features of real and generated images. The extractor is a
`jax.export` file (see `extractor.py`) mapping float32 [b, H, W, 3] images in
[0, 255] to [b, d] features (pool3 for the standard number). Without one the
suite reports "skipped".
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from scipy import linalg

from tfjax.data import shapes
from tfjax.eval import extractor


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], covariance [d, d]) of [n, d] features."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"FID needs at least 2 feature vectors [n, d], got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    # Near-singular products (few samples): regularise as the reference code does.
    eps = np.eye(s1.shape[0]) * 1e-6
    covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_images(path: str, real: np.ndarray, generated: np.ndarray) -> float:
  fn, shape = extractor.load(path)
  fr = fn(extractor.resize_images(real, shape))
  fg = fn(extractor.resize_images(generated, shape))
  return frechet_distance(*gaussian(fr), *gaussian(fg))


def maybe_fid(gen: Any, path: str | None, num_samples: int, *, seed: int = 0,
              batch_size: int = 8) -> dict[str, Any]:
  """FID of text-to-image samples vs held-out shapes images, or a skip notice."""
  if not path:
    return {"status": "skipped", "reason": "no Inception feature extractor given (--inception)"}
  size = int(gen.config.data.image_size)
  real, _, captions = shapes.generate_split("test", num_samples, size, seed=seed,
                                            options=shapes.SceneOptions.from_config(gen.config.data))
  fake, rng = [], jax.random.key(seed + 1)
  for i in range(0, num_samples, batch_size):
    rng, key = jax.random.split(rng)
    fake.append(gen.decode_latents(gen.text_to_image(captions[i:i + batch_size], key)))
  value = fid_from_images(path, real, np.concatenate(fake))
  return {"status": "ok", "value": value, "num_images": num_samples}
