"""The image side: latents <-> transformer vectors, conditioned on the timestep.

Two ways to turn k x k latent pixels into one transformer vector (and back):
  linear: one dense layer on the flattened patch, plus a timestep embedding.
  unet:   U-Net down blocks to a grid 1/k the size, one vector per grid cell;
          up blocks (with skip connections from the down path) back to latents.
          Layer norm stands where the U-Net had AdaLayerNorm; the timestep
          still conditions every residual block through an added projection.
Patches run left-to-right, top-to-bottom.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tfjax.model.layers import dense_init


def patchify(latents: jax.Array, patch_size: int) -> jax.Array:
  """[batch, n, h, w, c] -> [batch, n, (h/p)*(w/p), p*p*c], row-major patches."""
  b, n, h, w, c = latents.shape
  p = patch_size
  x = latents.reshape(b, n, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `patchify`: [batch, n, P, p*p*c] -> [batch, n, h, w, c]."""
  b, n, _, d = patches.shape
  p = patch_size
  c = d // (p * p)
  x = patches.reshape(b, n, height // p, width // p, p, p, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, n, height, width, c)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of (float) timesteps: [...] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nn.Module):
  """t [batch, n] -> [batch, n, dim]: sinusoidal features through a SiLU MLP."""
  dim: int
  features: int = 256
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    h = timestep_features(t, self.features)
    h = nn.Dense(self.dim, param_dtype=self.param_dtype, name="fc1",
                 kernel_init=dense_init(("time", "embed")))(h)
    return nn.Dense(self.dim, param_dtype=self.param_dtype, name="fc2",
                    kernel_init=dense_init(("time", "embed")))(nn.silu(h))


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, dtype=jnp.float32,
          param_dtype=jnp.float32) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")))


class ResBlock(nn.Module):
  """LayerNorm-SiLU-conv twice, with the timestep added in between."""
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t_emb: jax.Array) -> jax.Array:
    """x: [N, h, w, ch], t_emb: [N, dim]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _conv(self.features, "conv1", **kw)(nn.silu(nn.LayerNorm(name="norm1", **kw)(x)))
    h = h + nn.Dense(self.features, name="time", kernel_init=dense_init(("embed", "conv_out")),
                     **kw)(nn.silu(t_emb))[:, None, None, :]
    h = _conv(self.features, "conv2", **kw)(nn.silu(nn.LayerNorm(name="norm2", **kw)(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, "skip", kernel=1, **kw)(x)
    return x + h


class LinearPatchEncoder(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, latents: jax.Array, t_emb: jax.Array):
    """latents [b, n, h, w, c], t_emb [b, n, dim] -> ([b, n, P, dim], no skips)."""
    c = self.config
    patches = patchify(latents, c.patch_size)
    x = nn.Dense(c.dim, param_dtype=jnp.dtype(c.param_dtype), name="proj",
                 kernel_init=dense_init(("patch", "embed")))(patches)
    return x + t_emb[:, :, None, :], None


class LinearPatchDecoder(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, h: jax.Array, t_emb: jax.Array, skips) -> jax.Array:
    """h [b, n, P, dim] -> [b, n, h, w, c]."""
    del t_emb, skips
    c = self.config
    out = nn.Dense(c.patch_size ** 2 * c.latent_channels, param_dtype=jnp.dtype(c.param_dtype),
                   name="proj", kernel_init=dense_init(("embed", "patch")))(h)
    return unpatchify(out, c.patch_size, c.latent_size, c.latent_size)


class UNetPatchEncoder(nn.Module):
  """Down blocks: latent grid -> grid / patch_size, one transformer vector per cell."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, latents: jax.Array, t_emb: jax.Array):
    c = self.config
    b, n, hh, ww, ch = latents.shape
    pd = jnp.dtype(c.param_dtype)
    x = latents.reshape(b * n, hh, ww, ch)
    t = t_emb.reshape(b * n, t_emb.shape[-1])  # explicit sizes: n may be 0 (text-only calls)
    x = _conv(c.unet_channels[0], "conv_in", param_dtype=pd)(x)
    skips = []
    for level, width in enumerate(c.unet_channels):
      for i in range(c.unet_blocks_per_level):
        x = ResBlock(width, param_dtype=pd, name=f"down_{level}_{i}")(x, t)
      skips.append(x)
      if level < len(c.unet_channels) - 1:
        x = _conv(c.unet_channels[level + 1], f"downsample_{level}", stride=2, param_dtype=pd)(x)
    gh, gw = x.shape[1], x.shape[2]
    x = nn.Dense(c.dim, param_dtype=pd, name="proj",
                 kernel_init=dense_init(("conv_out", "embed")))(x)
    return x.reshape(b, n, gh * gw, c.dim), skips


class UNetPatchDecoder(nn.Module):
  """Up blocks, mirroring the encoder, with its activations as skips."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, h: jax.Array, t_emb: jax.Array, skips) -> jax.Array:
    c = self.config
    b, n, num_patches, _ = h.shape
    pd = jnp.dtype(c.param_dtype)
    side = int(round(num_patches ** 0.5))
    t = t_emb.reshape(b * n, t_emb.shape[-1])  # explicit sizes: n may be 0 (text-only calls)
    x = nn.Dense(c.unet_channels[-1], param_dtype=pd, name="proj",
                 kernel_init=dense_init(("embed", "conv_out")))(h.astype(jnp.float32))
    x = x.reshape(b * n, side, side, c.unet_channels[-1])
    for level in reversed(range(len(c.unet_channels))):
      width = c.unet_channels[level]
      x = jnp.concatenate([x, skips[level]], axis=-1)
      for i in range(c.unet_blocks_per_level):
        x = ResBlock(width, param_dtype=pd, name=f"up_{level}_{i}")(x, t)
      if level > 0:
        x = jax.image.resize(x, (x.shape[0], x.shape[1] * 2, x.shape[2] * 2, x.shape[3]),
                             "nearest")
        x = _conv(c.unet_channels[level - 1], f"upsample_{level}", param_dtype=pd)(x)
    x = nn.silu(nn.LayerNorm(name="norm_out", param_dtype=pd)(x))
    x = _conv(c.latent_channels, "conv_out", param_dtype=pd)(x)
    return x.reshape(b, n, c.latent_size, c.latent_size, c.latent_channels)


def patch_layers(config: ml_collections.ConfigDict):
  """(encoder class, decoder class) for `config.patch_type`."""
  if config.patch_type == "linear":
    return LinearPatchEncoder, LinearPatchDecoder
  if config.patch_type == "unet":
    return UNetPatchEncoder, UNetPatchDecoder
  raise ValueError(f"config key model.patch_type: unknown {config.patch_type!r}")
