"""Block-sparse attention kernels for TPUs: Pallas, Mosaic TPU lowering.

The Triton kernels' algorithm (triton.py) in the TPU's grid model: grid
(batch, q head, outer block, inner step), the inner step walking the outer
block's compacted work list, delivered by scalar prefetch. A block spec's
index map reads the list, so the pipeline copies only non-empty tiles;
padded entries repeat the last block (no copy) and skip compute with
`pl.when`. Full tiles skip the mask.

  forward  inner = key blocks of the q block: online softmax in VMEM scratch.
  dk/dv    inner = query blocks of the key block; dk, dv accumulated per q head.
  dq       inner = key blocks of the q block.

Per-row data (key intervals, log-sum-exp, delta) is kept lane-broadcast,
[..., seq, 128]. The inner axis has the static worst-case length (the layout
is data): skipped steps copy and compute nothing but pay the per-step
overhead. Checked in Pallas TPU interpret mode (numerics) and by ahead-of-time
compiles for v5p; never run on a TPU, so no TPU timings.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tfjax.ops.kernels.block_map import WorkList, block_map, block_sparse_vjp

LANES = 128
BIG = 1e30
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class MosaicTpuConfig:
  """Tile sizes: multiples of 128 (the lane width)."""
  block_q: int = 256
  block_k: int = 256

  @property
  def multiple(self) -> int:
    return max(self.block_q, self.block_k)


def heuristic_config(head_dim: int) -> MosaicTpuConfig:
  """256x256 tiles at every head dim (untimed: no TPU was run)."""
  del head_dim
  return MosaicTpuConfig()


class Schedule(NamedTuple):
  """The kernels' work lists: per query block (forward, dq) and per key block (dk/dv)."""
  q_blocks: WorkList
  kv_blocks: WorkList


def _lanes(x):
  """int/float[batch, ..., seq] -> [batch, ..., seq, 128] (lane-broadcast)."""
  return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _mask(ks_ref, ke_ref, k0, block_k):
  ks = ks_ref[...][:, :1]
  ke = ke_ref[...][:, :1]
  kpos = k0 + jax.lax.broadcasted_iota(jnp.int32, (ks.shape[0], block_k), 1)
  return (kpos >= ks) & (kpos < ke)


def _fwd_kernel(blocks_ref, full_ref, counts_ref, q_ref, k_ref, v_ref, ks_ref, ke_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, block_k):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -BIG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(t < counts_ref[b, i])
  def _step():
    s = jax.lax.dot_general(q_ref[...], k_ref[...], NT,
                            preferred_element_type=jnp.float32) * scale
    k0 = blocks_ref[b, i, t] * block_k
    keep = jnp.logical_or(full_ref[b, i, t] == 1, _mask(ks_ref, ke_ref, k0, block_k))
    s = jnp.where(keep, s, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
    p = jnp.exp(s - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _done():
    l = l_sc[...]
    live = l > 0
    safe = jnp.where(live, l, 1.0)
    o_ref[...] = (acc_sc[...] / safe[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(live, m_sc[...] + jnp.log(safe), BIG)


def _dkv_kernel(blocks_ref, full_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, ks_ref, ke_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale,
                block_k):
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(t < counts_ref[b, j])
  def _step():
    q = q_ref[...]
    do = do_ref[...]
    s = jax.lax.dot_general(q, k_ref[...], NT, preferred_element_type=jnp.float32) * scale
    keep = jnp.logical_or(full_ref[b, j, t] == 1, _mask(ks_ref, ke_ref, j * block_k, block_k))
    p = jnp.where(keep, jnp.exp(s - lse_ref[...][:, :1]), 0.0)
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, TN,
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v_ref[...], NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...][:, :1])
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, TN,
                                      preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _done():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(blocks_ref, full_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, ks_ref, ke_ref, dq_ref, dq_sc, *, scale, block_k):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(t < counts_ref[b, i])
  def _step():
    k = k_ref[...]
    s = jax.lax.dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32) * scale
    k0 = blocks_ref[b, i, t] * block_k
    keep = jnp.logical_or(full_ref[b, i, t] == 1, _mask(ks_ref, ke_ref, k0, block_k))
    p = jnp.where(keep, jnp.exp(s - lse_ref[...][:, :1]), 0.0)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...][:, :1])
    dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _done():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _params(interpret):
  if interpret:
    return dict(interpret=pltpu.InterpretParams())
  return dict(compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")))


def schedule(k_start: jax.Array, k_end: jax.Array, cfg: MosaicTpuConfig) -> Schedule:
  """The work lists of all three kernels (one tiling) from int32[batch, seq]
  key intervals."""
  bm = block_map(k_start, k_end, cfg.block_q, cfg.block_k)
  return Schedule(q_blocks=bm.q_blocks, kv_blocks=bm.kv_blocks)


def _forward(q, k, v, ks, ke, sched, *, scale, cfg, interpret):
  """q: [batch, q_heads, seq, d]; k, v: [batch, kv_heads, seq, d]; ks/ke lane-broadcast."""
  batch, hq, seq, d = q.shape
  group = hq // k.shape[1]
  bq, bk = cfg.block_q, cfg.block_k
  wl = sched.q_blocks
  nk = seq // bk
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, t, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d),
                         lambda b, h, i, t, blk, *_: (b, h // group, blk[b, i, t], 0))
  row_spec = pl.BlockSpec((None, bq, LANES), lambda b, h, i, t, *_: (b, i, 0))
  lse_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, t, *_: (b, h, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(batch, hq, seq // bq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
      out_specs=[q_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=bk),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, hq, seq, LANES), jnp.float32)],
      name="tfjax_attention_fwd_tpu", **_params(interpret),
  )(wl.blocks, wl.full, wl.counts, q, k, v, ks, ke)


