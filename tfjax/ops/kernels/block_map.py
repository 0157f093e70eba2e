"""Block-sparsity map of the Transfusion mask, from per-query key intervals.

Each query q may attend to keys `k_start[q] <= k < k_end[q]` (see
`tfjax.ops.mask.key_ranges`). Cut the [seq, seq] mask into tiles of
`block_q x block_k`; from per-block minima and maxima of the intervals every
tile is

  empty   no row of the query block reaches into the key block: skipped;
  full    every row allows every key of the block: no mask arithmetic;
  partial anything else: the mask costs two comparisons per element (the
          Mosaic GPU kernels split these into LOWER / UPPER tiles, one
          comparison each, where a single bound decides them).

The kernels walk compacted work lists instead of the tile grid, so their time
follows the number of non-empty tiles, not seq^2:

  q_blocks  for each query block, its non-empty key blocks in ascending order
            (forward pass, dq pass);
  kv_blocks for each key block, its non-empty query blocks (dk/dv pass).

Lists have a static length (the number of blocks on the other side) and are
padded by repeating their last entry, so a grid that runs over the padded
length re-reads the same block (no new copy is issued) and does no work.

Emptiness is decided from the block's smallest start and largest end over
its non-padding rows: conservative (a tile called non-empty may hold no
allowed pair when a block's intervals leave a gap), never wrong, and exact on
packed layouts, where starts and ends both grow along the sequence.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2
# Partial tiles whose mask needs one bound (`tile_states(split_partial=True)`):
# every row's k_end lies at or past the tile (LOWER: only k >= k_start can
# fail), or every row's k_start at or before it (UPPER: only k < k_end can).
# Packed layouts make almost all partial tiles one of these: a document's
# start crosses a tile, or the causal diagonal / an image's end does.
LOWER, UPPER = 3, 4


class WorkList(NamedTuple):
  """Compacted non-empty tiles, one list per block on the iterated side.

  blocks: int32[batch, n_outer, n_inner] block indices on the other side,
    ascending, padded with the last valid entry (0 when there is none).
  full:   int32[batch, n_outer, n_inner] 1 where that tile is full (padding: 0).
  counts: int32[batch, n_outer] number of valid entries.
  """
  blocks: jax.Array
  full: jax.Array
  counts: jax.Array


class BlockMap(NamedTuple):
  """Everything a kernel needs to walk the mask sparsely.

  k_start, k_end: int32[batch, seq] the per-query key intervals.
  q_blocks:  WorkList over query blocks (lists of key blocks).
  kv_blocks: WorkList over key blocks (lists of query blocks).
  """
  k_start: jax.Array
  k_end: jax.Array
  q_blocks: WorkList
  kv_blocks: WorkList


def tile_states(k_start: jax.Array, k_end: jax.Array, block_q: int,
                block_k: int, kv_len: int | None = None, *,
                split_partial: bool = False) -> jax.Array:
  """int32[batch, seq // block_q, kv_len // block_k]: EMPTY, PARTIAL or FULL
  (with split_partial, LOWER or UPPER instead of PARTIAL where one bound
  decides the tile's mask; `coarsen` and `compact` read them as partial).

  Args:
    k_start, k_end: int32[batch, seq]; row q allows keys [k_start, k_end).
    block_q, block_k: tile sizes; seq must be a multiple of block_q and
      kv_len of block_k.
    kv_len: number of keys (default seq: self-attention; longer when a few
      queries attend to a KV cache).
  """
  batch, seq = k_start.shape
  kv_len = seq if kv_len is None else kv_len
  if seq % block_q or kv_len % block_k:
    raise ValueError(f"lengths ({seq} queries, {kv_len} keys) are not multiples of the block "
                     f"sizes ({block_q}, {block_k}); pad them first (api.attention does)")
  nq, nk = seq // block_q, kv_len // block_k
  s = k_start.reshape(batch, nq, block_q)
  e = k_end.reshape(batch, nq, block_q)
  live = e > s  # padding rows have the empty interval
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(live, s, big), axis=-1)       # [batch, nq]
  hi = jnp.max(jnp.where(live, e, 0), axis=-1)         # [batch, nq]
  # A dead row (empty interval) makes its block's tiles not full.
  max_s = jnp.max(jnp.where(live, s, big), axis=-1)
  min_e = jnp.min(jnp.where(live, e, 0), axis=-1)
  t0 = (jnp.arange(nk, dtype=jnp.int32) * block_k)[None, None, :]
  t1 = t0 + block_k
  nonempty = (lo[..., None] < t1) & (hi[..., None] > t0)
  starts_before = max_s[..., None] <= t0   # no live row's k_start inside the tile
  ends_after = min_e[..., None] >= t1      # no row's k_end inside it, no dead row
  partial = PARTIAL
  if split_partial:  # dead rows (max_s = big, min_e = 0) keep both bounds
    partial = jnp.where(ends_after, LOWER, jnp.where(starts_before, UPPER, PARTIAL))
  return jnp.where(starts_before & ends_after, FULL,
                   jnp.where(nonempty, partial, EMPTY)).astype(jnp.int32)


def pad_states(states: jax.Array, n_q: int, n_k: int) -> jax.Array:
  """`states` [batch, nq, nk] padded with EMPTY tiles to [batch, n_q, n_k]
  (rows or keys past the sequence, which no interval reaches)."""
  _, nq, nk = states.shape
  return jnp.pad(states, ((0, 0), (0, n_q - nq), (0, n_k - nk)), constant_values=EMPTY)


def coarsen(states: jax.Array, fq: int, fk: int) -> jax.Array:
  """The states of (fq x fk)-tile groups [batch, nq // fq, nk // fk]: full
  where every tile is, empty where every tile is, else partial. Never less
  exact than `tile_states` at the coarse tiling (a group whose tiles are all
  empty is empty even where its rows' bounds straddle it)."""
  batch, nq, nk = states.shape
  grouped = states.reshape(batch, nq // fq, fq, nk // fk, fk)
  full = jnp.all(grouped == FULL, axis=(2, 4))
  nonempty = jnp.any(grouped != EMPTY, axis=(2, 4))
  return jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY)).astype(jnp.int32)


def compact(states: jax.Array) -> WorkList:
  """Work lists along the last axis of `states` int32[batch, n_outer, n_inner]."""
  n_inner = states.shape[-1]
  nonempty = states != EMPTY
  # Stable sort keeps the non-empty indices ascending, in front.
  order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.sum(nonempty, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  valid = jnp.arange(n_inner, dtype=jnp.int32) < counts[..., None]
  blocks = jnp.where(valid, order, last)
  full = jnp.take_along_axis(states, order, axis=-1) == FULL
  return WorkList(blocks=blocks, full=(full & valid).astype(jnp.int32), counts=counts)


def block_map(k_start: jax.Array, k_end: jax.Array, block_q: int,
              block_k: int, kv_len: int | None = None) -> BlockMap:
  """The forward and transposed work lists for one tiling."""
  states = tile_states(k_start, k_end, block_q, block_k, kv_len)
  return BlockMap(k_start=k_start, k_end=k_end, q_blocks=compact(states),
                  kv_blocks=compact(jnp.swapaxes(states, 1, 2)))


def dense_tile_states(mask: jax.Array, block_q: int, block_k: int) -> jax.Array:
  """EMPTY/PARTIAL/FULL straight from a dense bool[batch, q, k] mask (tests)."""
  batch, lq, lk = mask.shape
  t = mask.reshape(batch, lq // block_q, block_q, lk // block_k, block_k)
  n = jnp.sum(t, axis=(2, 4))
  return jnp.where(n == block_q * block_k, FULL,
                   jnp.where(n > 0, PARTIAL, EMPTY)).astype(jnp.int32)


def live_fraction(states: jax.Array) -> jax.Array:
  """Fraction of tiles a kernel visits (non-empty), over the whole batch."""
  return jnp.mean((states != EMPTY).astype(jnp.float32))


def block_sparse_vjp(forward: Callable, backward: Callable) -> Callable:
  """A differentiable attention(q, k, v, k_start, k_end, sched, scale, cfg,
  interpret) from a kernel family's
  `forward(q, k, v, k_start, k_end, sched, ...) -> (out, lse)` and
  `backward(q, k, v, out, lse, d_out, k_start, k_end, sched, ...) -> (dq, dk, dv)`.

  `sched` is the family's schedule (its work lists, a pytree of integer
  arrays built from the key intervals by the family's `schedule` function),
  computed once and shared by the forward and the backward, or by every
  layer when passed in from an `AttentionPlan`. The GPU and TPU kernels share
  this wiring; intervals, schedule, scale, tiling config and interpret flag
  get no gradient.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
  def attention(q, k, v, ks, ke, sched, scale, cfg, interpret):
    return forward(q, k, v, ks, ke, sched, scale=scale, cfg=cfg, interpret=interpret)[0]

  def attention_fwd(q, k, v, ks, ke, sched, scale, cfg, interpret):
    o, lse = forward(q, k, v, ks, ke, sched, scale=scale, cfg=cfg, interpret=interpret)
    return o, (q, k, v, o, lse, ks, ke, sched)

  def attention_bwd(scale, cfg, interpret, res, do):
    q, k, v, o, lse, ks, ke, sched = res
    dq, dk, dv = backward(q, k, v, o, lse, do, ks, ke, sched, scale=scale, cfg=cfg,
                          interpret=interpret)
    return dq, dk, dv, None, None, None

  attention.defvjp(attention_fwd, attention_bwd)
  return attention
