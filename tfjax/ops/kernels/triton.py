"""Block-sparse attention kernels in Pallas's Triton lowering: the GPU path off Hopper.

Three kernels, each walking a compacted work list from `block_map`, so that
its time follows the number of non-empty tiles:

  forward  grid (q block, batch, q head): online softmax over the q block's
           non-empty key blocks; writes out and the base-2 log-sum-exp.
  dk/dv    grid (k block, batch, q head): over the key block's non-empty
           query blocks, per q head (a GQA group is summed afterwards).
  dq       grid (q block, batch, q head): over the q block's key blocks.

Full tiles skip the mask; partial tiles compare against the rows' key
intervals [k_start, k_end). Rows with an empty interval (padding) give zeros
and zero gradients. Layout [batch, seq, heads, head_dim], no transposes. On
CPU the same kernels run in Pallas interpret mode (tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tfjax.ops.kernels.block_map import WorkList, block_map, block_sparse_vjp

LOG2E = math.log2(math.e)
# Stands for the log-sum-exp of a row with no key: exp2(s - BIG) == 0.
BIG = 1e30


def _compiler_params(num_warps: int, num_stages: int):
  try:  # jax 0.10 / 0.11 both expose this; it is ignored in interpret mode
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  except ImportError:  # pragma: no cover
    from jax.experimental.pallas import gpu as plgpu
    return plgpu.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
  """a @ b (optionally transposed) with float32 accumulation."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  # float32 inputs get true float32 products (Triton would use tf32).
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def _row_mask(ks, ke, k0, block_k):
  """bool[block_q, block_k]: key k0 + c is inside row r's interval."""
  kpos = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return (kpos >= ks[:, None]) & (kpos < ke[:, None])


def _apply_mask(s, is_full, ks, ke, k0, block_k, skip_full_mask):
  """-inf outside the rows' intervals; full tiles pass through.

  skip_full_mask: branch around the comparisons on full tiles (lax.cond);
  otherwise fold the full flag into the mask, with no control flow in the loop.
  """
  if skip_full_mask:
    return jax.lax.cond(is_full, lambda s: s, lambda s: jnp.where(
        _row_mask(ks, ke, k0, block_k), s, -jnp.inf), s)
  return jnp.where(_row_mask(ks, ke, k0, block_k) | is_full, s, -jnp.inf)


