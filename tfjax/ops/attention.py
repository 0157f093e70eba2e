"""Attention entry point: one signature, several implementations.

`attention(q, k, v, segment_ids, image_ids, impl=...)` computes softmax
attention under the Transfusion mask (see `mask.py`). `impl="xla"` is the plain
reference every kernel is held against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tfjax.ops.mask import transfusion_mask

IMPLEMENTATIONS = ("xla", "pallas", "auto")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  scale: float | None = None) -> jax.Array:
  """Masked softmax attention with grouped-query heads.

  Args:
    q: [batch, q_len, q_heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim], q_heads % kv_heads == 0.
    mask: bool[batch, q_len, kv_len].
  Returns:
    [batch, q_len, q_heads, head_dim] in q's dtype; rows with no allowed key are 0.
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
  group = q_heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                      preferred_element_type=jnp.float32) * scale
  allowed = mask[:, None, None, :, :]
  logits = jnp.where(allowed, logits, -1e30)
  logits_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits_max))
  weights = jnp.where(allowed, weights, 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  # Fully masked rows (padding) have denom 0: give them zeros, not NaN.
  probs = weights / jnp.maximum(denom, 1e-30)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)


def _check_impl(impl: str) -> None:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}"
                     " (config key model.attention_impl)")


def attention_plan(segment_ids: jax.Array, image_ids: jax.Array, *, head_dim: int,
                   dtype=jnp.bfloat16, impl: str = "xla"):
  """What the kernel derives from the mask (key intervals, work lists), built
  once per batch and passed to every layer's `attention(..., plan=)`; None
  where `impl` resolves to the XLA reference. See dispatch.AttentionPlan."""
  _check_impl(impl)
  if impl == "xla":
    return None
  from tfjax.ops.kernels import dispatch  # pylint: disable=g-import-not-at-top
  return dispatch.plan(segment_ids, image_ids, head_dim=head_dim, dtype=dtype, impl=impl)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              image_ids: jax.Array, impl: str = "xla",
              scale: float | None = None, plan=None) -> jax.Array:
  """Self-attention over a packed Transfusion sequence.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids: int[batch, seq] document ids, 0 = padding.
    image_ids: int[batch, seq] image ids, 0 = not an image patch. Pass zeros
      for plain document-causal attention.
    impl: "xla" (reference), "pallas" (block-sparse kernel), "auto".
    plan: `attention_plan(segment_ids, image_ids, ...)` of this batch (kernel
      paths; None: the call builds its own).
  """
  _check_impl(impl)
  if impl == "xla":
    return xla_attention(q, k, v, transfusion_mask(segment_ids, image_ids), scale)
  from tfjax.ops.kernels import dispatch  # pylint: disable=g-import-not-at-top
  return dispatch.attention(q, k, v, segment_ids, image_ids, impl=impl, scale=scale, plan=plan)
