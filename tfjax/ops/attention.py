"""Attention entry point: one signature, several implementations.

`attention(q, k, v, segment_ids, image_ids, impl=...)` computes softmax
attention under the Transfusion mask (see `mask.py`). `impl="xla"` is the plain
reference every kernel is held against (kernels/reference.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tfjax.ops.kernels import api
from tfjax.ops.kernels.reference import xla_attention
from tfjax.ops.mask import transfusion_mask

IMPLEMENTATIONS = ("xla", "pallas", "auto")


def _check_impl(impl: str) -> None:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}"
                     " (config key model.attention_impl)")


def attention_plan(segment_ids: jax.Array, image_ids: jax.Array, *, head_dim: int,
                   dtype=jnp.bfloat16, impl: str = "xla"):
  """What the kernel derives from the mask (key intervals, work lists), built
  once per batch and passed to every layer's `attention(..., plan=)`; None
  where `impl` resolves to the XLA reference. See api.AttentionPlan."""
  _check_impl(impl)
  if impl == "xla":
    return None
  return api.plan(segment_ids, image_ids, head_dim=head_dim, dtype=dtype, impl=impl)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              image_ids: jax.Array, impl: str = "xla",
              scale: float | None = None, plan=None, mask: jax.Array | None = None) -> jax.Array:
  """Self-attention over a packed Transfusion sequence.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids: int[batch, seq] document ids, 0 = padding.
    image_ids: int[batch, seq] image ids, 0 = not an image patch. Pass zeros
      for plain document-causal attention.
    impl: "xla" (reference), "pallas" (block-sparse kernel), "auto".
    plan: `attention_plan(segment_ids, image_ids, ...)` of this batch (kernel
      paths; None: the call builds its own).
    mask: `transfusion_mask(segment_ids, image_ids)`, bool[batch, seq, seq],
      built once per batch and shared by every layer where `impl` resolves to
      the XLA reference (`attention_plan` gave None); None: the call builds
      its own. Ignored when a plan is given.
  """
  _check_impl(impl)
  if impl == "xla" or (plan is None and mask is not None):
    if mask is None:
      mask = transfusion_mask(segment_ids, image_ids)
    return xla_attention(q, k, v, mask, scale)
  return api.attention(q, k, v, segment_ids, image_ids, impl=impl, scale=scale, plan=plan)
