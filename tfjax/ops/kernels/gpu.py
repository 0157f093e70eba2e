"""Block-sparse Transfusion attention for GPUs: Pallas, Triton lowering.

Three kernels, each walking a compacted work list from `block_map` so that
its time follows the number of non-empty tiles:

  forward  grid (q block, batch, q head): online softmax over the q block's
           non-empty key blocks; writes out and the base-2 log-sum-exp.
  dk/dv    grid (k block, batch, q head): over the key block's non-empty
           query blocks; per q head (a GQA group is summed afterwards).
  dq       grid (q block, batch, q head): over the q block's key blocks.

The lists come from `schedule(k_start, k_end, config)` (the Mosaic kernels'
too, when the config selects them), built inside `attention` or once per
batch in a `dispatch.AttentionPlan` shared by every layer.

Full tiles skip the mask; partial tiles build it from two comparisons against
the per-row key interval [k_start, k_end). Rows with an empty interval
(padding) give zeros and zero gradients.

Layout is the model's, [batch, seq, heads, head_dim]; no transposes. On CPU
the same kernels run in Pallas interpret mode (tests only). Under GQA the dk/dv
kernel writes float32 gradients per q head, summed over the group afterwards
(an extra [batch, seq, q_heads, head_dim] float32 pair in memory).

Run on an H100 with JAX 0.11.2 (tests pass; timings in benchmarks/RESULTS.md,
tuning in benchmarks/NOTES_attention.md). The Triton lowering is deprecated
in JAX 0.11 (it warns); a Mosaic GPU version is the way to more speed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

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


class TritonBwdSchedule(NamedTuple):
  dkv: WorkList  # per key block, its query blocks, at cfg.dkv's tiles
  dq: WorkList   # per query block, its key blocks, at cfg.dq's tiles


class Schedule(NamedTuple):
  """Every work list the config's kernels walk, from the key intervals alone.

  fwd: WorkList (Triton) or gpu_mosaic.FwdSchedule; bwd: TritonBwdSchedule or
  gpu_mosaic_bwd.BwdSchedule. Computed once per batch it serves the forward,
  the backward and every layer (dispatch.AttentionPlan).
  """
  fwd: Any
  bwd: Any


def _mosaic(config: "GpuConfig", interpret: bool) -> tuple[bool, bool]:
  """(Mosaic forward, Mosaic backward) for this config."""
  fwd = bool(config.mosaic_fwd) and not interpret
  return fwd, fwd and bool(config.mosaic_bwd)


def schedule(k_start: jax.Array, k_end: jax.Array, config: "GpuConfig",
             interpret: bool = False, kv_len: int | None = None) -> Schedule:
  """The work lists for int32[batch, seq] key intervals under `config`."""
  mosaic_fwd, mosaic_bwd = _mosaic(config, interpret)
  if mosaic_fwd:
    from tfjax.ops.kernels import gpu_mosaic
    fwd = gpu_mosaic.fwd_schedule(k_start, k_end, gpu_mosaic.MosaicFwdConfig(*config.mosaic_fwd),
                                  kv_len)
  else:
    fwd = block_map(k_start, k_end, *config.fwd[:2], kv_len).q_blocks
  if kv_len not in (None, k_start.shape[1]):  # forward only (KV cache)
    return Schedule(fwd, None)
  if mosaic_bwd:
    from tfjax.ops.kernels import gpu_mosaic_bwd
    bwd = gpu_mosaic_bwd.bwd_schedule(
        k_start, k_end, gpu_mosaic_bwd.MosaicBwdConfig(*config.mosaic_bwd))
  else:
    bwd = TritonBwdSchedule(block_map(k_start, k_end, *config.dkv[:2]).kv_blocks,
                            block_map(k_start, k_end, *config.dq[:2]).q_blocks)
  return Schedule(fwd, bwd)


def settle(sched: Schedule, config: "GpuConfig") -> Schedule:
  """A concrete schedule with its data-dependent kernel choices made on the
  host now (`gpu_mosaic_bwd.settle`); traced ones unchanged."""
  from tfjax.ops.kernels import gpu_mosaic_bwd
  if not isinstance(sched.bwd, gpu_mosaic_bwd.BwdSchedule):
    return sched
  cfg = gpu_mosaic_bwd.MosaicBwdConfig(*config.mosaic_bwd)
  return sched._replace(bwd=gpu_mosaic_bwd.settle(sched.bwd, cfg))


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


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """(block_q, block_k, num_warps, num_stages) of each of the three kernels.

  Defaults: the best of the sweeps in benchmarks/NOTES_attention.md (H100).
  """
  fwd: tuple[int, int, int, int] = (64, 64, 4, 3)
  dkv: tuple[int, int, int, int] = (64, 64, 4, 3)
  dq: tuple[int, int, int, int] = (64, 64, 4, 3)
  skip_full_mask: bool = True
  # gpu_mosaic.MosaicFwdConfig fields (block_q per warpgroup, block_k,
  # num_stages, heads per CTA[, lpt]) of the Mosaic GPU forward, which then
  # replaces the Triton forward; None: Triton. Set by dispatch on Hopper
  # for bf16/f16 and head dims 64/128.
  mosaic_fwd: tuple | None = None
  # gpu_mosaic_bwd.MosaicBwdConfig fields of the Mosaic GPU backward (fused,
  # or dk/dv and dq kernels), used with the Mosaic forward; None: Triton.
  mosaic_bwd: tuple | None = None

  @classmethod
  def for_head_dim(cls, head_dim: int, dtype=jnp.bfloat16) -> "GpuConfig":
    if jnp.dtype(dtype) == jnp.float32:
      # True-float32 products need three times the registers and shared
      # memory; 128-row tiles at head dim 128 did not finish compiling on
      # the H100 within a minute (run 3 of NOTES_attention.md).
      return cls.uniform(32, 32, 4, 2)
    # H100 sweep at L=8192 (NOTES_attention.md, run 2): the dq pass prefers
    # narrow key tiles; wider tiles spill shared memory at head dim 128.
    if head_dim <= 64:
      return cls(dq=(64, 32, 4, 3))
    return cls(dq=(128, 32, 4, 3))

  @classmethod
  def uniform(cls, block_q: int, block_k: int, num_warps: int = 4,
              num_stages: int = 3) -> "GpuConfig":
    c = (block_q, block_k, num_warps, num_stages)
    return cls(fwd=c, dkv=c, dq=c)

  @property
  def multiple(self) -> int:
    """The sequence length must be a multiple of this."""
    blocks = [b for c in (self.fwd, self.dkv, self.dq) for b in c[:2]]
    if self.mosaic_fwd:
      from tfjax.ops.kernels import gpu_mosaic
      blocks.append(gpu_mosaic.MosaicFwdConfig(*self.mosaic_fwd).multiple)
    if self.mosaic_bwd:
      from tfjax.ops.kernels import gpu_mosaic_bwd
      blocks.append(gpu_mosaic_bwd.MosaicBwdConfig(*self.mosaic_bwd).multiple)
    return math.lcm(*blocks)

  @staticmethod
  def mosaic_default(head_dim: int, seq_len: int | None = None) -> tuple:
    """Mosaic GPU forward tiles: the best of the H100 runs (NOTES_attention.md).

    seq_len: the query rows per sequence, where known (it picks the CTA
    shape at head dim 128).
    """
    # H100, run 2 of the Mosaic forward: one head per CTA is best at every
    # shape but 8192/128 (where 2 heads tie); 64-key tiles and deeper rings lose.
    # Run M20: at head dim 64 three consumer warpgroups (192-row CTAs) beat two
    # (0.167 vs 0.195 ms at 8192, 0.105 vs 0.119 at 4096). At 128 three need
    # 64-key tiles (registers): in four runs (M20, M26) faster at L=8192
    # (0.211-0.227 vs 0.220-0.237 ms), level or slower at 4096 (0.130-0.153
    # vs 0.129-0.142), where 192-row CTAs leave 5 waves and a ragged tail.
    # Run M47 (H200): at head dim 64 a persistent grid (one CTA per SM, the
    # next item's Q tile, scalars and key bounds read under the current
    # item's tiles) beats the launched one: forward 0.072-0.077 vs 0.087-0.092
    # ms at 4096, 0.128-0.130 vs 0.148-0.152 at 8192, f+b 2.6-7% faster. At
    # 128 its forward is 0-9% faster but f+b level or 1-2% slower in four
    # calls (0.458-0.480 vs 0.450-0.459 at 4096): launched there.
    if head_dim <= 64:
      return (64, 128, 2, 1, True, True, False, True, 3, 1)
    if seq_len is not None and seq_len >= 8192:
      return (64, 64, 2, 1, True, True, False, True, 3)
    return (64, 128, 2, 1)

  @staticmethod
  def mosaic_bwd_default(head_dim: int) -> tuple | None:
    """Mosaic GPU backward tiles (gpu_mosaic_bwd.MosaicBwdConfig fields; None:
    the Triton backward).

    H100, runs M5-M8 and M14-M15 of NOTES_attention.md: at head dim 64 the
    fused dk/dv/dq kernel (240 registers) is fastest (f+b 0.37-0.43 vs
    0.42-0.47 ms at 4096, 0.66-0.70 vs 0.70-0.75 at 8192); at head dim 128 it
    is slower than the two kernels (8192: 1.21 vs 0.88-0.91 ms), which stay the
    default there, with S and dP in one wgmma group and delta computed inside
    the dq kernel (0.882 vs 0.912 ms at 8192/128, 0.548 vs 0.561 at 4096/128).
    Empty-tile skipping per warpgroup (skip_empty) is on in both. Run M20: at
    head dim 64 the two kernels with three consumer warpgroups each (and delta
    in dq) overtake the fused kernel (f+b 0.574 vs 0.635 ms at 8192, 0.370 vs
    0.381 at 4096, both with the three-consumer forward). Run M21: at head dim
    128, 240 registers, S^T and dP^T issued apart in the dk/dv kernel (no
    spills) and three consumers in dq: 0.848 vs 0.879 ms at 8192, 0.506 vs
    0.516 at 4096. Run M35 (H200): at head dim 128, dq from the dk/dv
    kernel's stored dS^T tiles (one product per tile instead of three, a
    3-deep ring) beats recomputing them: f+b 0.455-0.461 vs 0.472 ms at
    4096, 0.764-0.770 vs 0.803 at 8192; at 64 it loses (0.341-0.355 vs 0.330,
    0.563-0.588 vs 0.545). The buffer holds 30% of the padded tiles (the
    benchmark layout lists 16% at 4096 and 7.5% at 8192; 100%, never a
    fallback, measured 0.5-1% faster but holds B * H * L^2 bf16 values).
    Run M44 (H200): at head dim 64 the persistent dk/dv kernel (one CTA per
    SM, the next item's K/V loaded under the current item's tiles) beats the
    launched one: f+b 0.510 vs 0.520 ms at 8192, 0.300 vs 0.322 at 4096; at
    128 (one dS^T buffer fits beside the second K/V buffer) it is level or
    slower (0.775-0.785 vs 0.763 at 8192), so 128 keeps the launched grid.
    """
    if head_dim <= 64:
      return (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1, 3, 3, 0, 100, 1)
    return (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 30)


def _mosaic_forward(q, k, v, ks, ke, sched, *, scale, cfg, interpret):
  """The Mosaic GPU forward (Hopper), same (out, lse) contract as `_forward`."""
  from tfjax.ops.kernels import gpu_mosaic
  if interpret:
    raise ValueError("the Mosaic GPU forward has no interpret mode")
  return gpu_mosaic.forward(q, k, v, ks, ke, scale=scale,
                            cfg=gpu_mosaic.MosaicFwdConfig(*cfg.mosaic_fwd), sched=sched.fwd)


_attention = block_sparse_vjp(_forward, _backward)
# Mosaic GPU forward, Triton backward (which reads the same base-2 lse).
_attention_mosaic = block_sparse_vjp(_mosaic_forward, _backward)


def _mosaic_backward(q, k, v, o, lse, do, ks, ke, sched, *, scale, cfg, interpret):
  from tfjax.ops.kernels import gpu_mosaic_bwd
  del interpret
  return gpu_mosaic_bwd.backward(q, k, v, o, lse, do, ks, ke, scale=scale,
                                 cfg=gpu_mosaic_bwd.MosaicBwdConfig(*cfg.mosaic_bwd),
                                 sched=sched.bwd)


# Mosaic GPU forward and backward.
_attention_mosaic_all = block_sparse_vjp(_mosaic_forward, _mosaic_backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
              k_end: jax.Array, *, scale: float, config: GpuConfig | None = None,
              interpret: bool = False, sched: Schedule | None = None) -> jax.Array:
  """Block-sparse attention over per-query key intervals, differentiable.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    k_start, k_end: int32[batch, seq]; query r sees keys [k_start[r], k_end[r]).
    scale: logit scale (usually head_dim ** -0.5).
    config: tile sizes and Triton settings per kernel; seq must be a multiple
      of `config.multiple`. With `config.mosaic_fwd` set (and not
      interpreting) the forward is the Mosaic GPU kernel of gpu_mosaic.py.
    interpret: run in Pallas interpret mode (CPU tests).
    sched: `schedule(k_start, k_end, config, interpret)` computed beforehand
      (an AttentionPlan shares one across layers); built here when None.
  Returns:
    [batch, seq, q_heads, head_dim] in q's dtype; empty rows are 0.
  """
  config = config or GpuConfig.for_head_dim(q.shape[-1], q.dtype)
  if q.shape[1] % config.multiple:
    raise ValueError(f"sequence length {q.shape[1]} is not a multiple of {config.multiple}")
  mosaic_fwd, mosaic_bwd = _mosaic(config, interpret)
  fn = _attention
  if mosaic_fwd:
    fn = _attention_mosaic_all if mosaic_bwd else _attention_mosaic
  sched = schedule(k_start, k_end, config, interpret) if sched is None else sched
  return fn(q, k, v, k_start, k_end, sched, float(scale), config, interpret)


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
                      k_end: jax.Array, *, scale: float, config: GpuConfig | None = None,
                      interpret: bool = False) -> jax.Array:
  """Forward only, with fewer queries than keys (decoding against a KV cache).

  q: [batch, seq, q_heads, head_dim] (seq a multiple of the forward block_q);
  k, v: [batch, kv_len, kv_heads, head_dim] (kv_len a multiple of block_k);
  k_start/k_end int32[batch, seq] index into the kv_len keys.
  """
  config = config or GpuConfig.for_head_dim(q.shape[-1], q.dtype)
  # The Triton forward: the Mosaic one needs 128-row query tiles, more than a
  # decoding step's queries.
  config = dataclasses.replace(config, mosaic_fwd=None, mosaic_bwd=None)
  sched = schedule(k_start, k_end, config, interpret, kv_len=k.shape[1])
  out, _ = _forward(q, k, v, k_start, k_end, sched, scale=float(scale), cfg=config,
                    interpret=interpret)
  return out
