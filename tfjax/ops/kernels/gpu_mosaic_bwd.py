"""Block-sparse Transfusion attention for Hopper: the Mosaic GPU backward.

Two ways to the gradients, both over the compacted lists of non-empty tiles
of `block_map.py` and the forward's base-2 log-sum-exp (gpu_mosaic.py):

  fused            one kernel per (q head, 2 * block_k keys, batch row). Two
                   consumer warpgroups own block_k keys each, with their K and
                   V tiles resident in shared memory; a producer warpgroup
                   streams the q, dO, lse, delta and key-range tiles of the
                   key block's non-empty query blocks through a ring of
                   `stages` slots (TMA). Per tile each consumer runs
                   S^T = K Q^T and dP^T = V dO^T in one wgmma group, the
                   softmax gradient in registers, then dV += P^T dO,
                   dK += dS^T Q and this tile's dQ in a second group: both
                   warpgroups' dS^T go to shared memory (dK and dQ read it
                   there, which keeps registers free), and each computes
                   half of dQ's columns from all 2 * block_k keys
                   (dQ[:, half] = dS K[:, half]), added into a float32 dq in
                   global memory by a TMA reduce-add. Five matrix products per
                   tile pair, as in FlashAttention-3's backward. The float32
                   adds arrive in no fixed order, so dq can differ in its last
                   bits from run to run. The default at head dim 64 until
                   the three-consumer two-kernel path overtook it (M20).
  two kernels      (gpu_mosaic_bwd_two_kernel.py) a dk/dv kernel (the same
                   walk without dQ) and a dq kernel (the forward's walk over
                   key blocks, recomputing S and dP),
                   each with two or three consumer warpgroups: seven matrix
                   products per tile pair, deterministic. The default at both
                   head dims (NOTES_attention.md, runs M5-M8, M20-M22). At
                   head dim 128 by default (`dq_from_ds`, M35-M38) the dk/dv
                   kernel runs first and stores its bf16 dS^T tiles, and dq is
                   one product per tile from them (gpu_mosaic_bwd_ds.py): five
                   products per pair. At head dim 64 by default the dk/dv
                   kernel is a persistent grid (`persistent_dkv`, M44).

bf16/f16, head dims 64 and 128. On CPU the kernels lower to Mosaic GPU
modules (tests check that) but cannot run. Measured on an H100 with JAX
0.11.2: benchmarks/NOTES_attention.md and benchmarks/RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import EMPTY, pad_states, tile_states
from tfjax.ops.kernels.gpu_mosaic import length_multiple
from tfjax.ops.kernels.gpu_mosaic_parts import (LOG2E, continue_ring, fill_ring, load_vec,
                                                longest_first, mask_tile, mosaic_params,
                                                smem_transforms, transposed, unless_empty,
                                                warpgroup_registers, warpgroup_schedule)


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """Tiles of the Mosaic GPU backward.

  dk/dv (and the fused kernel): each consumer warpgroup owns block_k_dkv keys
  (CTA: 2x), the producer streams q/dO/lse/delta tiles of block_q_dkv rows
  (stages_dkv deep) over the key block's non-empty query blocks. dq (two-kernel
  path only): each consumer owns block_q_dq query rows (CTA: 2x), the producer
  streams K/V tiles of block_k_dq keys over the query block's non-empty key
  blocks. fuse_dq: 1 for the fused kernel, 0 for the two kernels.
  """
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  stages_dkv: int = 2
  block_q_dq: int = 64
  block_k_dq: int = 64
  stages_dq: int = 2
  fuse_dq: int = 1
  # The consumer warpgroups' register budget (232, or 240 with the producer
  # cut to 24) where a kernel runs two consumers.
  consumer_regs: int = 232
  # Two-kernel path: issue S and dP in one wgmma group (1), or S alone first
  # (0), or grouped in the dq kernel only (2: the dk/dv kernel's dK and dV
  # accumulators leave less room for both products at once).
  sdp_group: int = 1
  # gpu_mosaic.MosaicFwdConfig.lean's compiler settings, for every backward
  # kernel. Off: within noise on the H100/H200 (NOTES_attention.md, M12), and
  # the backward's warpgroups hand dS^T to each other through shared memory,
  # where the automatic barriers are the safe default.
  lean: int = 0
  # Fused kernel's dQ: 0 = each warpgroup its half of the columns over both
  # warpgroups' keys (they meet at a barrier per tile); 1 = each warpgroup all
  # columns over its own keys (no barrier; twice the float32 adds). Head dim
  # 64 only (all columns of a dQ tile are 64 more registers at 128).
  dq_own_keys: int = 0
  # A consumer skips the tiles where its own rows/keys meet nothing (the CTA's
  # other warpgroup's do), keeping only the barrier protocol (and, in the
  # fused kernel, its zero half of dS^T for the other's dQ).
  skip_empty: int = 1
  # Two-kernel path: the dq kernel computes delta = rowsum(o * dO) from its
  # own tiles and runs first (no separate XLA pass over o and dO).
  dq_delta: int = 0
  # Two-kernel path: consumer warpgroups per CTA of the dk/dv and of the dq
  # kernel (2 or 3, as gpu_mosaic.MosaicFwdConfig.consumers; with 3 the
  # kernel pads its last CTA's keys or rows itself). Head dim 64 for dk/dv
  # (three warpgroups' dK and dV accumulators at 128 exceed the registers).
  consumers_dkv: int = 2
  consumers_dq: int = 2
  # Two-kernel path (1): the dk/dv kernel runs first and writes its bf16 dS^T
  # tiles, packed in its own order (`gpu_mosaic_bwd_ds.DsRoute`), and dq is one
  # product per visited tile (`gpu_mosaic_bwd_ds.dq_from_ds`) instead
  # of recomputing S and dP; delta comes from one XLA pass (dq_delta unused).
  # Needs skip_empty (an empty tile has no row) and equal dq and dk/dv tiles.
  dq_from_ds: int = 0
  # dq_from_ds: the dS^T buffer's rows per head, in percent of the dq
  # kernel's padded lists' tiles (the tiles every list could hold); a batch
  # whose lists need more recomputes dq instead (both paths are compiled).
  ds_capacity: int = 100
  # Two-kernel path (1): the dk/dv kernel runs one CTA per SM, each walking
  # its share of the (head, key chunk, batch row) work items, longest first
  # in snake order; its producer streams on from one item's query tiles to
  # the next's, and each consumer loads the next item's K and V into a second
  # buffer under the current item's tiles, so no item waits for a launch, a
  # K/V load or the last item's dK/dV stores. N > 1: N CTAs instead of one
  # per SM (tests: several items per CTA on a small problem).
  persistent_dkv: int = 0

  @property
  def multiple(self) -> int:
    blocks = [self.block_q_dkv, length_multiple(self.consumers_dkv, self.block_k_dkv)]
    if not self.fuse_dq:
      blocks += [length_multiple(self.consumers_dq, self.block_q_dq), self.block_k_dq]
    return math.lcm(*blocks)


class DkvSchedule(NamedTuple):
  """The walk over key blocks (fused and dk/dv kernels), at (block_q_dkv,
  consumers_dkv * block_k_dkv) tiles: `block_map.WorkList` blocks and counts
  [batch, key chunks(, list)], each consumer's own tile state per entry
  (`gpu_mosaic_parts.warpgroup_schedule`, [batch, key chunks, consumers, list]),
  and the order of the flat b * key chunks + chunk work lists, longest first
  (the fused kernel's launch order, the persistent dk/dv kernel's item order;
  None for the launched dk/dv kernel)."""
  blocks: jax.Array
  counts: jax.Array
  states: jax.Array
  order: jax.Array | None


class DqSchedule(NamedTuple):
  """The dq kernel's walk over query blocks (two-kernel path): work lists at
  (consumers_dq * block_q_dq, block_k_dq) and each consumer's own tile state
  per entry."""
  blocks: jax.Array
  counts: jax.Array
  states: jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DsFits:
  """Whether a schedule's dS^T tiles fit the buffer (dq_from_ds), decided on
  the host once (`settle`): static, part of the schedule's tree structure."""
  fits: bool


