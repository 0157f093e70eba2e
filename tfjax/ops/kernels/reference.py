"""The XLA reference attention every kernel is held against.

Plain masked softmax attention with grouped-query heads, in float32 logits:
what `impl="xla"` runs, and the fallback where no kernel applies.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
