"""Text perplexity on held-out packed batches.

Perplexity = exp(total negative log-likelihood / number of scored tokens),
accumulated over all batches (not a mean of per-batch perplexities), scored
exactly where the Batch's `text_loss_mask` says a text prediction counts.
Images in the batches enter clean (timestep 0), as context only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from tfjax.batch import Batch


def text_nll(logits: jax.Array, targets: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target), number of scored tokens), float32 scalars.

  Args:
    logits: float[batch, seq, vocab].
    targets: int[batch, seq] next-token ids.
    mask: bool[batch, seq] which positions are scored.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return -jnp.sum(picked * mask), jnp.sum(mask)


def batch_nll_fn(model: Any) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """A jitted `(params, batch) -> (nll_sum, count)` for a Transfusion model."""

  @jax.jit
  def fn(params, batch: Batch):
    timesteps = jnp.zeros(batch.image_valid.shape, jnp.float32)
    out = model.apply({"params": params}, batch.tokens, batch.positions, batch.segment_ids,
                      batch.image_ids, batch.image_latents, timesteps, batch.image_starts,
                      batch.image_valid)
    return text_nll(out.logits, batch.text_targets, batch.text_loss_mask)

  return fn


def perplexity(model: Any, params: Any, batches: Iterable[Batch],
               max_batches: int | None = None) -> dict[str, float]:
  """Corpus perplexity of `model` over `batches`.

  Returns:
    {"perplexity", "nll_per_token", "num_tokens", "num_batches"}.
  Raises:
    ValueError when the batches hold no scored token.
  """
  fn = batch_nll_fn(model)
  total, count, n = 0.0, 0.0, 0
  for batch in batches:
    if max_batches is not None and n >= max_batches:
      break
    s, c = fn(params, batch)
    total += float(s)
    count += float(c)
    n += 1
  if count == 0:
    raise ValueError(f"perplexity: {n} held-out batches contain no scored text token "
                     "(text_loss_mask is all False)")
  nll = total / count
  return {"perplexity": math.exp(nll), "nll_per_token": nll, "num_tokens": int(count),
          "num_batches": n}