def _backward(q, k, v, o, lse, do, ks, ke, sched, *, scale, cfg, interpret):
  batch, hq, seq, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  bq, bk = cfg.block_q, cfg.block_k
  bm = sched
  delta = _lanes(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1))

  # dk/dv: outer = key blocks, inner = their query blocks.
  wl = bm.kv_blocks
  qrow = lambda b, h, j, t, blk, *_: (b, h, blk[b, j, t], 0)
  q_spec = pl.BlockSpec((None, None, bq, d), qrow)
  qlane_spec = pl.BlockSpec((None, None, bq, LANES), qrow)
  ids_spec = pl.BlockSpec((None, bq, LANES), lambda b, h, j, t, blk, *_: (b, blk[b, j, t], 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, t, *_: (b, h // group, j, 0))
  dkv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, t, *_: (b, h, j, 0))
  grad_dtype = k.dtype if group == 1 else jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_k=bk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, hq, seq // bk, seq // bq),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, qlane_spec, qlane_spec, ids_spec,
                    ids_spec],
          out_specs=[dkv_spec, dkv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, hq, seq, d), grad_dtype)] * 2,
      name="tfjax_attention_dkv_tpu", **_params(interpret),
  )(wl.blocks, wl.full, wl.counts, q, k, v, do, lse, delta, ks, ke)
  if group > 1:
    dk = dk.reshape(batch, hkv, group, seq, d).sum(axis=2).astype(k.dtype)
    dv = dv.reshape(batch, hkv, group, seq, d).sum(axis=2).astype(v.dtype)

  # dq: outer = query blocks, inner = their key blocks.
  wl = bm.q_blocks
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, t, *_: (b, h, i, 0))
  qlane_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, t, *_: (b, h, i, 0))
  ids_spec = pl.BlockSpec((None, bq, LANES), lambda b, h, i, t, *_: (b, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d),
                         lambda b, h, i, t, blk, *_: (b, h // group, blk[b, i, t], 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=bk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(batch, hq, seq // bq, seq // bk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, qlane_spec, qlane_spec, ids_spec,
                    ids_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="tfjax_attention_dq_tpu", **_params(interpret),
  )(wl.blocks, wl.full, wl.counts, q, k, v, do, lse, delta, ks, ke)
  return dq, dk, dv


_attention = block_sparse_vjp(_forward, _backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
              k_end: jax.Array, *, scale: float, config: MosaicTpuConfig | None = None,
              interpret: bool = False, sched: Schedule | None = None) -> jax.Array:
  """Block-sparse attention over per-query key intervals, differentiable.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    k_start, k_end: int32[batch, seq]; query r sees keys [k_start[r], k_end[r]).
    scale: logit scale.
    config: tile sizes; seq must be a multiple of `config.multiple`.
    interpret: Pallas TPU interpret mode (runs on CPU; tests).
    sched: `schedule(k_start, k_end, config)` computed beforehand (an
      AttentionPlan shares one across layers); built here when None.
  Returns:
    [batch, seq, q_heads, head_dim] in q's dtype; empty rows are 0.
  """
  config = config or MosaicTpuConfig()
  if q.shape[1] % config.multiple:
    raise ValueError(f"sequence length {q.shape[1]} is not a multiple of {config.multiple}")
  # The kernel wants [batch, heads, seq, head_dim]: (seq, head_dim) tiles.
  t = lambda x: jnp.swapaxes(x, 1, 2)
  k_start, k_end = k_start.astype(jnp.int32), k_end.astype(jnp.int32)
  sched = schedule(k_start, k_end, config) if sched is None else sched
  out = _attention(t(q), t(k), t(v), _lanes(k_start), _lanes(k_end), sched, float(scale),
                   config, interpret)
  return t(out)
