"""Block-sparse attention on Hopper GPUs: the Mosaic GPU forward and backward as one op.

`attention` pairs the forward kernel (mosaic_gpu_fwd.py) with the backward
(mosaic_gpu_vjp.py) in a custom_vjp; the backward reads the forward's base-2
log-sum-exp. `schedule` builds both passes' work lists from the key
intervals, once per batch (api.AttentionPlan).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tfjax.ops.kernels import mosaic_gpu_fwd, mosaic_gpu_vjp
from tfjax.ops.kernels.block_map import block_sparse_vjp
from tfjax.ops.kernels.mosaic_gpu_fwd import FwdConfig, supported  # noqa: F401 (re-export)
from tfjax.ops.kernels.mosaic_gpu_vjp import VjpConfig


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig:
  """The forward's and the backward's configs (defaults: head dim 128's)."""
  fwd: FwdConfig = FwdConfig()
  vjp: VjpConfig = VjpConfig()

  @property
  def multiple(self) -> int:
    """The sequence length must be a multiple of this."""
    return math.lcm(self.fwd.multiple, self.vjp.multiple)


def heuristic_config(head_dim: int, seq_len: int | None = None) -> MosaicGpuConfig:
  """The shipped kernels for a head dim and query rows per sequence (None: unknown)."""
  return MosaicGpuConfig(mosaic_gpu_fwd.heuristic_config(head_dim, seq_len),
                         mosaic_gpu_vjp.heuristic_config(head_dim))


class Schedule(NamedTuple):
  """Both passes' work lists, from the key intervals alone."""
  fwd: mosaic_gpu_fwd.FwdSchedule
  bwd: mosaic_gpu_vjp.BwdSchedule


def schedule(k_start: jax.Array, k_end: jax.Array, config: MosaicGpuConfig) -> Schedule:
  """The work lists for int32[batch, seq] key intervals under `config`."""
  return Schedule(mosaic_gpu_fwd.fwd_schedule(k_start, k_end, config.fwd),
                  mosaic_gpu_vjp.bwd_schedule(k_start, k_end, config.vjp))


def settle(sched: Schedule, config: MosaicGpuConfig) -> Schedule:
  """A concrete schedule with its data-dependent choice (the dS^T buffer's
  fit) made on the host now; traced ones unchanged."""
  return sched._replace(bwd=mosaic_gpu_vjp.settle(sched.bwd, config.vjp))


def _forward(q, k, v, ks, ke, sched, *, scale, cfg, interpret):
  del interpret  # there is no interpret mode
  return mosaic_gpu_fwd.forward(q, k, v, ks, ke, scale=scale, cfg=cfg.fwd, sched=sched.fwd)


def _backward(q, k, v, o, lse, do, ks, ke, sched, *, scale, cfg, interpret):
  del interpret
  return mosaic_gpu_vjp.backward(q, k, v, o, lse, do, ks, ke, scale=scale, cfg=cfg.vjp,
                                 sched=sched.bwd)


_attention = block_sparse_vjp(_forward, _backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
              k_end: jax.Array, *, scale: float, config: MosaicGpuConfig | None = None,
              sched: Schedule | None = None) -> jax.Array:
  """Block-sparse attention over per-query key intervals, differentiable.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim],
      bf16 or f16, head dim 64 or 128.
    k_start, k_end: int32[batch, seq]; query r sees keys [k_start[r], k_end[r]).
    scale: logit scale (usually head_dim ** -0.5).
    config: the kernels' tiles; seq must be a multiple of `config.multiple`.
    sched: `schedule(k_start, k_end, config)` computed beforehand (an
      AttentionPlan shares one across layers); built here when None.
  Returns:
    [batch, seq, q_heads, head_dim] in q's dtype; empty rows are 0.
  """
  config = config or heuristic_config(q.shape[-1], q.shape[1])
  if q.shape[1] % config.multiple:
    raise ValueError(f"sequence length {q.shape[1]} is not a multiple of {config.multiple}")
  if not supported(q.dtype, q.shape[-1]):
    raise ValueError(f"the Mosaic GPU kernels take bf16/f16 and head dims 64/128, got "
                     f"{jnp.dtype(q.dtype).name}/{q.shape[-1]}")
  sched = schedule(k_start, k_end, config) if sched is None else sched
  return _attention(q, k, v, k_start, k_end, sched, float(scale), config, False)
