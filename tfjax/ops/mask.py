"""The Transfusion attention mask, defined once.

A query q may attend to key k iff both lie in the same non-padding document and
either k comes no later than q (causal) or both are patches of the same image
(bidirectional inside an image). Padding (segment id 0) attends to nothing.

`key_ranges` gives the same mask as one key interval per query, the form the
block-sparse kernels use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def transfusion_mask(segment_ids: jax.Array, image_ids: jax.Array,
                     kv_segment_ids: jax.Array | None = None,
                     kv_image_ids: jax.Array | None = None,
                     q_positions: jax.Array | None = None,
                     kv_positions: jax.Array | None = None) -> jax.Array:
  """bool[batch, q, k]: True where query q may attend to key k.

  Args:
    segment_ids: int[batch, q] document id per query position (0 = padding).
    image_ids: int[batch, q] image id per query position (0 = not an image patch).
    kv_segment_ids, kv_image_ids: int[batch, k] the same for keys; default to
      the query arrays (self-attention over one sequence).
    q_positions, kv_positions: int[batch, q] / int[batch, k] absolute positions
      used for the causal part; default to arange. Decoding with a KV cache
      passes them so a few new queries can be masked against a long cache.
  """
  if kv_segment_ids is None:
    kv_segment_ids, kv_image_ids = segment_ids, image_ids
  if q_positions is None:
    q_positions = jnp.arange(segment_ids.shape[1])[None, :]
  if kv_positions is None:
    kv_positions = jnp.arange(kv_segment_ids.shape[1])[None, :]
  same_doc = (segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
      segment_ids[:, :, None] != 0)
  causal = kv_positions[:, None, :] <= q_positions[:, :, None]
  same_image = (image_ids[:, :, None] == kv_image_ids[:, None, :]) & (
      image_ids[:, :, None] != 0)
  return same_doc & (causal | same_image)


def causal_mask(segment_ids: jax.Array) -> jax.Array:
  """bool[batch, q, k]: document-causal mask (the intra-image-causal ablation)."""
  return transfusion_mask(segment_ids, jnp.zeros_like(segment_ids))


def key_ranges(segment_ids: jax.Array, image_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The mask as one half-open key interval per query, in one vectorised pass.

  Returns (k_start, k_end), int32[batch, seq], with query q allowed exactly the
  keys k_start[q] <= k < k_end[q]. k_start is the first position of q's
  document; k_end is q + 1 for text and one past the image's last patch for
  image patches. Padding rows get the empty interval [0, 0).

  Requires documents and images to be contiguous runs (which packing ensures).
  """
  _, seq = segment_ids.shape
  idx = jnp.arange(seq, dtype=jnp.int32)[None, :]
  new_doc = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  k_start = jax.lax.cummax(jnp.where(new_doc, idx, 0), axis=1)
  # Image end: scan from the right for the last position of each image run.
  ends_run = jnp.concatenate(
      [(image_ids[:, 1:] != image_ids[:, :-1]) | (segment_ids[:, 1:] != segment_ids[:, :-1]),
       jnp.ones_like(image_ids[:, :1], bool)], axis=1)
  run_end = jax.lax.cummin(jnp.where(ends_run, idx, seq), axis=1, reverse=True)
  k_end = jnp.where(image_ids != 0, run_end + 1, idx + 1)
  padding = segment_ids == 0
  return (jnp.where(padding, 0, k_start).astype(jnp.int32),
          jnp.where(padding, 0, k_end).astype(jnp.int32))