class BwdSchedule(NamedTuple):
  dkv: DkvSchedule
  dq: DqSchedule | None  # None: the fused kernel computes dq
  # dq_from_ds: where the dS^T tiles go (`gpu_mosaic_bwd_ds.DsRoute`);
  # None otherwise.
  ds_route: Any = None
  # dq_from_ds: a `DsFits` once `settle`d; None: the backward decides on the
  # device (a lax.cond).
  ds_fits: DsFits | None = None


def settle(sched: BwdSchedule, cfg: MosaicBwdConfig) -> BwdSchedule:
  """`sched` with the dS^T buffer's fit decided now, where its arrays are
  concrete (a plan built outside jit): one device-to-host read here instead
  of the backward's `lax.cond`, whose predicate XLA reads on the host in
  every call (an H200 timeline at 8192/128: a 1.5 us copy and a ~15 us
  stall, ~2.5% of forward+backward; NOTES_attention.md M48). Traced
  schedules and those without a dS^T route are returned as they are."""
  route = sched.ds_route
  if route is None or cfg.ds_capacity >= 100:
    return sched
  from tfjax.ops.kernels.gpu_mosaic_bwd_ds import route_fits
  try:
    fits = bool(route_fits(route, cfg))
  except jax.errors.ConcretizationTypeError:  # traced: the backward's cond decides
    return sched
  return sched._replace(ds_fits=DsFits(fits))


