"""AutoencoderKL in Flax: a convolutional encoder, a diagonal Gaussian posterior
and a convolutional decoder.

The module tree mirrors the diffusers `AutoencoderKL` layout (down blocks of
ResNet blocks, a mid block with one self-attention, optional 1x1 quant convs),
so a diffusers checkpoint maps onto it by renaming alone (see
`diffusers_import.py`). Submodule names replace diffusers' `name.N` with
`name_N`: `encoder.down_blocks.0.resnets.1.conv1` here is
`encoder/down_blocks_0/resnets_1/conv1`.

Images are NHWC, `[batch, height, width, 3]` in [-1, 1]; latents are
`[batch, height / f, width / f, latent_channels]` with `f = 2 ** (len(channels) - 1)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of an AutoencoderKL (and of the VQ-VAE built around it).

  channels: one width per resolution level; `len(channels) - 1` downsamplings.
  blocks_per_level: ResNet blocks per encoder level (the decoder has one more).
  norm_groups: GroupNorm groups; must divide every entry of `channels`.
  mid_attention: single-head self-attention in the mid blocks.
  use_quant_conv / use_post_quant_conv: the 1x1 convs around the latent (SD
    has them, FLUX does not).
  """
  channels: tuple[int, ...] = (128, 256, 512, 512)
  blocks_per_level: int = 2
  latent_channels: int = 8
  norm_groups: int = 32
  mid_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  in_channels: int = 3
  out_channels: int = 3
  dtype: str = "float32"

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.channels) - 1)

  def check(self) -> "AutoencoderConfig":
    for c in self.channels:
      if c % self.norm_groups:
        raise ValueError(f"config key vae.norm_groups: {self.norm_groups} groups do not "
                         f"divide the width {c} in vae.channels={self.channels}")
    if self.blocks_per_level < 1:
      raise ValueError("config key vae.blocks_per_level: must be >= 1")
    if self.latent_channels < 1:
      raise ValueError("config key vae.latent_channels: must be >= 1")
    return self

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["channels"] = list(self.channels)
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "AutoencoderConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown autoencoder config keys {sorted(unknown)}")
    d = dict(d)
    d["channels"] = tuple(d.get("channels", cls.channels))
    return cls(**d).check()


def config_from_vae_section(v: ml_collections.ConfigDict) -> AutoencoderConfig:
  """The architecture named by the `vae` section of a tfjax config."""
  return AutoencoderConfig(
      channels=tuple(int(c) for c in v.channels),
      blocks_per_level=int(v.blocks_per_level),
      latent_channels=int(v.latent_channels),
      norm_groups=int(v.norm_groups),
      mid_attention=bool(v.mid_attention),
      use_quant_conv=bool(v.use_quant_conv),
      use_post_quant_conv=bool(v.use_post_quant_conv),
      dtype=str(v.dtype),
  ).check()


def _norm(groups: int, name: str) -> nn.GroupNorm:
  # Two-pass variance: the one-pass form loses digits that diffusers parity needs.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice plus a (1x1 projected) skip."""
  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(_norm(self.groups, "norm1")(x))
    h = nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
    h = nn.silu(_norm(self.groups, "norm2")(h))
    # Zero-initialised last conv: each block starts as the identity, which
    # trains a deep stack from scratch markedly faster (imports overwrite it).
    h = nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype,
                kernel_init=nn.initializers.zeros, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all spatial positions, with residual."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = _norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(y)
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(y)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / jnp.sqrt(c).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", weights, v)
    y = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="to_out_0")(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  features: int
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ResnetBlock(self.features, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.features, self.groups, self.dtype, name="resnets_1")(x)


class _Resample(nn.Module):
  """Holds the `conv` of a down/upsampler (diffusers' `downsamplers.0.conv`)."""
  features: int
  down: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.down:
      # Asymmetric pad (right/bottom only) then a stride-2 conv, as SD does.
      return nn.Conv(self.features, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                     dtype=self.dtype, name="conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
    return nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


class _Level(nn.Module):
  """One resolution level: ResNet blocks, then an optional resampler."""
  features: int
  blocks: int
  groups: int
  resample: str  # "down" | "up" | ""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.blocks):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.resample == "down":
      x = _Resample(self.features, True, self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = _Resample(self.features, False, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """[b, H, W, 3] -> [b, H/f, W/f, out_features] (moments or pre-quant features)."""
  config: AutoencoderConfig
  out_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt = self.config, jnp.dtype(self.config.dtype)
    x = nn.Conv(cfg.channels[0], (3, 3), padding=1, dtype=dt, name="conv_in")(x.astype(dt))
    last = len(cfg.channels) - 1
    for i, ch in enumerate(cfg.channels):
      x = _Level(ch, cfg.blocks_per_level, cfg.norm_groups, "down" if i < last else "",
                 dt, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.channels[-1], cfg.norm_groups, cfg.mid_attention, dt, name="mid_block")(x)
    x = nn.silu(_norm(cfg.norm_groups, "conv_norm_out")(x))
    return nn.Conv(self.out_features, (3, 3), padding=1, dtype=dt, name="conv_out")(x)


class Decoder(nn.Module):
  """[b, h, w, latent_channels] -> [b, h*f, w*f, 3] (unclipped)."""
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dt = self.config, jnp.dtype(self.config.dtype)
    widths = tuple(reversed(cfg.channels))
    x = nn.Conv(widths[0], (3, 3), padding=1, dtype=dt, name="conv_in")(z.astype(dt))
    x = MidBlock(widths[0], cfg.norm_groups, cfg.mid_attention, dt, name="mid_block")(x)
    last = len(widths) - 1
    for i, ch in enumerate(widths):
      x = _Level(ch, cfg.blocks_per_level + 1, cfg.norm_groups, "up" if i < last else "",
                 dt, name=f"up_blocks_{i}")(x)
    x = nn.silu(_norm(cfg.norm_groups, "conv_norm_out")(x))
    x = nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(x)
    return x.astype(jnp.float32)


@flax.struct.dataclass
class Posterior:
  """Diagonal Gaussian over latents; arrays `[b, h, w, c]`."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "Posterior":
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape)

  def kl(self) -> jax.Array:
    """KL to N(0, I) summed over latent elements: `[b]`."""
    var = jnp.exp(self.logvar)
    return 0.5 * jnp.sum(self.mean ** 2 + var - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
  """Encoder + Gaussian posterior + decoder."""
  config: AutoencoderConfig

  def setup(self):
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, 2 * cfg.latent_channels)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=dt)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=dt)

  def encode(self, images: jax.Array) -> Posterior:
    """images `[b, H, W, 3]` in [-1, 1] -> posterior over `[b, H/f, W/f, c]`."""
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return Posterior.from_moments(moments)

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents `[b, h, w, c]` (unscaled) -> images `[b, h*f, w*f, 3]`."""
    if self.config.use_post_quant_conv:
      latents = self.post_quant_conv(latents.astype(jnp.dtype(self.config.dtype)))
    return self.decoder(latents)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None
               ) -> tuple[jax.Array, Posterior]:
    """Reconstruction `[b, H, W, 3]` from a posterior sample (mean if no rng)."""
    post = self.encode(images)
    z = post.mean if rng is None else post.sample(rng)
    return self.decode(z), post


def init_params(config: AutoencoderConfig, rng: jax.Array, image_size: int = 64) -> Any:
  """Parameters for `AutoencoderKL(config)` traced on one `image_size` image."""
  x = jnp.zeros((1, image_size, image_size, config.in_channels), jnp.float32)
  return jax.jit(AutoencoderKL(config).init)(rng, x)["params"]