def _fwd_kernel(blocks_ref, full_ref, counts_ref, q_ref, k_ref, v_ref, ks_ref,
                ke_ref, o_ref, lse_ref, *, scale, block_q, block_k,
                skip_full_mask):
  i, b = pl.program_id(0), pl.program_id(1)
  q = q_ref[...]
  ks = ks_ref[...]
  ke = ke_ref[...]
  qk_scale = scale * LOG2E
  bq, d = q.shape

  def body(t, carry):
    acc, m, l = carry
    kb = blocks_ref[b, i, t]
    k0 = kb * block_k
    k = k_ref[pl.ds(k0, block_k), :]
    v = v_ref[pl.ds(k0, block_k), :]
    s = _dot(q, k, trans_b=True) * qk_scale
    s = _apply_mask(s, full_ref[b, i, t] == 1, ks, ke, k0, block_k, skip_full_mask)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -BIG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, counts_ref[b, i], body, init)
  live = l > 0
  o_ref[...] = (acc / jnp.where(live, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(live, m + jnp.log2(jnp.where(live, l, 1.0)), BIG)


def _dkv_kernel(blocks_ref, full_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, ks_ref, ke_ref, dk_ref, dv_ref, *, scale, block_q,
                block_k, skip_full_mask):
  j, b = pl.program_id(0), pl.program_id(1)
  k = k_ref[...]
  v = v_ref[...]
  k0 = j * block_k
  qk_scale = scale * LOG2E
  bk, d = k.shape

  def body(t, carry):
    dk, dv = carry
    qb = blocks_ref[b, j, t]
    rows = pl.ds(qb * block_q, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    lse = lse_ref[rows]
    delta = delta_ref[rows]
    s = _dot(q, k, trans_b=True) * qk_scale
    # Masked logits become -inf, so p == 0 there (empty rows: lse == BIG).
    s = _apply_mask(s, full_ref[b, j, t] == 1, ks_ref[rows], ke_ref[rows], k0, block_k,
                    skip_full_mask)
    p = jnp.exp2(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
    return dk, dv

  init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
  dk, dv = jax.lax.fori_loop(0, counts_ref[b, j], body, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(blocks_ref, full_ref, counts_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, ks_ref, ke_ref, dq_ref, *, scale, block_q,
               block_k, skip_full_mask):
  i, b = pl.program_id(0), pl.program_id(1)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  ks = ks_ref[...]
  ke = ke_ref[...]
  qk_scale = scale * LOG2E
  bq, d = q.shape

  def body(t, dq):
    kb = blocks_ref[b, i, t]
    k0 = kb * block_k
    k = k_ref[pl.ds(k0, block_k), :]
    v = v_ref[pl.ds(k0, block_k), :]
    s = _dot(q, k, trans_b=True) * qk_scale
    s = _apply_mask(s, full_ref[b, i, t] == 1, ks, ke, k0, block_k, skip_full_mask)
    p = jnp.exp2(s - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = jax.lax.fori_loop(0, counts_ref[b, i], body, jnp.zeros((bq, d), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _whole(x):
  """BlockSpec handing the kernel a whole (small, integer) array."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


class Tiles(NamedTuple):
  """One kernel's tiling and Triton launch settings."""
  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """The three kernels' tiles; defaults: the bf16/f16 head-dim-64 shipped config."""
  fwd: Tiles = Tiles(64, 64)
  dkv: Tiles = Tiles(64, 64)
  dq: Tiles = Tiles(64, 32)
  # Branch around the mask on full tiles (lax.cond); False folds the full
  # flag into the mask instead (no control flow in the loop).
  skip_full_mask: bool = True

  @classmethod
  def uniform(cls, block_q: int, block_k: int, num_warps: int = 4,
              num_stages: int = 3) -> "TritonConfig":
    t = Tiles(block_q, block_k, num_warps, num_stages)
    return cls(fwd=t, dkv=t, dq=t)

  @property
  def multiple(self) -> int:
    """The sequence length must be a multiple of this."""
    return math.lcm(*(b for t in (self.fwd, self.dkv, self.dq) for b in t[:2]))


def heuristic_config(head_dim: int, dtype=jnp.bfloat16) -> TritonConfig:
  """The shipped tiles (H100 sweeps, tools/kernel_lab/NOTES_attention.md): float32
  products need three times the registers and shared memory (32x32 tiles,
  2 stages); the dq pass prefers narrow key tiles, 128 rows at head dim 128."""
  if jnp.dtype(dtype) == jnp.float32:
    return TritonConfig.uniform(32, 32, 4, 2)
  if head_dim <= 64:
    return TritonConfig()
  return TritonConfig(dq=Tiles(128, 32))


class BwdSchedule(NamedTuple):
  dkv: WorkList  # per key block, its query blocks, at cfg.dkv's tiles
  dq: WorkList   # per query block, its key blocks, at cfg.dq's tiles


class Schedule(NamedTuple):
  """Every work list the three kernels walk, from the key intervals alone;
  built once per batch it serves the forward, the backward and every layer
  (api.AttentionPlan). bwd is None for a forward against a KV cache."""
  fwd: WorkList
  bwd: BwdSchedule | None


def schedule(k_start: jax.Array, k_end: jax.Array, config: TritonConfig,
             kv_len: int | None = None) -> Schedule:
  """The work lists for int32[batch, seq] key intervals under `config`."""
  fwd = block_map(k_start, k_end, *config.fwd[:2], kv_len).q_blocks
  if kv_len not in (None, k_start.shape[1]):  # forward only (KV cache)
    return Schedule(fwd, None)
  return Schedule(fwd, BwdSchedule(block_map(k_start, k_end, *config.dkv[:2]).kv_blocks,
                                   block_map(k_start, k_end, *config.dq[:2]).q_blocks))


def _forward(q, k, v, ks, ke, sched, *, scale, cfg, interpret):
  batch, seq, hq, d = q.shape
  kv_len = k.shape[1]  # == seq, except for queries against a KV cache
  group = hq // k.shape[2]
  block_q, block_k, num_warps, num_stages = cfg.fwd
  wl = sched.fwd
  kernel = functools.partial(_fwd_kernel, scale=scale, block_q=block_q, block_k=block_k,
                             skip_full_mask=cfg.skip_full_mask)
  return pl.pallas_call(
      kernel,
      grid=(seq // block_q, batch, hq),
      in_specs=[
          _whole(wl.blocks), _whole(wl.full), _whole(wl.counts),
          pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_len, None, d), lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((None, kv_len, None, d), lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, hq, seq), jnp.float32)],
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="tfjax_attention_fwd",
  )(wl.blocks, wl.full, wl.counts, q, k, v, ks, ke)


def _backward(q, k, v, o, lse, do, ks, ke, sched, *, scale, cfg, interpret):
  batch, seq, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  block_q, block_k, num_warps, num_stages = cfg.dkv
  params = _compiler_params(num_warps, num_stages)
  whole_q = pl.BlockSpec((None, seq, None, d), lambda j, b, h: (b, 0, h, 0))
  row_vec = pl.BlockSpec((None, None, seq), lambda j, b, h: (b, h, 0))
  whole_row = pl.BlockSpec((None, seq), lambda j, b, h: (b, 0))
  kv_block = pl.BlockSpec((None, block_k, None, d), lambda j, b, h: (b, j, h // group, 0))
  dkv_block = pl.BlockSpec((None, block_k, None, d), lambda j, b, h: (b, j, h, 0))
  grad_dtype = k.dtype if group == 1 else jnp.float32
  wl = sched.bwd.dkv
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_q=block_q, block_k=block_k,
                        skip_full_mask=cfg.skip_full_mask),
      grid=(seq // block_k, batch, hq),
      in_specs=[_whole(wl.blocks), _whole(wl.full), _whole(wl.counts), whole_q,
                kv_block, kv_block, whole_q, row_vec, row_vec, whole_row, whole_row],
      out_specs=[dkv_block, dkv_block],
      out_shape=[jax.ShapeDtypeStruct((batch, seq, hq, d), grad_dtype)] * 2,
      compiler_params=params, interpret=interpret, name="tfjax_attention_dkv",
  )(wl.blocks, wl.full, wl.counts, q, k, v, do, lse, delta, ks, ke)
  if group > 1:
    dk = dk.reshape(batch, seq, hkv, group, d).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(batch, seq, hkv, group, d).sum(axis=3).astype(v.dtype)

  block_q, block_k, num_warps, num_stages = cfg.dq
  params = _compiler_params(num_warps, num_stages)
  wl = sched.bwd.dq
  q_block = pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0))
  whole_kv = pl.BlockSpec((None, seq, None, d), lambda i, b, h: (b, 0, h // group, 0))
  q_vec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  q_row = pl.BlockSpec((None, block_q), lambda i, b, h: (b, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k,
                        skip_full_mask=cfg.skip_full_mask),
      grid=(seq // block_q, batch, hq),
      in_specs=[_whole(wl.blocks), _whole(wl.full), _whole(wl.counts), q_block,
                whole_kv, whole_kv, q_block, q_vec, q_vec, q_row, q_row],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="tfjax_attention_dq",
  )(wl.blocks, wl.full, wl.counts, q, k, v, do, lse, delta, ks, ke)
  return dq, dk, dv


_attention = block_sparse_vjp(_forward, _backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
              k_end: jax.Array, *, scale: float, config: TritonConfig | None = None,
              interpret: bool = False, sched: Schedule | None = None) -> jax.Array:
  """Block-sparse attention over per-query key intervals, differentiable.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    k_start, k_end: int32[batch, seq]; query r sees keys [k_start[r], k_end[r]).
    scale: logit scale (usually head_dim ** -0.5).
    config: tiles; seq must be a multiple of `config.multiple`.
    interpret: run in Pallas interpret mode (CPU tests).
    sched: `schedule(k_start, k_end, config)` computed beforehand (an
      AttentionPlan shares one across layers); built here when None.
  Returns:
    [batch, seq, q_heads, head_dim] in q's dtype; empty rows are 0.
  """
  config = config or heuristic_config(q.shape[-1], q.dtype)
  if q.shape[1] % config.multiple:
    raise ValueError(f"sequence length {q.shape[1]} is not a multiple of {config.multiple}")
  sched = schedule(k_start, k_end, config) if sched is None else sched
  return _attention(q, k, v, k_start, k_end, sched, float(scale), config, interpret)


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
                      k_end: jax.Array, *, scale: float, config: TritonConfig | None = None,
                      interpret: bool = False) -> jax.Array:
  """Forward only, with fewer queries than keys (decoding against a KV cache).

  q: [batch, seq, q_heads, head_dim] (seq a multiple of the forward block_q);
  k, v: [batch, kv_len, kv_heads, head_dim] (kv_len a multiple of block_k);
  k_start/k_end int32[batch, seq] index into the kv_len keys.
  """
  config = config or heuristic_config(q.shape[-1], q.dtype)
  sched = schedule(k_start, k_end, config, kv_len=k.shape[1])
  out, _ = _forward(q, k, v, k_start, k_end, sched, scale=float(scale), cfg=config,
                    interpret=interpret)
  return out
