"""The Mosaic GPU (Hopper) attention forward: warp-specialised, block-sparse.

One CTA per (q head group, `consumers * block_q` query rows, batch row), or
with `persistent` one per SM walking its share of those items. `consumers`
warpgroups (2 or 3) each own block_q rows and run QK^T, the online softmax
and PV on the tensor cores (wgmma); one producer warpgroup streams the CTA's
non-empty K/V tiles (`block_map` work lists) through a ring of `num_stages`
shared-memory slots (TMA). Two consumers alternate through a schedule
barrier (one's softmax under the other's products); three run free.

Per listed tile each consumer reads its own rows' tile state: empty (skipped,
only the barrier steps kept), full (no mask), or partial (`mask_tile`). Empty
rows (padding) get 0 out and lse = BIG. bf16/f16, head dims 64 and 128; on
CPU it lowers (tests) but cannot run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import pad_states, tile_states
from tfjax.ops.kernels.mosaic_gpu_common import (LOG2E, clamp_start, continue_ring, fill_ring,
                                                 length_multiple, load_vec, longest_first,
                                                 mask_tile, mosaic_params, persistent_share,
                                                 sm_count, smem_transforms, transposed,
                                                 unless_empty, warpgroup_registers,
                                                 warpgroup_schedule, when_inside)

BIG = 1e30  # the lse of a row with no key (as the Triton kernels)


@dataclasses.dataclass(frozen=True)
class FwdConfig:
  """Tiles and options of the Mosaic GPU forward.

  Defaults: what ships at head dim 128 below 8192 rows; `heuristic_config`
  picks the shipped config for every shape.
  """
  block_q: int = 64         # query rows per consumer warpgroup
  block_k: int = 128        # keys per K/V tile
  num_stages: int = 2       # K/V shared-memory ring depth
  # q heads one CTA walks in turn (same work list; the K/V stream runs on
  # and the next head's Q tile is prefetched)
  heads: int = 1
  lpt: bool = True          # launch the query tiles with the most key blocks first
  # Every query tile of one head group before the next group's (grid (head
  # groups, tiles): Mosaic GPU launches the last grid axis fastest), so the
  # CTAs in flight share their K/V tiles in L2.
  heads_outer: bool = True
  # No automatic warpgroup barriers nor cross-warp reduction scratch (the
  # kernel orders its own shared-memory stores and reduces within warps).
  lean: bool = False
  # A consumer whose own rows meet nothing of a listed key block skips its
  # products and softmax there, keeping only the barrier steps.
  skip_empty: bool = True
  consumers: int = 2        # consumer warpgroups per CTA, 2 or 3
  # One CTA per SM (or `persistent_ctas`, for tests), each walking its share
  # of the (head, query tile) items longest first, the next item's Q tile,
  # scalars and key bounds read under the current item's tiles (heads=1).
  persistent: bool = False
  persistent_ctas: int | None = None

  @property
  def multiple(self) -> int:
    return math.lcm(length_multiple(self.consumers, self.block_q), self.block_k)

  @property
  def cta_q(self) -> int:
    return self.consumers * self.block_q

  @property
  def registers(self) -> tuple[int, int]:
    return warpgroup_registers(self.consumers)


def heuristic_config(head_dim: int, seq_len: int | None = None) -> FwdConfig:
  """The shipped forward for a head dim and query rows per sequence (None:
  unknown). Head dim 64: three consumers on a persistent grid; 128: two
  consumers, or from 8192 rows three with 64-key tiles (registers). H100/H200
  timings: tools/kernel_lab/NOTES_attention.md."""
  if head_dim <= 64:
    return FwdConfig(consumers=3, persistent=True)
  if seq_len is not None and seq_len >= 8192:
    return FwdConfig(block_k=64, consumers=3)
  return FwdConfig()


def supported(dtype, head_dim: int) -> bool:
  """The dtypes and head dims the Mosaic GPU kernels take."""
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
      head_dim in (64, 128)


class FwdSchedule(NamedTuple):
  """The forward's walk, from the key intervals alone (see `fwd_schedule`).

  order:  int32[batch * n_cta] the CTAs' (batch, query tile) in launch order,
          flattened as b * n_cta + tile (local to the device's batch slice).
  blocks, counts: `block_map.WorkList` fields at (consumers * block_q, block_k).
  states: int32[batch, n_cta, consumers, n_k] each consumer's own tile per list
          entry (`warpgroup_schedule`).
  """
  order: jax.Array
  blocks: jax.Array
  counts: jax.Array
  states: jax.Array


def fwd_schedule(ks, ke, cfg: FwdConfig, kv_len: int | None = None) -> FwdSchedule:
  """The forward's work lists for int32[batch, seq] key intervals [ks, ke)."""
  batch, seq = ks.shape
  kv_len = seq if kv_len is None else kv_len
  n_cta = -(-seq // cfg.cta_q)
  states = pad_states(tile_states(ks, ke, cfg.block_q, cfg.block_k, kv_len, split_partial=True),
                      n_cta * cfg.consumers, kv_len // cfg.block_k)
  wl, own = warpgroup_schedule(states, cfg.consumers)
  order = (longest_first(wl.counts) if cfg.lpt
           else jnp.arange(batch * n_cta, dtype=jnp.int32))
  return FwdSchedule(order, wl.blocks, wl.counts, own)


def forward(q, k, v, ks, ke, *, scale: float, cfg: FwdConfig,
            sched: FwdSchedule | None = None):
  """(out [batch, seq, q_heads, d], lse float32[batch, q_heads, seq], base 2).

  sched: `fwd_schedule(ks, ke, cfg, kv_len)` computed beforehand, or None.
  """
  # Imported here: Pallas's Mosaic GPU module takes ~0.4 s to import, needed on Hopper only.
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  bq, bk, stages = cfg.block_q, cfg.block_k, cfg.num_stages
  nh = math.gcd(cfg.heads, hq)
  persistent = cfg.persistent
  if persistent and nh > 1:
    raise ValueError("FwdConfig.persistent takes heads=1")
  nbuf = 2 if nh > 1 or persistent else 1  # Q tiles per consumer
  n_cons, cta_q = cfg.consumers, cfg.cta_q
  if seq % cfg.multiple or kv_len % bk:
    raise ValueError(f"lengths ({seq}, {kv_len}) must be multiples of ({cfg.multiple}, {bk})")
  if not supported(dtype, d):
    raise ValueError(f"Mosaic GPU forward takes bf16/f16 and head dim 64/128, got {dtype}/{d}")
  nq, nk = -(-seq // cta_q), kv_len // bk
  order, blocks, counts, states = fwd_schedule(ks, ke, cfg, kv_len) if sched is None else sched
  pingpong = n_cons == 2
  regs_consumer, regs_producer = cfg.registers
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  n_hg = hq // nh
  n_items = n_hg * batch * nq
  n_ctas = min(cfg.persistent_ctas or sm_count(), n_items) if persistent else 0

  def kernel(order_ref, blocks_ref, counts_ref, states_ref, ks_ref, ke_ref,
             q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
    wg = lax.axis_index("wg")
    (q_smem, k_smem, v_smem, lse_smem), (k_bar, v_bar, q_bar), \
        (k_free, v_free), sched_bar = scoped

    # A CTA's work items (q head, batch row, query tile), in turn: its nh
    # heads of one query tile, or with `persistent` its share of all of them
    # (`persistent_share`).
    if persistent:
      n_mine, share = persistent_share(n_items, n_ctas, n_hg, order_ref)

      def item(i):
        h, flat = share(i)
        return h, lax.div(flat, jnp.int32(nq)), lax.rem(flat, jnp.int32(nq))
    else:
      hg = lax.axis_index("hg")
      flat = order_ref[lax.axis_index("tile")]
      b0, qi0 = lax.div(flat, jnp.int32(nq)), lax.rem(flat, jnp.int32(nq))
      n_mine = nh
      item = lambda i: (hg * nh + i, b0, qi0)

    def sched():
      if pingpong:
        plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(sched_bar)

    @pl.when(wg < n_cons)
    def _consumer():
      plgpu.set_max_registers(regs_consumer, action="increase")
      # With three consumers the last CTA may reach past the sequence: its
      # surplus warpgroups' tiles are all empty (the schedule pads them), so
      # they only keep the barrier steps; they load no Q and store nothing,
      # and read the last real rows' intervals, which no tile of theirs uses.
      ragged = seq % cta_q != 0
      first_row = lambda qi: qi * cta_q + wg * bq

      def load_q(h, b, qi, buf):
        row0 = first_row(qi)

        @when_inside(pl, row0, seq, ragged)
        def _():
          plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h],
                                  q_smem.at[wg, buf], q_bar.at[wg * nbuf + buf])

      def key_bounds(b, qi):
        row_ld = clamp_start(first_row(qi), seq, bq, ragged)
        return (load_vec(plgpu, ks_ref.at[b, pl.ds(row_ld, bq)], row_layout),
                load_vec(plgpu, ke_ref.at[b, pl.ds(row_ld, bq)], row_layout))

      def describe(i):
        """Item i's (head, batch row, query tile), list length, first key
        block and own tile state, and its rows' key bounds."""
        h, b, qi = item(i)
        return (h, b, qi, counts_ref[b, qi], blocks_ref[b, qi, 0], states_ref[b, qi, wg, 0],
                *key_bounds(b, qi))

      if persistent:
        first = describe(jnp.int32(0))
        pl.when(n_mine > 0)(lambda: load_q(*first[:3], 0))
      else:
        load_q(*item(jnp.int32(0)), 0)
        bounds = key_bounds(b0, qi0)  # the same rows for every head

      def item_body(i, carry):
        # g0: K/V tiles consumed before this item (the ring's position)
        if persistent:
          # This item's scalars and bounds were read during the item before;
          # the next item's are read now, their latency hidden under its tiles.
          g0, this = carry
          nxt = describe(lax.min(i + 1, n_mine - 1))
          h, b, qi, n, kb_first, state_first, ks_row, ke_row = this
        else:
          g0 = carry
          h, b, qi = item(i)
          n = counts_ref[b, qi]
          kb_first, state_first = blocks_ref[b, qi, 0], states_ref[b, qi, wg, 0]
          ks_row, ke_row = bounds
        row0 = first_row(qi)
        in_seq = when_inside(pl, row0, seq, ragged)
        buf = lax.rem(i, jnp.int32(nbuf))
        qo_smem = q_smem.at[wg, buf]
        if nbuf > 1:
          @pl.when(i + 1 < n_mine)
          def _prefetch():
            # The other buffer holds the previous item's output: its store
            # must have been read out before the next Q tile lands there.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            load_q(*(nxt[:3] if persistent else item(i + 1)), 1 - buf)

        @pl.when(n > 0)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(g0, jnp.int32(stages))])

        if pingpong:  # the second consumer starts half a step behind
          pl.when((wg == 1) & (i == 0))(sched)
        in_seq(lambda: plgpu.barrier_wait(q_bar.at[wg * nbuf + buf]))

        def body(t, carry):
          acc, m, l, kb, state = carry
          g = g0 + t
          slot = lax.rem(g, jnp.int32(stages))
          # The next tile's key block and state, read now: their latency hides
          # under this tile's matrix products instead of stalling the mask test.
          t_next = lax.min(t + 1, jnp.int32(nk - 1))
          kb_next = blocks_ref[b, qi, t_next]
          state_next = states_ref[b, qi, wg, t_next]

          def wait_next_k():
            @pl.when(t + 1 < n)
            def _():
              plgpu.barrier_wait(k_bar.at[lax.rem(g + 1, jnp.int32(stages))])

          def wait_v_and_turn():
            # Ping-pong: hand the tensor cores over, wait for V, then for them.
            if pingpong:
              plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(v_bar.at[slot])
            if pingpong:
              plgpu.barrier_wait(sched_bar)

          def tile():
            def qk(acc_ref):
              plgpu.wgmma(acc_ref, qo_smem, transposed(plgpu, k_smem.at[slot]))
              sched()
              return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])

            s = mask_tile(plgpu, s, state, 1, kb * bk, lambda: ks_row, lambda: ke_row)
            # m is the running max of the unscaled logits: the scale goes into
            # exp2's argument, one fused multiply-add per element.
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2((m - m_new) * qk_scale)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new * qk_scale, s.shape, [0]))
            acc_new = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_new = l * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc_new, l_new, m_new, p16 = lax.optimization_barrier((acc_new, l_new, m_new, p16))
            wait_v_and_turn()

            def pv(acc_ref):
              plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
              wait_next_k()

            return pl.run_state(pv)(plgpu.ACC.init(acc_new)), m_new, l_new

          def skip():
            # The same barrier steps as tile(), in the same order (every
            # warpgroup tracks each barrier's phase itself), without the work.
            sched()
            plgpu.barrier_arrive(k_free.at[slot])
            wait_v_and_turn()
            wait_next_k()
            return acc, m, l

          acc, m, l = unless_empty(cfg.skip_empty, state, tile, skip)
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m, l, kb_next, state_next

        m0 = plgpu.layout_cast(jnp.full((bq,), -BIG, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
        acc0 = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), wgmma_layout)
        acc, m, l, _, _ = lax.fori_loop(0, n, body, (acc0, m0, l0, kb_first, state_first))
        live = l > 0.0
        l_safe = jnp.where(live, l, 1.0)
        acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])

        @in_seq
        def _store():
          qo_smem[...] = acc.astype(dtype)
          lse_smem[wg, buf] = jnp.where(
              live, m * qk_scale + jnp.log(l_safe) * (1.0 / math.log(2.0)), BIG)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, bq), h])
          plgpu.copy_smem_to_gmem(lse_smem.at[wg, buf], lse_ref.at[b, h, pl.ds(row0, bq)])
        return (g0 + n, nxt) if persistent else g0 + n

      lax.fori_loop(0, n_mine, item_body, (jnp.int32(0), first) if persistent else jnp.int32(0))
      if pingpong:
        pl.when(wg == 0)(sched)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == n_cons)
    def _producer():
      plgpu.set_max_registers(regs_producer, action="decrease")

      def copy(h, b, qi, t, slot, wait):
        """K/V tile t of the item's list into `slot`, each half once its
        previous tile has been released (`wait`)."""
        rows, hk = pl.ds(blocks_ref[b, qi, t] * bk, bk), lax.div(h, jnp.int32(group))
        wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
        wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

      if persistent:
        def stream(i, g):
          h, b, qi = item(i)

          def one(t, slot, g):
            copy(h, b, qi, t, slot, lambda bar: pl.when(g >= stages)(
                lambda: plgpu.barrier_wait(bar)))

          return continue_ring(counts_ref[b, qi], stages, g, one)

        lax.fori_loop(0, n_mine, stream, jnp.int32(0))
      else:
        n = counts_ref[b0, qi0]

        def at(g, slot, wait):  # g counts over the CTA's heads
          hh = lax.div(g, n)
          copy(hg * nh + hh, b0, qi0, g - hh * n, slot, wait)

        fill_ring(pl, n * nh, stages, lambda g, slot: at(g, slot, lambda bar: None),
                  lambda g, slot: at(g, slot, plgpu.barrier_wait))

  def entry(*refs):
    transforms = smem_transforms(plgpu, dtype, d)
    smem = [
        plgpu.SMEM((n_cons, nbuf, bq, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
        plgpu.SMEM((n_cons, nbuf, bq), jnp.float32),
    ]
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=n_cons * nbuf)),
        (plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  if persistent:
    grid, names = (n_ctas,), ("cta",)
  elif cfg.heads_outer:
    grid, names = (n_hg, batch * nq), ("hg", "tile")
  else:
    grid, names = (batch * nq, n_hg), ("tile", "hg")
  out, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, hq, seq), jnp.float32)],
      grid=grid,
      grid_names=names,
      num_threads=n_cons + 1,
      thread_name="wg",
      compiler_params=mosaic_params(plgpu, cfg.lean),
  )(order, blocks, counts, states, ks, ke, q, k, v)
  return out, lse
