"""VQ-VAE: the AutoencoderKL encoder/decoder around a vector-quantised bottleneck.

It yields the discrete image tokens of the Chameleon baseline. The encoder's
features are projected to `codebook_dim` (8) dims and snapped to the nearest of
`codebook_size` codes; lookup is by cosine similarity (both sides
l2-normalised), which keeps far more of a large codebook in use than raw
Euclidean lookup does. Gradients pass the quantiser straight through; the
codebook learns from `||sg(z) - e||^2` and the encoder is held near its code by
`beta * ||z - sg(e)||^2`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfjax.vae.autoencoder import AutoencoderConfig, Decoder, Encoder


def _l2norm(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class VQVAE(nn.Module):
  config: AutoencoderConfig
  codebook_size: int = 16384
  codebook_dim: int = 8
  beta: float = 0.25

  def setup(self):
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, cfg.latent_channels)
    self.decoder = Decoder(cfg)
    self.quant_proj = nn.Conv(self.codebook_dim, (1, 1), dtype=dt)
    self.post_quant_proj = nn.Conv(cfg.latent_channels, (1, 1), dtype=dt)
    self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                               (self.codebook_size, self.codebook_dim), jnp.float32)

  def _project(self, images: jax.Array) -> jax.Array:
    """images `[b, H, W, 3]` -> normalised features `[b, h, w, codebook_dim]`."""
    return _l2norm(self.quant_proj(self.encoder(images)).astype(jnp.float32))

  def _lookup(self, z: jax.Array) -> jax.Array:
    """Nearest code ids `[b, h, w]` for normalised features `[b, h, w, d]`."""
    sims = jnp.einsum("bhwd,kd->bhwk", z, _l2norm(self.codebook))
    return jnp.argmax(sims, axis=-1).astype(jnp.int32)

  def encode_tokens(self, images: jax.Array) -> jax.Array:
    """images `[b, H, W, 3]` in [-1, 1] -> code ids int32 `[b, H/f, W/f]`."""
    return self._lookup(self._project(images))

  def embed(self, ids: jax.Array) -> jax.Array:
    """code ids `[b, h, w]` -> code vectors `[b, h, w, codebook_dim]`."""
    return _l2norm(self.codebook)[ids]

  def decode_latents(self, codes: jax.Array) -> jax.Array:
    """code vectors `[b, h, w, codebook_dim]` -> images `[b, h*f, w*f, 3]`."""
    return self.decoder(self.post_quant_proj(codes.astype(jnp.dtype(self.config.dtype))))

  def decode_tokens(self, ids: jax.Array) -> jax.Array:
    """code ids `[b, h, w]` -> images `[b, h*f, w*f, 3]`."""
    return self.decode_latents(self.embed(ids))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction `[b, H, W, 3]` and {'vq_loss': scalar, 'ids': [b, h, w]}."""
    z = self._project(images)
    ids = self._lookup(z)
    e = _l2norm(self.codebook)[ids]
    codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - e) ** 2)
    commit_loss = jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
    zq = z + jax.lax.stop_gradient(e - z)   # straight-through estimator
    recon = self.decode_latents(zq)
    return recon, {"vq_loss": codebook_loss + self.beta * commit_loss, "ids": ids}


def codebook_usage(ids: jax.Array, codebook_size: int) -> dict[str, float]:
  """Fraction of codes used and perplexity of the code histogram of `ids` (any shape)."""
  counts = jnp.bincount(ids.reshape(-1), length=codebook_size)
  p = counts / jnp.maximum(counts.sum(), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"codebook_usage": float(jnp.mean(counts > 0)),
          "codebook_perplexity": float(jnp.exp(entropy))}
