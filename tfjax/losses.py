"""The Transfusion objective: L = L_LM + lambda * L_DDPM.

L_LM is next-token cross-entropy averaged over the scored text positions
(`text_loss_mask`: never where the input is BOI, a patch or padding). L_DDPM is
the per-image mean squared error of the noise (or, for the flow objective,
velocity) prediction, averaged over the noised images. Images enter noised at
one timestep each; images that precede their caption are noised at most to
`diffusion.max_t_image_first`. Caption dropout (for classifier-free guidance)
cuts a caption-first image off from its caption by giving the image (from its
BOI on) a document of its own, so it is trained unconditionally while the
sequence stays packed and contiguous.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tfjax.batch import Batch
from tfjax.diffusion import add_noise, cosine_alphas_cumprod, sample_timesteps


def drop_captions(rng: jax.Array, batch: Batch, rate: float) -> jax.Array:
  """segment_ids with dropped captions: int32[batch, seq].

  Each valid, caption-first, noised image is dropped with probability `rate`:
  its BOI and everything after it in its document move to a fresh segment id.
  """
  if rate <= 0.0:
    return batch.segment_ids
  seq = batch.segment_ids.shape[1]
  droppable = batch.image_valid & ~batch.image_before_caption & ~batch.image_clean
  drop = droppable & (jax.random.uniform(rng, droppable.shape) < rate)   # [b, n]
  boi = jnp.maximum(batch.image_starts - 1, 0)                          # [b, n]
  boi_segment = jnp.take_along_axis(batch.segment_ids, boi, axis=1)     # [b, n]
  idx = jnp.arange(seq)[None, None, :]
  in_span = (drop[..., None] & (idx >= boi[..., None])
             & (batch.segment_ids[:, None, :] == boi_segment[..., None]))  # [b, n, s]
  # A fresh id per dropped image, above every id packing can produce.
  slot = jnp.arange(1, droppable.shape[1] + 1)[None, :, None]
  fresh = jnp.max(jnp.where(in_span, seq + slot, 0), axis=1)             # [b, s]
  return jnp.where(fresh > 0, fresh, batch.segment_ids).astype(jnp.int32)


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy over masked positions, number of masked positions)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1), count


def diffusion_loss(pred: jax.Array, target: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean over weighted images of the per-image MSE, number of images).

  pred, target: [batch, max_images, h, w, c]; weight: bool [batch, max_images].
  """
  per_image = jnp.mean(jnp.square(pred - target), axis=(2, 3, 4))
  count = jnp.sum(weight)
  return jnp.sum(per_image * weight) / jnp.maximum(count, 1), count


def noise_images(rng: jax.Array, batch: Batch, config: ml_collections.ConfigDict):
  """(noisy latents, model timesteps, regression target) for every image slot."""
  d = config.diffusion
  t_rng, n_rng = jax.random.split(rng)
  timesteps = sample_timesteps(t_rng, batch.image_before_caption,
                               num_timesteps=d.num_timesteps,
                               max_t_image_first=d.max_t_image_first, objective=d.objective)
  x0 = batch.image_latents.astype(jnp.float32)
  noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
  noisy, target = add_noise(x0, noise, timesteps, cosine_alphas_cumprod(d.num_timesteps),
                            d.objective, d.num_timesteps)
  clean = batch.image_clean[..., None, None, None]
  noisy = jnp.where(clean, x0, noisy)
  timesteps = jnp.where(batch.image_clean, 0.0, timesteps)
  return noisy, timesteps, target


def transfusion_loss(params: Any, batch: Batch, rng: jax.Array, *, model: nn.Module,
                     config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss and metrics (loss, loss_lm, loss_diffusion, num_text_tokens, num_images)."""
  noise_rng, drop_rng = jax.random.split(rng)
  noisy, timesteps, target = noise_images(noise_rng, batch, config)
  segment_ids = drop_captions(drop_rng, batch, config.diffusion.caption_dropout)
  out = model.apply({"params": params}, batch.tokens, batch.positions, segment_ids,
                    batch.image_ids, noisy, timesteps, batch.image_starts, batch.image_valid)
  loss_lm, num_text = lm_loss(out.logits, batch.text_targets, batch.text_loss_mask)
  scored_images = batch.image_valid & ~batch.image_clean
  loss_diff, num_images = diffusion_loss(out.image_out, target, scored_images)
  loss = loss_lm + config.diffusion.loss_weight * loss_diff
  metrics = dict(loss=loss, loss_lm=loss_lm, loss_diffusion=loss_diff,
                 num_text_tokens=num_text.astype(jnp.float32),
                 num_images=num_images.astype(jnp.float32))
  return loss, metrics
