"""Llama building blocks: RMSNorm, SwiGLU, rotary position embeddings.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), so
the trainer maps them onto a mesh through `config.mesh.rules`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any


def dense_init(axes: tuple[str, ...], scale: float = 1.0, fan_in_axes: tuple[int, ...] = (0,)):
  """Truncated-normal init with fan-in scaling, tagged with logical axes."""
  init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=fan_in_axes, out_axis=-1)
  return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis; statistics in float32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale).astype(self.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): [batch, seq, dim] -> [batch, seq, dim]."""
  hidden: int
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    w_gate = self.param("w_gate", dense_init(("embed", "mlp")), (dim, self.hidden),
                        self.param_dtype)
    w_up = self.param("w_up", dense_init(("embed", "mlp")), (dim, self.hidden), self.param_dtype)
    gate = checkpoint_name(x @ w_gate.astype(self.dtype), "mlp_gate")
    up = checkpoint_name(x @ w_up.astype(self.dtype), "mlp_up")
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "seq", "mlp"))
    wo = self.param("wo", dense_init(("mlp", "embed")), (self.hidden, dim), self.param_dtype)
    return checkpoint_name(jnp.einsum("bsf,fd->bsd", h, wo.astype(self.dtype)), "mlp_out")


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """float32[head_dim // 2] rotation frequencies."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate pairs (x[..., :d/2], x[..., d/2:]) by position * frequency.

  Args:
    x: [batch, seq, heads, head_dim].
    positions: int[batch, seq] (restart per document, so packed documents all
      start at position 0).
  """
  freqs = rope_frequencies(x.shape[-1], theta)
  angles = positions[:, :, None, None].astype(jnp.float32) * freqs  # [b, s, 1, d/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)
