"""The Mosaic GPU (Hopper) attention backward: its config, schedule and kernels' order.

Two kernels over the compacted lists of non-empty tiles (`block_map`) and the
forward's base-2 log-sum-exp, deterministic (no float32 atomics):

  dk/dv  (mosaic_gpu_vjp_dkv.py) per CTA `consumers_dkv` warpgroups of keys,
         K and V resident, the producer streaming the key block's query tiles;
  dq     `VjpConfig.dq` picks it: the forward's walk recomputing S and dP
         (mosaic_gpu_vjp_dq.py; delta from an XLA pass or, run first, from
         its own tiles), or one product per tile from the dS^T tiles the dk/dv
         kernel stored (mosaic_gpu_vjp_ds.py), with the recomputing kernels
         as the fallback when a batch lists more tiles than the buffer holds.

bf16/f16, head dims 64 and 128; on CPU they lower (tests) but cannot run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tfjax.ops.kernels import mosaic_gpu_vjp_dkv, mosaic_gpu_vjp_dq, mosaic_gpu_vjp_ds
from tfjax.ops.kernels.block_map import pad_states, tile_states
from tfjax.ops.kernels.mosaic_gpu_common import (DqKernel, SdpGrouping, length_multiple,
                                                 longest_first, warpgroup_schedule)


@dataclasses.dataclass(frozen=True)
class VjpConfig:
  """Tiles and options of the Mosaic GPU backward.

  Defaults: what ships at head dim 128; `heuristic_config` picks the shipped
  config for every head dim.
  """
  block_q_dkv: int = 64     # streamed query rows per dk/dv tile
  block_k_dkv: int = 64     # keys per dk/dv consumer warpgroup
  stages_dkv: int = 2       # the dk/dv producer's ring depth
  block_q_dq: int = 64      # query rows per dq consumer warpgroup
  block_k_dq: int = 64      # keys per streamed dq tile
  stages_dq: int = 3        # the dq producer's ring depth
  # Registers of two consumer warpgroups: 232 (producer 40) or 240 (producer 24).
  consumer_regs: int = 240
  sdp: SdpGrouping = SdpGrouping.DQ_ONLY
  lean: bool = False        # as FwdConfig.lean, for every backward kernel
  # A consumer skips the listed tiles its own keys/rows do not meet.
  skip_empty: bool = True
  dq: DqKernel = DqKernel.FROM_DS
  consumers_dkv: int = 2    # consumer warpgroups per CTA, 2 or 3 (3: head dim 64)
  consumers_dq: int = 3
  # DqKernel.FROM_DS: the dS^T buffer's rows per head, in percent of the dq
  # lists' padded tiles; a batch listing more recomputes dq instead.
  ds_capacity: int = 30
  # The dk/dv kernel on one CTA per SM (or `persistent_ctas`, for tests), each
  # walking its share of the (head, key chunk, batch row) items longest first,
  # the next item's K/V loaded under the current item's tiles.
  persistent_dkv: bool = False
  persistent_ctas: int | None = None

  @property
  def multiple(self) -> int:
    return math.lcm(self.block_q_dkv, length_multiple(self.consumers_dkv, self.block_k_dkv),
                    length_multiple(self.consumers_dq, self.block_q_dq), self.block_k_dq)


def heuristic_config(head_dim: int) -> VjpConfig:
  """The shipped backward for a head dim. 128: dq from stored dS^T tiles (a 30%
  buffer); 64: three consumers in both kernels, dq recomputing with delta
  inside it, a persistent dk/dv grid. H100/H200 timings:
  tools/kernel_lab/NOTES_attention.md."""
  if head_dim <= 64:
    return VjpConfig(stages_dq=2, consumer_regs=232, sdp=SdpGrouping.GROUPED,
                     dq=DqKernel.RECOMPUTE_OWN_DELTA, consumers_dkv=3, ds_capacity=100,
                     persistent_dkv=True)
  return VjpConfig()


def recompute_config(cfg: VjpConfig) -> VjpConfig:
  """The recomputing kernels a FROM_DS backward falls back to when its batch
  lists more tiles than the dS^T buffer holds: dq first with its own delta
  and a 2-deep ring (faster there than keeping FROM_DS's settings)."""
  return dataclasses.replace(cfg, dq=DqKernel.RECOMPUTE_OWN_DELTA, stages_dq=2)


class DkvSchedule(NamedTuple):
  """The dk/dv kernel's walk over key blocks, at (block_q_dkv, consumers_dkv *
  block_k_dkv) tiles: `block_map.WorkList` blocks and counts [batch, key
  chunks(, list)], each consumer's own tile state per entry ([batch, key
  chunks, consumers, list]) and, for the persistent kernel, the flat work
  lists' order longest first (None otherwise)."""
  blocks: jax.Array
  counts: jax.Array
  states: jax.Array
  order: jax.Array | None


class DqSchedule(NamedTuple):
  """The dq kernels' walk over query blocks: work lists at (consumers_dq *
  block_q_dq, block_k_dq) and each consumer's own tile state per entry."""
  blocks: jax.Array
  counts: jax.Array
  states: jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class DsFits:
  """Whether a schedule's dS^T tiles fit the buffer, decided on the host once
  (`settle`): static, part of the schedule's tree structure."""
  fits: bool


class BwdSchedule(NamedTuple):
  dkv: DkvSchedule
  dq: DqSchedule
  # FROM_DS: where the dS^T tiles go (`mosaic_gpu_vjp_ds.DsRoute`); else None.
  ds_route: Any = None
  # FROM_DS: a `DsFits` once `settle`d; None: the backward decides on the
  # device (a lax.cond).
  ds_fits: DsFits | None = None


def settle(sched: BwdSchedule, cfg: VjpConfig) -> BwdSchedule:
  """`sched` with the dS^T buffer's fit decided now, where its arrays are
  concrete (a plan built outside jit): one device-to-host read here instead
  of a `lax.cond` whose predicate XLA reads on the host in every backward.
  Traced schedules and those without a dS^T route are returned as they are."""
  route = sched.ds_route
  if route is None or cfg.ds_capacity >= 100:
    return sched
  try:
    fits = bool(mosaic_gpu_vjp_ds.route_fits(route, cfg))
  except jax.errors.ConcretizationTypeError:  # traced: the backward's cond decides
    return sched
  return sched._replace(ds_fits=DsFits(fits))


def bwd_schedule(ks, ke, cfg: VjpConfig) -> BwdSchedule:
  """The backward's work lists for int32[batch, seq] key intervals [ks, ke)."""
  if cfg.dq is DqKernel.FROM_DS and (not cfg.skip_empty or (cfg.block_q_dq, cfg.block_k_dq)
                                     != (cfg.block_q_dkv, cfg.block_k_dkv)):
    raise ValueError("VjpConfig.dq=FROM_DS takes skip_empty=True and the dq tiles equal "
                     "to the dk/dv tiles")
  seq = ks.shape[1]
  cta_tiles = lambda block, n: -(-seq // (n * block)) * n  # tiles in whole CTAs
  bq, bk, n = cfg.block_q_dkv, cfg.block_k_dkv, cfg.consumers_dkv
  states = tile_states(ks, ke, bq, bk, split_partial=True)    # [batch, nq, nk]
  wl, own = warpgroup_schedule(pad_states(states, seq // bq, cta_tiles(bk, n)), n, by_keys=True)
  dkv = DkvSchedule(wl.blocks, wl.counts, own,
                    longest_first(wl.counts) if cfg.persistent_dkv else None)
  if (cfg.block_q_dq, cfg.block_k_dq) != (bq, bk):
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    states = tile_states(ks, ke, bq, bk, split_partial=True)
  n = cfg.consumers_dq
  wl, own = warpgroup_schedule(pad_states(states, cta_tiles(bq, n), seq // bk), n)
  dq = DqSchedule(wl.blocks, wl.counts, own)
  route = None
  if cfg.dq is DqKernel.FROM_DS:
    route = mosaic_gpu_vjp_ds.ds_route(dkv, dq, cfg.consumers_dkv, n)
  return BwdSchedule(dkv, dq, route)


def backward(q, k, v, o, lse, do, ks, ke, *, scale: float, cfg: VjpConfig,
             sched: BwdSchedule | None = None):
  """(dq, dk, dv) from the forward's out and base-2 lse [batch, q_heads, seq].

  sched: `bwd_schedule(ks, ke, cfg)` computed beforehand, or None.
  """
  batch, seq, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  sched = bwd_schedule(ks, ke, cfg) if sched is None else sched
  delta = lambda: jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  dkv = mosaic_gpu_vjp_dkv.dkv

  def recompute(c):  # dq recomputing S and dP (delta inside it or from XLA), then dk/dv
    if c.dq is DqKernel.RECOMPUTE_OWN_DELTA:
      dq, dlt = mosaic_gpu_vjp_dq.dq(q, k, v, do, lse, None, ks, ke, sched.dq, scale=scale,
                                     cfg=c, o=o)
    else:
      dlt = delta()
      dq = mosaic_gpu_vjp_dq.dq(q, k, v, do, lse, dlt, ks, ke, sched.dq, scale=scale, cfg=c)
    return (dq, *dkv(q, k, v, do, lse, dlt, ks, ke, sched.dkv, scale=scale, cfg=c))

  if cfg.dq is not DqKernel.FROM_DS:
    dq, dk, dv = recompute(cfg)
  else:
    route = sched.ds_route

    def from_ds():
      dk, dv, dst = dkv(q, k, v, do, lse, delta(), ks, ke, sched.dkv, scale=scale, cfg=cfg,
                        ds_route=route)
      return mosaic_gpu_vjp_ds.dq_from_ds(k, dst, route, sched.dq, scale=scale, cfg=cfg,
                                          q_shape=q.shape), dk, dv

    fallback = lambda: recompute(recompute_config(cfg))
    if cfg.ds_capacity >= 100:
      dq, dk, dv = from_ds()
    elif sched.ds_fits is not None:  # `settle`d on the host
      dq, dk, dv = from_ds() if sched.ds_fits.fits else fallback()
    else:  # more listed tiles than the buffer holds: the recomputing kernels
      dq, dk, dv = jax.lax.cond(mosaic_gpu_vjp_ds.route_fits(route, cfg), from_ds, fallback)
  if group > 1:  # the kernels write dk, dv per q head
    dk = dk.astype(jnp.float32).reshape(batch, seq, hkv, group, d).sum(axis=3).astype(k.dtype)
    dv = dv.astype(jnp.float32).reshape(batch, seq, hkv, group, d).sum(axis=3).astype(v.dtype)
  return dq, dk, dv
