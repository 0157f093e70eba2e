"""dq from the dk/dv kernel's stored dS^T tiles (`VjpConfig.dq=FROM_DS`).

The dk/dv kernel (mosaic_gpu_vjp_dkv.py) also writes every dS^T tile it
computes, at the rows a `DsRoute` gives it, and `dq_from_ds` replaces the
recomputing dq kernel: one product per visited tile, dQ += (dS^T)^T K.
`route_capacity` sizes the buffer; a batch whose lists need more rows falls
back to the recomputing kernels (mosaic_gpu_vjp.backward).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.mosaic_gpu_common import (fill_ring, grid_position, mosaic_params,
                                                 smem_transforms, transposed, unless_empty,
                                                 warpgroup_registers, when_inside)


class DsRoute(NamedTuple):
  """Where `dkv` (FROM_DS) puts each dS^T tile and `dq_from_ds` finds it.

  Each head owns `route_capacity` rows of the [heads * capacity, block_k,
  block_q] buffer, and the rows hold only listed tiles, packed in dk/dv
  order: key chunk (b, j) owns count x consumers rows, its entry t of
  consumer w at offset + t * consumers + w, and the dq producer gathers one
  row per consumer. (Packing in dq order instead, each query CTA's rows
  adjacent so that the dq producer reads an entry's rows in one copy, ran
  level or slower on an H200.)
  total: the rows one head needs; the backward falls back to recomputing dq
  where it exceeds the capacity.
  """
  rows: jax.Array      # int32[batch, key chunks, consumers_dkv, dk/dv list]:
                       # where each dk/dv consumer stores each entry's tile
  dq_rows: jax.Array   # int32[batch, query CTAs, dq list, consumers_dq]:
                       # where each dq consumer finds each entry's tile
  total: jax.Array     # int32[]


def route_capacity(route: DsRoute, cfg) -> int:
  """Rows per head of the dS^T buffer for the dq lists `route` was built
  for: cfg.ds_capacity percent of the dq kernel's padded lists' tiles
  (batch x query CTAs x list x consumers_dq; 100: every list full, never a
  fallback)."""
  batch, ctas, nlist = route.dq_rows.shape[:3]
  return max(1, -(-batch * ctas * nlist * cfg.consumers_dq * cfg.ds_capacity // 100))


def route_fits(route: DsRoute, cfg) -> jax.Array:
  """bool[]: the route's tiles fit the buffer (else dq is recomputed). One
  predicate for the host's answer (`mosaic_gpu_vjp.settle`) and the
  device's (the backward's lax.cond)."""
  return route.total <= route_capacity(route, cfg)


def _packed(blocks, counts, per_cta: int, n_other: int):
  """Rows of work lists packed CTA after CTA, per_cta rows per entry.

  blocks, counts: `block_map.WorkList` fields [batch, ctas, list], [batch,
  ctas]. Returns (offsets [batch, ctas]: each CTA's first row; entry
  [batch, ctas, n_other]: at which list entry each CTA met each of the
  n_other blocks of the other side, 0 where never; total rows)."""
  batch, ctas, nlist = blocks.shape
  t = jnp.arange(nlist, dtype=jnp.int32)
  target = jnp.where(t < counts[:, :, None], blocks, n_other)  # n_other: dropped
  bi = jnp.arange(batch)[:, None, None]
  ci = jnp.arange(ctas)[None, :, None]
  entry = jnp.zeros((batch, ctas, n_other), jnp.int32).at[bi, ci, target].set(
      jnp.broadcast_to(t, blocks.shape), mode="drop")
  rows = (counts * per_cta).reshape(-1)
  offsets = (jnp.cumsum(rows) - rows).reshape(batch, ctas).astype(jnp.int32)
  return offsets, entry, rows.sum().astype(jnp.int32)


def ds_route(dkv_sched, dq_sched, n_dkv: int, n_dq: int) -> DsRoute:
  """The `DsRoute` of a backward's two schedules at equal tiles (one pass over
  the work lists)."""
  kv_blocks, kv_counts = dkv_sched.blocks, dkv_sched.counts  # query tiles per key chunk
  q_blocks = dq_sched.blocks                                 # key blocks per query CTA
  batch, nkc, nlk = kv_blocks.shape
  nqc = q_blocks.shape[1]
  bi = jnp.arange(batch)[:, None, None, None]
  t_k = jnp.arange(nlk, dtype=jnp.int32)[None, None, None, :]
  w = jnp.arange(n_dkv, dtype=jnp.int32)[None, None, :, None]
  c = jnp.arange(n_dq, dtype=jnp.int32)[None, None, None, :]
  kb = q_blocks[:, :, :, None]                           # dq entry's key block
  off, entry, total = _packed(kv_blocks, kv_counts, n_dkv, nqc * n_dq)
  rows = off[:, :, None, None] + t_k * n_dkv + w
  qtile = jnp.arange(nqc, dtype=jnp.int32)[None, :, None, None] * n_dq + c
  chunk = jnp.minimum(kb // n_dkv, nkc - 1)
  dq_rows = off[bi, chunk] + entry[bi, chunk, qtile] * n_dkv + kb % n_dkv
  # Rows of entries no consumer computes (empty tiles, past the counts) are
  # never written or read; clipped so that no index leaves the head's rows.
  clip = lambda r: jnp.clip(r, 0, jnp.maximum(total - 1, 0)).astype(jnp.int32)
  return DsRoute(clip(rows), clip(dq_rows), total)


def dq_from_ds(k, dst, route: DsRoute, sched, *, scale, cfg, q_shape):
  """dq [batch, seq, q_heads, d] = dS K from the dk/dv kernel's dS^T tiles
  (`dkv` with FROM_DS): one product per visited tile instead of
  recomputing S, P and dP. dst: [q_heads * capacity, block_k, block_q] tiles
  at the rows of `route`. The walk is the dq kernel's
  (consumers_dq warpgroups of block_q rows over the query block's listed key
  blocks); the producer streams each entry's K tile and its consumers' dS^T
  tiles, one copy per consumer."""
  # Imported here: Pallas's Mosaic GPU module takes ~0.4 s to import, needed on Hopper only.
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q_shape
  group = hq // k.shape[2]
  dtype = k.dtype
  bq, bk, stages = cfg.block_q_dq, cfg.block_k_dq, cfg.stages_dq
  if (bq, bk) != (cfg.block_q_dkv, cfg.block_k_dkv):
    raise ValueError("VjpConfig.dq=FROM_DS needs the dq tiles equal to the dk/dv tiles")
  n_cons = cfg.consumers_dq
  regs_consumer, regs_producer = warpgroup_registers(n_cons, cfg.consumer_regs)
  cta_q = n_cons * bq
  nq_cta = -(-seq // cta_q)
  cap = dst.shape[0] // hq
  blocks, counts, states = sched  # mosaic_gpu_vjp.DqSchedule
  wgmma_layout = plgpu.Layout.WGMMA
  tr = smem_transforms(plgpu, dtype, d)
  tr_ds = smem_transforms(plgpu, dtype, bq)

  def kernel(blocks_ref, counts_ref, states_ref, rows_ref, k_ref, ds_ref, dq_ref, scoped):
    h, qi, b, wg = grid_position("q")
    (out_smem, k_smem, ds_smem), tile_bar, free = scoped
    n = counts_ref[b, qi]

    @pl.when(wg < n_cons)
    def _consumer():
      plgpu.set_max_registers(regs_consumer, action="increase")
      row0 = qi * cta_q + wg * bq
      ragged = seq % cta_q != 0
      zeros = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), wgmma_layout)

      def body(t, dq):
        slot = lax.rem(t, jnp.int32(stages))
        plgpu.barrier_wait(tile_bar.at[slot])

        def tile():
          def fn(acc_ref):  # dQ += (dS^T)^T K: the stored tile, transposed
            plgpu.wgmma(acc_ref, transposed(plgpu, ds_smem.at[slot, wg]), k_smem.at[slot])
          return pl.run_state(fn)(plgpu.ACC.init(dq))

        dq = unless_empty(True, states_ref[b, qi, wg, t], tile, lambda: dq)
        plgpu.barrier_arrive(free.at[slot])
        return dq

      dq = lax.fori_loop(0, n, body, zeros)

      @when_inside(pl, row0, seq, ragged)
      def _():
        out_smem.at[wg][...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], dq_ref.at[b, pl.ds(row0, bq), h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == n_cons)
    def _producer():
      plgpu.set_max_registers(regs_producer, action="decrease")
      hk = lax.div(h, jnp.int32(group))

      head_row = h * jnp.int32(cap)

      def issue(t, slot):  # every copy arrives at tile_bar[slot]
        kb = blocks_ref[b, qi, t]
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kb * bk, bk), hk], k_smem.at[slot],
                                tile_bar.at[slot])
        for c in range(n_cons):
          plgpu.copy_gmem_to_smem(ds_ref.at[head_row + rows_ref[b, qi, t, c]],
                                  ds_smem.at[slot, c], tile_bar.at[slot])

      def refill(t, slot):
        plgpu.barrier_wait(free.at[slot])
        issue(t, slot)

      fill_ring(pl, n, stages, issue, refill)

  def entry(*refs):
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        [plgpu.SMEM((n_cons, bq, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
         plgpu.SMEM((stages, n_cons, bk, bq), dtype, transforms=tr_ds)],
        plgpu.Barrier(num_arrivals=1 + n_cons, num_barriers=stages),
        plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q_shape, dtype),
      grid=(hq, nq_cta, batch),
      grid_names=("heads", "q", "batch"),
      num_threads=n_cons + 1,
      thread_name="wg",
      compiler_params=mosaic_params(plgpu, cfg.lean),
  )(blocks, counts, states, route.dq_rows, k, dst)
