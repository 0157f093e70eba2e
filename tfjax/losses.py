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
  if rate <= 0.0 or batch.image_valid.shape[1] == 0:  # nothing to drop (text-only batches)
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


def chunked_lm_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                    chunk: int) -> tuple[jax.Array, jax.Array]:
  """`lm_loss` of `hidden @ head` without the float32 [batch, seq, vocab] logits.

  hidden: [batch, seq, dim]; head: [dim, vocab]; targets, mask: [batch, seq].
  Each row's scored positions are moved to its front (a stable sort, so the
  batch axis keeps its sharding), then the head and the cross-entropy run over
  `chunk` positions of every row at a time, rematerialised in the backward
  pass. A chunk past every row's last scored position is skipped, so image and
  padding positions cost no head FLOPs beyond the last chunk's remainder.
  """
  batch, seq, dim = hidden.shape
  num_chunks = -(-seq // chunk)
  pad = num_chunks * chunk - seq
  order = jnp.argsort(~mask.astype(bool), axis=1, stable=True)           # [b, s]
  h = jnp.take_along_axis(hidden, order[..., None], axis=1)
  t = jnp.take_along_axis(targets, order, axis=1)
  m = jnp.take_along_axis(mask.astype(jnp.float32), order, axis=1)
  h, t, m = (jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in (h, t, m))
  per_chunk = lambda x: jnp.swapaxes(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 0, 1)
  longest = jnp.max(jnp.sum(mask.astype(jnp.int32), axis=1))

  @jax.checkpoint
  def chunk_nll(h_c, t_c, m_c):                                           # [b, chunk, ...]
    logits = jnp.einsum("bcd,dv->bcv", h_c, head, preferred_element_type=jnp.float32)
    target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(m_c > 0, jax.nn.logsumexp(logits, axis=-1) - target, 0.0))

  def body(total, xs):
    i, h_c, t_c, m_c = xs
    part = jax.lax.cond(i * chunk < longest, chunk_nll, lambda *_: jnp.float32(0.0),
                        h_c, t_c, m_c)
    return total + part, None

  total, _ = jax.lax.scan(body, jnp.float32(0.0),
                          (jnp.arange(num_chunks), per_chunk(h), per_chunk(t), per_chunk(m)))
  count = jnp.sum(mask)
  return total / jnp.maximum(count, 1), count


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
  with jax.named_scope("diffusion"):
    noisy, timesteps, target = noise_images(noise_rng, batch, config)
  segment_ids = drop_captions(drop_rng, batch, config.diffusion.caption_dropout)
  chunk = config.model.get("lm_head_chunk", 0)
  out = model.apply({"params": params}, batch.tokens, batch.positions, segment_ids,
                    batch.image_ids, noisy, timesteps, batch.image_starts, batch.image_valid,
                    return_logits=not chunk)
  with jax.named_scope("lm_head"):
    if chunk:
      loss_lm, num_text = chunked_lm_loss(out.hidden, out.head, batch.text_targets,
                                          batch.text_loss_mask, chunk)
    else:
      loss_lm, num_text = lm_loss(out.logits, batch.text_targets, batch.text_loss_mask)
  scored_images = batch.image_valid & ~batch.image_clean
  with jax.named_scope("diffusion"):
    loss_diff, num_images = diffusion_loss(out.image_out, target, scored_images)
  loss = loss_lm + config.diffusion.loss_weight * loss_diff
  metrics = dict(loss=loss, loss_lm=loss_lm, loss_diffusion=loss_diff,
                 num_text_tokens=num_text.astype(jnp.float32),
                 num_images=num_images.astype(jnp.float32))
  return loss, metrics