def bwd_schedule(ks, ke, cfg: MosaicBwdConfig) -> BwdSchedule:
  """The backward's work lists for int32[batch, seq] key intervals [ks, ke)."""
  if cfg.dq_from_ds and (cfg.fuse_dq or not cfg.skip_empty or cfg.dq_from_ds != 1
                         or (cfg.block_q_dq, cfg.block_k_dq)
                         != (cfg.block_q_dkv, cfg.block_k_dkv)):
    raise ValueError("MosaicBwdConfig.dq_from_ds (0 or 1) takes the two-kernel path "
                     "(fuse_dq=0) with skip_empty=1 and the dq tiles equal to the dk/dv tiles")
  if cfg.persistent_dkv and cfg.fuse_dq:
    raise ValueError("MosaicBwdConfig.persistent_dkv takes the two-kernel path (fuse_dq=0)")
  if cfg.fuse_dq and (cfg.consumers_dkv, cfg.consumers_dq) != (2, 2):
    raise ValueError("MosaicBwdConfig.consumers_dkv/consumers_dq apply to the two-kernel "
                     "path (fuse_dq=0); the fused kernel runs two consumers")
  seq = ks.shape[1]
  cta_tiles = lambda block, n: -(-seq // (n * block)) * n  # tiles in whole CTAs
  bq, bk, n = cfg.block_q_dkv, cfg.block_k_dkv, cfg.consumers_dkv
  states = tile_states(ks, ke, bq, bk, split_partial=True)    # [batch, nq, nk]
  wl, own = warpgroup_schedule(pad_states(states, seq // bq, cta_tiles(bk, n)), n, by_keys=True)
  # (Longest-first launch order for the two-kernel path measured neutral on
  # an H200, NOTES_attention.md run M12: grid order there.)
  dkv = DkvSchedule(wl.blocks, wl.counts, own,
                    longest_first(wl.counts) if cfg.fuse_dq or cfg.persistent_dkv else None)
  if cfg.fuse_dq:
    return BwdSchedule(dkv, None)
  if (cfg.block_q_dq, cfg.block_k_dq) != (bq, bk):
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    states = tile_states(ks, ke, bq, bk, split_partial=True)
  n = cfg.consumers_dq
  wl, own = warpgroup_schedule(pad_states(states, cta_tiles(bq, n), seq // bk), n)
  dq = DqSchedule(wl.blocks, wl.counts, own)
  route = None
  if cfg.dq_from_ds:
    from tfjax.ops.kernels.gpu_mosaic_bwd_ds import ds_route
    route = ds_route(dkv, dq, cfg.consumers_dkv, n)
  return BwdSchedule(dkv, dq, route)


def recompute_config(cfg: MosaicBwdConfig) -> MosaicBwdConfig:
  """The recomputing kernels that a dq_from_ds backward falls back to when its
  batch lists more tiles than the dS^T buffer holds: dq first with delta inside
  it (no XLA pass over o and dO) and a 2-deep ring, the head-dim-128 default
  before dq_from_ds. Inheriting dq_from_ds's own settings instead (an XLA delta
  pass, a 3-deep ring) ran 4% / 1.4% slower on one causal document per row at
  4096/128 and 8192/128 (NOTES_attention.md, M40)."""
  return dataclasses.replace(cfg, dq_from_ds=0, dq_delta=1, stages_dq=2)


def backward(q, k, v, o, lse, do, ks, ke, *, scale: float, cfg: MosaicBwdConfig,
             sched: BwdSchedule | None = None):
  """(dq, dk, dv) from the forward's out and base-2 lse [batch, q_heads, seq].

  sched: `bwd_schedule(ks, ke, cfg)` computed beforehand, or None.
  """
  batch, seq, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  sched = bwd_schedule(ks, ke, cfg) if sched is None else sched
  delta = lambda: jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  if cfg.fuse_dq:
    dq, dk, dv = _fused(q, k, v, do, lse, delta(), ks, ke, sched.dkv, scale=scale, cfg=cfg)
  else:
    from tfjax.ops.kernels import gpu_mosaic_bwd_ds as from_stored_ds
    from tfjax.ops.kernels import gpu_mosaic_bwd_two_kernel as two_kernel

    def recompute(c):  # dq recomputing S and dP (delta inside it or from XLA), then dk/dv
      if c.dq_delta:
        dq, dlt = two_kernel.dq(q, k, v, do, lse, None, ks, ke, sched.dq, scale=scale, cfg=c,
                                o=o)
      else:
        dlt = delta()
        dq = two_kernel.dq(q, k, v, do, lse, dlt, ks, ke, sched.dq, scale=scale, cfg=c)
      return (dq, *two_kernel.dkv(q, k, v, do, lse, dlt, ks, ke, sched.dkv, scale=scale, cfg=c))

    if not cfg.dq_from_ds:
      dq, dk, dv = recompute(cfg)
    else:
      route = sched.ds_route

      def from_ds():
        dk, dv, dst = two_kernel.dkv(q, k, v, do, lse, delta(), ks, ke, sched.dkv, scale=scale,
                                     cfg=cfg, ds_route=route)
        return from_stored_ds.dq_from_ds(k, dst, route, sched.dq, scale=scale, cfg=cfg,
                                         q_shape=q.shape), dk, dv

      fallback = lambda: recompute(recompute_config(cfg))
      if cfg.ds_capacity >= 100:
        dq, dk, dv = from_ds()
      elif sched.ds_fits is not None:  # `settle`d on the host
        dq, dk, dv = from_ds() if sched.ds_fits.fits else fallback()
      else:  # more listed tiles than the buffer holds: the recomputing kernels
        dq, dk, dv = jax.lax.cond(from_stored_ds.route_fits(route, cfg), from_ds, fallback)
  if group > 1:  # the kernels write dk, dv per q head
    dk = dk.astype(jnp.float32).reshape(batch, seq, hkv, group, d).sum(axis=3).astype(k.dtype)
    dv = dv.astype(jnp.float32).reshape(batch, seq, hkv, group, d).sum(axis=3).astype(v.dtype)
  return dq, dk, dv


def _probs_t(plgpu, s_t, qk_scale, state, k0, lo_ref, hi_ref, lse_ref):
  """P^T [keys, rows] = exp2(qk_scale * S^T - lse) for unscaled logits S^T of
  keys k0.. against streamed query rows whose visible keys are [lo, hi)
  (shared-memory vectors, with lse), masked as the tile's `block_map` state
  says (`gpu_mosaic_parts.mask_tile`). The scale rides in exp2's argument (one
  fused multiply-add)."""
  col = plgpu.Layout.WGMMA.reduce(0)
  s_t = mask_tile(plgpu, s_t, state, 0, k0, lambda: load_vec(plgpu, lo_ref, col),
                  lambda: load_vec(plgpu, hi_ref, col))
  return jnp.exp2(s_t * qk_scale
                  - lax.broadcast_in_dim(load_vec(plgpu, lse_ref, col), s_t.shape, [1]))


def _fused(q, k, v, do, lse, delta, ks, ke, sched: DkvSchedule, *, scale, cfg):
  """(dq, dk, dv per q head), all [batch, seq, q_heads, d], in one kernel."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  group = hq // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = cfg.block_q_dkv, cfg.block_k_dkv, cfg.stages_dkv
  cta_k = 2 * bk
  own = bool(cfg.dq_own_keys)
  if own and d > 64:
    raise ValueError("dq_own_keys=1 takes head dim 64 (gpu_mosaic_bwd.MosaicBwdConfig)")
  half = d // 2  # dQ columns per consumer warpgroup (dq_own_keys=0)
  dq_cols = d if own else half
  nq, nkc = seq // bq, seq // cta_k
  regs_consumer, regs_producer = warpgroup_registers(2, cfg.consumer_regs)
  blocks, counts, states, order = sched
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  # The dQ product reads K's column halves: the swizzle must not span them.
  swizzle = min(128, half * jnp.dtype(dtype).itemsize)
  tr = smem_transforms(plgpu, dtype, d, swizzle)
  tr_ds = smem_transforms(plgpu, dtype, bq, swizzle)
  tr_dq = smem_transforms(plgpu, jnp.float32, dq_cols)

  def kernel(order_ref, blocks_ref, counts_ref, states_ref, q_ref, k_ref, v_ref, do_ref,
             lse_ref, delta_ref, ks_ref, ke_ref, dq_ref, dk_ref, dv_ref, scoped):
    h = lax.axis_index("heads")
    flat = order_ref[lax.axis_index("tile")]
    b = lax.div(flat, jnp.int32(nkc))
    j = lax.rem(flat, jnp.int32(nkc))
    wg = lax.axis_index("wg")
    (k_smem, v_smem, q_smem, do_smem, f32_rows, i32_rows, ds_smem,
     dq_smem), (k_bar, v_bar, q_bar, do_bar, vec_bar), free, ds_bar = scoped
    lse_smem, delta_smem, ks_smem, ke_smem = _row_vectors(f32_rows, i32_rows)
    n = counts_ref[b, j]

    def both_consumers():  # rendezvous of the two consumer warpgroups
      plgpu.barrier_arrive(ds_bar)
      plgpu.barrier_wait(ds_bar)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(regs_consumer, action="increase")
      kb0 = j * cta_k + wg * bk
      hk = lax.div(h, jnp.int32(group))
      k_own, v_own = k_smem.at[pl.ds(wg * bk, bk)], v_smem.at[pl.ds(wg * bk, bk)]
      plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kb0, bk), hk], k_own, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kb0, bk), hk], v_own, v_bar.at[wg])
      if own:
        plgpu.barrier_wait(k_bar.at[wg])
        k_cols = k_own
      else:
        plgpu.barrier_wait(k_bar.at[0])  # dQ reads both warpgroups' keys
        plgpu.barrier_wait(k_bar.at[1])
        k_cols = k_smem.at[:, pl.ds(wg * half, half)]
      plgpu.barrier_wait(v_bar.at[wg])
      zeros = lambda shape: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)

      def body(t, carry):
        dk, dv, state = carry
        slot = lax.rem(t, jnp.int32(stages))
        buf = lax.rem(t, jnp.int32(2))
        state_next = states_ref[b, j, wg, lax.min(t + 1, jnp.int32(nq - 1))]
        rows = pl.ds(blocks_ref[b, j, t] * bq, bq)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        ds_own = ds_smem.at[buf, pl.ds(wg * bk, bk)]
        ds_for_dq = ds_own if own else ds_smem.at[buf]

        def dq_product(refs):
          plgpu.wgmma(refs[-1], transposed(plgpu, ds_for_dq), k_cols)

        def tile():
          s_t, dp_t = _products_in_one_group(
              plgpu, pl, [(k_own, transposed(plgpu, q_smem.at[slot])),
                          (v_own, transposed(plgpu, do_smem.at[slot]))], (bk, bq))
          plgpu.barrier_wait(vec_bar.at[slot])

          p_t = _probs_t(plgpu, s_t, qk_scale, state, kb0, ks_smem.at[slot],
                         ke_smem.at[slot], lse_smem.at[slot])
          delta_c = load_vec(plgpu, delta_smem.at[slot], col_layout)
          ds_own[...] = (p_t * (dp_t - lax.broadcast_in_dim(delta_c, (bk, bq), [1]))
                         ).astype(dtype)
          p16 = p_t.astype(dtype)
          plgpu.commit_smem()
          if not own:
            both_consumers()  # both halves of dS^T are in shared memory

          def grads(refs):
            plgpu.wgmma(refs[0], p16, do_smem.at[slot])
            plgpu.wgmma(refs[1], ds_own, q_smem.at[slot])
            dq_product(refs)

          return pl.run_state(grads)(
              (plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(zeros((bq, dq_cols)))))

        def skip():
          # Our keys meet none of these rows: dS^T is zero, dK and dV keep.
          plgpu.barrier_wait(vec_bar.at[slot])  # same waits as tile(): phases
          if own:
            return dv, dk, zeros((bq, dq_cols))
          ds_own[...] = zeros((bk, bq)).astype(dtype)
          plgpu.commit_smem()
          both_consumers()
          return dv, dk, pl.run_state(dq_product)((plgpu.ACC.init(zeros((bq, dq_cols))),))[0]

        dv, dk, dq_part = unless_empty(cfg.skip_empty, state, tile, skip)
        plgpu.barrier_arrive(free.at[slot])

        def add_dq():
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's add has read dq_smem
          dq_smem.at[wg][...] = dq_part
          plgpu.commit_smem()
          cols = pl.ds(0, d) if own else pl.ds(wg * half, half)
          plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[b, rows, h, cols],
                                  reduction_op="add")

        if own and cfg.skip_empty:  # over our own keys an empty tile adds nothing
          pl.when(state != EMPTY)(add_dq)
        else:
          add_dq()
        return dk, dv, state_next

      dk, dv, _ = lax.fori_loop(0, n, body, (zeros((bk, d)), zeros((bk, d)),
                                             states_ref[b, j, wg, 0]))
      both_consumers()  # the other warpgroup's last dQ product has read our K rows
      rows = pl.ds(kb0, bk)
      _store_key_grads(plgpu, dk * scale, dv, k_own, v_own, dk_ref.at[b, rows, h],
                       dv_ref.at[b, rows, h])

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(regs_producer, action="decrease")
      _stream_query_tiles(plgpu, pl, n, stages, bq, blocks_ref.at[b, j], b, h, q_ref, do_ref,
                          lse_ref, delta_ref, ks_ref, ke_ref, q_smem, do_smem, lse_smem,
                          delta_smem, ks_smem, ke_smem, q_bar, do_bar, vec_bar, free)

  def entry(*refs):
    smem = [
        plgpu.SMEM((cta_k, d), dtype, transforms=tr),
        plgpu.SMEM((cta_k, d), dtype, transforms=tr),
        *_query_tile_smem(plgpu, stages, bq, d, dtype, tr),
        plgpu.SMEM((2, cta_k, bq), dtype, transforms=tr_ds),
        plgpu.SMEM((2, bq, dq_cols), jnp.float32, transforms=tr_dq),
    ]
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        *_key_block_barriers(plgpu, stages),
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  # dq accumulates float32 tile products from many CTAs: it starts at zero, so
  # it is passed in as a mutable ref (pl.kernel aliases it in and out;
  # plgpu.kernel's batching wrapper does not take refs in JAX 0.10).
  dq_acc = jax.new_ref(jnp.zeros((batch, seq, hq, d), jnp.float32))
  shape = jax.ShapeDtypeStruct((batch, seq, hq, d), dtype)
  # Pallas's Mosaic GPU grid launches its last axis fastest, so this grid runs
  # every tile of one head before the next head's (heads slowest): the CTAs
  # in flight add into the same head's dq. NOTES_attention.md's M7 measured
  # that order 23% slower for the Triton fused backward; for this kernel
  # (an option, not a default) the other order was never timed.
  mesh = plgpu.Mesh(grid=(hq, batch * nkc), grid_names=("heads", "tile"), num_threads=3,
                    thread_name="wg")
  dk, dv = pl.kernel(
      entry, out_type=[shape, shape], mesh=mesh,
      compiler_params=mosaic_params(plgpu, cfg.lean),
  )(order, blocks, counts, states, q, k, v, do, lse, delta, ks, ke, dq_acc)
  dq = (dq_acc[...] * scale).astype(dtype)
  return dq, dk, dv


def _products_in_one_group(plgpu, pl, pairs, shape):
  """(a @ b for each (a, b) in pairs): float32 [shape] products issued as one
  wgmma group into fresh accumulators (S and dP of a tile, transposed or not)."""
  def issue(refs):
    for acc_ref, (a, b) in zip(refs, pairs):
      plgpu.wgmma(acc_ref, a, b)

  zeros = lambda: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)
  return pl.run_state(issue)(tuple(plgpu.ACC.init(zeros()) for _ in pairs))


def _query_tile_smem(plgpu, stages, bq, d, dtype, tr):
  """Shared memory of the streamed query side: q, dO, and the four row vectors
  per slot in two arrays ([stages, 2, bq] float32 lse and delta, int32 k_start
  and k_end; `_row_vectors` names them). Every scoped allocation is padded to
  1 KiB, so four 256-byte vectors apart would cost 2 KiB more, which the
  persistent dk/dv kernel at head dim 128 needs for its second dS^T buffer."""
  return [
      plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
      plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
      plgpu.SMEM((stages, 2, bq), jnp.float32),
      plgpu.SMEM((stages, 2, bq), jnp.int32),
  ]


def _row_vectors(f32_rows, i32_rows):
  """(lse, delta, k_start, k_end) [stages, bq] views of `_query_tile_smem`'s
  two vector arrays."""
  return f32_rows.at[:, 0], f32_rows.at[:, 1], i32_rows.at[:, 0], i32_rows.at[:, 1]


def _store_key_grads(plgpu, dk, dv, k_tile, v_tile, dk_dst, dv_dst, wait=True):
  """A consumer's epilogue: its dK and dV accumulators to global memory,
  through its K and V tiles in shared memory (no longer read by then); with
  wait=False the stores stay in flight (a persistent kernel waits before it
  reuses the buffers)."""
  k_tile[...] = dk.astype(k_tile.dtype)
  v_tile[...] = dv.astype(v_tile.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_tile, dk_dst)
  plgpu.copy_smem_to_gmem(v_tile, dv_dst)
  if wait:
    plgpu.wait_smem_to_gmem(0)


def _grid_position(blocks: str):
  """(q head, key chunk or query CTA, batch row, warpgroup) of the running
  thread in the kernels' grid (heads, `blocks`, batch) x warpgroups."""
  return tuple(lax.axis_index(n) for n in ("heads", blocks, "batch", "wg"))


def _key_block_barriers(plgpu, stages, consumers=2, kv_buffers=1):
  """Barriers of the key-block kernels: ((K, V) per consumer warpgroup and K/V
  buffer; q, dO and the four row vectors per ring slot), and each slot's
  release by every consumer."""
  kv = consumers * kv_buffers
  return ((plgpu.Barrier(num_barriers=kv), plgpu.Barrier(num_barriers=kv),
           plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_arrivals=4, num_barriers=stages)),
          plgpu.Barrier(num_arrivals=consumers, num_barriers=stages))


def _stream_query_tiles(plgpu, pl, n, stages, bq, blocks, b, h, q_ref, do_ref, lse_ref,
                        delta_ref, ks_ref, ke_ref, q_smem, do_smem, lse_smem, delta_smem,
                        ks_smem, ke_smem, q_bar, do_bar, vec_bar, free, g0=None):
  """Producer warpgroup of the key-block kernels: the n query blocks listed in
  `blocks` into a ring of `stages` slots, each refilled once every consumer
  has released it. With g0 (a persistent kernel's count of tiles streamed
  before this work item) the ring runs on from slot g0 mod stages and the
  count after this item is returned."""

  def issue(t, slot):
    rows = pl.ds(blocks[t] * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], vec_bar.at[slot])
    plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], vec_bar.at[slot])
    plgpu.copy_gmem_to_smem(ke_ref.at[b, rows], ke_smem.at[slot], vec_bar.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], vec_bar.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])

  def refill(t, slot):
    plgpu.barrier_wait(free.at[slot])
    issue(t, slot)

  if g0 is None:
    fill_ring(pl, n, stages, issue, refill)
    return None

  def one(t, slot, g):
    pl.when(g >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
    issue(t, slot)

  return continue_ring(n, stages, g0, one)
