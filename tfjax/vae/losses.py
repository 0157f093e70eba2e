"""Autoencoder training losses: L1, perceptual (LPIPS-style), patch-GAN, KL.

All image arguments are `[batch, H, W, 3]` in [-1, 1]. Losses return scalars
averaged per image element, so their weights mean the same at any resolution.

The perceptual network is whatever VGG-style feature stack the user's weights
file describes (torchvision naming `features.N.weight`, optionally LPIPS'
per-layer linear heads `linK.model.1.weight`); nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

# LPIPS' input whitening for [-1, 1] images (per-channel shift and scale).
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def kl_per_element(kl_per_image: jax.Array, latent_image_shape: tuple[int, ...]) -> jax.Array:
  """Batch-mean KL (summed over latents, `[b]`) divided by the image's element
  count, matching the LDM ratio of summed reconstruction to summed KL."""
  return jnp.mean(kl_per_image) / float(np.prod(latent_image_shape))


# ---- perceptual ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerceptualNet:
  """Structure of a feature stack read from a weights file.

  convs: per conv layer, whether its ReLU output is a tap (taken before the
    following 2x2 max-pool, or at the end of the stack).
  pools: per conv layer, whether a 2x2 max-pool follows it.
  """
  taps: tuple[bool, ...]
  pools: tuple[bool, ...]


def load_perceptual(path: str) -> tuple[PerceptualNet, dict[str, Any]]:
  """Read a VGG-style feature stack from a `.safetensors` file.

  Conv layers are `features.N.{weight,bias}` (PyTorch layout). An index gap of
  more than 2 between consecutive convs marks a ReLU + max-pool between them,
  as in torchvision's VGG; the ReLU output before each pool and after the last
  conv are the compared features.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config key vae.perceptual_weights: no file {path!r}")
  state = safetensors.numpy.load_file(path)
  idx = sorted({int(m.group(1)) for k in state
                if (m := re.fullmatch(r"features\.(\d+)\.weight", k))})
  if not idx:
    raise ValueError(f"config key vae.perceptual_weights: {path} has no "
                     f"'features.N.weight' conv weights")
  pools = tuple(b - a > 2 for a, b in zip(idx, idx[1:])) + (False,)
  taps = tuple(p for p in pools[:-1]) + (True,)
  convs = [(jnp.asarray(state[f"features.{i}.weight"].transpose(2, 3, 1, 0), jnp.float32),
            jnp.asarray(state[f"features.{i}.bias"], jnp.float32)) for i in idx]
  n_taps = sum(taps)
  lins = []
  for k in range(n_taps):
    w = state.get(f"lin{k}.model.1.weight")
    lins.append(None if w is None else jnp.asarray(w.reshape(-1), jnp.float32))
  if any(l is None for l in lins) and any(l is not None for l in lins):
    raise ValueError(f"config key vae.perceptual_weights: {path} has linear heads for "
                     f"some but not all of its {n_taps} feature taps")
  params = {"convs": convs, "lins": None if lins[0] is None else lins}
  return PerceptualNet(taps, pools), params


def _features(net: PerceptualNet, params: dict[str, Any], x: jax.Array) -> list[jax.Array]:
  x = (x.astype(jnp.float32) - _LPIPS_SHIFT) / _LPIPS_SCALE
  feats = []
  for (w, b), tap, pool in zip(params["convs"], net.taps, net.pools):
    x = jax.nn.relu(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)
    if tap:
      feats.append(x)
    if pool:
      x = nn.max_pool(x, (2, 2), (2, 2))
  return feats


def perceptual_loss(net: PerceptualNet, params: dict[str, Any], x: jax.Array,
                    y: jax.Array) -> jax.Array:
  """LPIPS-style distance: unit-normalised features, squared difference,
  (learned or uniform) channel weighting, spatial mean, summed over taps."""
  total = jnp.float32(0.0)
  for k, (fx, fy) in enumerate(zip(_features(net, params, x), _features(net, params, y))):
    fx = fx * jax.lax.rsqrt(jnp.sum(fx * fx, -1, keepdims=True) + 1e-10)
    fy = fy * jax.lax.rsqrt(jnp.sum(fy * fy, -1, keepdims=True) + 1e-10)
    d = (fx - fy) ** 2
    if params["lins"] is None:
      total += jnp.mean(jnp.mean(d, -1))
    else:
      total += jnp.mean(d @ params["lins"][k])
  return total


# ---- patch-GAN ---------------------------------------------------------


class PatchDiscriminator(nn.Module):
  """PatchGAN: strided 4x4 convs to a `[b, h', w', 1]` map of real/fake logits.

  GroupNorm replaces the usual BatchNorm so the step stays a pure function
  without batch statistics.
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.leaky_relu(nn.Conv(self.channels, (4, 4), 2, padding=1)(x), 0.2)
    for n in range(1, self.num_layers + 1):
      ch = self.channels * min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      x = nn.Conv(ch, (4, 4), stride, padding=1, use_bias=False)(x)
      x = nn.leaky_relu(nn.GroupNorm(num_groups=min(32, ch))(x), 0.2)
    return nn.Conv(1, (4, 4), 1, padding=1)(x)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def generator_gan_loss(fake_logits: jax.Array) -> jax.Array:
  return -jnp.mean(fake_logits)
