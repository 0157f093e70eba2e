"""Reconstruction metrics (PSNR, SSIM) and the input/reconstruction image grid.

Images are `[batch, H, W, 3]` in [-1, 1]; metrics are computed on [0, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _unit(x: jax.Array) -> jax.Array:
  return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image PSNR in dB `[batch]` on [0, 1] images."""
  mse = jnp.mean((_unit(x) - _unit(y)) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _blur(x: jax.Array, g: np.ndarray) -> jax.Array:
  """Separable Gaussian filter, 'valid' borders, per channel: [b, H, W, c]."""
  c = x.shape[-1]
  kh = jnp.asarray(np.tile(g[:, None, None, None], (1, 1, 1, c)))
  kw = jnp.asarray(np.tile(g[None, :, None, None], (1, 1, 1, c)))
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                   feature_group_count=c)
  return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                      feature_group_count=c)


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image SSIM `[batch]` (Wang et al. 2004: 11x11 Gaussian window, sigma
  1.5, K1=0.01, K2=0.03), averaged over channels and positions."""
  x, y = _unit(x), _unit(y)
  g = _gaussian_window()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = _blur(x, g), _blur(y, g)
  sxx = _blur(x * x, g) - mx * mx
  syy = _blur(y * y, g) - my * my
  sxy = _blur(x * y, g) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def image_grid(inputs: np.ndarray, recons: np.ndarray, per_row: int = 8) -> np.ndarray:
  """uint8 grid `[rows * H, per_row * W, 3]`: rows of inputs, each followed by
  the row of their reconstructions."""
  def to_u8(a):
    return np.asarray(np.clip((np.asarray(a, np.float32) + 1) * 127.5 + 0.5, 0, 255), np.uint8)
  n = (len(inputs) // per_row) * per_row or len(inputs)
  per_row = min(per_row, n)
  rows = []
  for i in range(0, n, per_row):
    rows.append(np.concatenate(list(to_u8(inputs[i:i + per_row])), axis=1))
    rows.append(np.concatenate(list(to_u8(recons[i:i + per_row])), axis=1))
  return np.concatenate(rows, axis=0)
