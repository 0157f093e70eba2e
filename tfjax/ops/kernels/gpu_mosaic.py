"""Block-sparse Transfusion attention for Hopper: Pallas Mosaic GPU kernels.

This file: the forward (`forward`) and the helpers both directions share;
the backward is in gpu_mosaic_bwd.py (fused) and gpu_mosaic_bwd_two_kernel.py.

Forward: one CTA per (q head, C * block_q query rows, batch row), C + 1
warpgroups (C = `MosaicFwdConfig.consumers`, 2 or 3):

  warpgroups 0..C-1  consumers: each owns block_q query rows (its Q tile in
                     shared memory), runs QK^T and PV on the tensor cores
                     (wgmma; the accumulators in registers, P from registers)
                     and the online softmax between them. With two, a
                     schedule barrier lets one warpgroup's softmax overlap the
                     other's matrix products; three (head dim 64) run free,
                     and the third hides latency instead.
  warpgroup C        producer: walks the CTA's compacted work list (its
                     non-empty key blocks, `block_map.q_blocks` at
                     (C * block_q, block_k) tiles) and streams those K and V
                     tiles into a ring of `num_stages` shared-memory slots with
                     the bulk tensor copy engine (TMA), waiting for the
                     consumers to release each slot.

With `MosaicFwdConfig.persistent` (the default at head dim 64) the grid is
one CTA per SM instead, each walking its share of those (head, query tile)
items: the ring runs on from item to item, and the next item's Q tile, list
length, first key block and key bounds are read under the current item's
tiles (H200: forward 14-22% faster at head dim 64, NOTES_attention.md M47).

Empty tiles are never visited. Per listed tile each consumer reads its own
rows' tile state (`warpgroup_schedule`): empty for its rows (the other
warpgroup's meet the key block), it skips the tile's work and keeps only the
barrier steps; full, no mask; partial, the mask from the rows' [k_start,
k_end) intervals, one comparison per element where one bound decides the
tile (`block_map.LOWER`/`UPPER`), else one unsigned one (`_mask_tile`).
Rows with an empty interval (padding) get 0 out and lse = BIG, like the
Triton kernel, whose backward (gpu._backward) consumes this kernel's
base-2 log-sum-exp unchanged.

bf16/f16 only, head dims 64 and 128 (dispatch falls back to the Triton
kernels otherwise). There is no interpret mode: on CPU the kernels lower to
their Mosaic GPU modules (tests check that) but cannot run. Run on an H100
with JAX 0.11.2 (2026-11-25): forward and backward match the Triton kernels
and the float32 XLA reference; GPU tests and timings in
benchmarks/NOTES_attention.md (runs M1-M4) and benchmarks/RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import (EMPTY, FULL, LOWER, UPPER, WorkList, coarsen, compact,
                                         pad_states, tile_states)

LOG2E = math.log2(math.e)
BIG = 1e30  # same convention as gpu.py: lse of a row with no key


@dataclasses.dataclass(frozen=True)
class MosaicFwdConfig:
  """block_q: rows per consumer warpgroup (the CTA covers 2 * block_q);
  block_k: keys per tile; num_stages: K/V shared-memory ring depth;
  heads: q heads one CTA walks in turn (its work list is the same for all;
  the K/V stream runs on across them and the next head's Q tile is
  prefetched); lpt: launch the query tiles with the most key blocks first;
  heads_outer: every query tile of one head group before the next group's
  (heads the slowest grid axis), so the CTAs in flight belong to one or two
  head groups and share their K/V tiles in L2; False interleaves the head
  groups at each query tile. Pallas's Mosaic GPU lowering launches the
  grid's last axis fastest (row-major, as on TPU; the Triton kernels'
  program_id(0) is the fastest), so this order is grid (head groups, tiles).
  On since the first Mosaic forward: every timing in NOTES_attention.md
  from M1 on ran it (until 2026-12-02 the flag was named for the opposite
  order and defaulted to False, which meant this same launch order)."""
  block_q: int = 64
  block_k: int = 128
  num_stages: int = 2
  heads: int = 1
  lpt: bool = True
  heads_outer: bool = True
  # Compile without Pallas's automatic warpgroup barriers and without scratch
  # for cross-warp reductions (tokamax's settings for its forward): the kernel
  # already orders its shared-memory stores (commit_smem before each TMA) and
  # reduces rows within warps.
  lean: bool = False
  # A consumer whose own block_q rows see nothing of a listed key block (the
  # CTA's other rows do) skips its matrix products and softmax for that tile
  # and only keeps the barrier protocol.
  skip_empty: bool = True
  # Consumer warpgroups per CTA (2 or 3; the CTA covers consumers * block_q
  # rows). Two alternate through a schedule barrier (one's softmax under the
  # other's matrix products); three run free, and the kernel pads the query
  # side to whole CTAs itself (the last CTA's surplus warpgroups idle).
  consumers: int = 2
  # 0: one CTA per (head group, query tile). 1: one CTA per SM (N > 1: N
  # CTAs, for tests), each walking its share of those items longest first in
  # snake order, the K/V ring running on from item to item and the next
  # item's Q tile loaded under the current item's tiles (heads=1 only).
  persistent: int = 0

  @property
  def multiple(self) -> int:
    return math.lcm(length_multiple(self.consumers, self.block_q), self.block_k)

  @property
  def cta_q(self) -> int:
    return self.consumers * self.block_q

  @property
  def registers(self) -> tuple[int, int]:
    return warpgroup_registers(self.consumers)


def length_multiple(consumers: int, block: int) -> int:
  """What a kernel whose CTAs split `consumers` blocks of `block` rows (or
  keys) needs the length to be a multiple of: two-consumer CTAs stay whole
  (their configs predate the padding and keep their modules), three pad
  their last CTA themselves."""
  return 2 * block if consumers == 2 else block


def warpgroup_registers(consumers: int, consumer_regs: int = 232) -> tuple[int, int]:
  """(consumer, producer) registers per thread: the SM's 64K over one CTA of
  `consumers` + 1 warpgroups of 128 threads; two consumers take 232 (producer
  40) or 240 (producer 24).

  Only these splits: `setmaxnreg` can hand out no more than the CTA was
  launched with (64K over its threads), and a request beyond that waits
  forever instead of failing (a four-consumer trial hung; NOTES M24).
  """
  if consumers not in (2, 3):
    raise ValueError(f"consumer warpgroups per CTA must be 2 or 3, got {consumers}")
  if consumers == 3:
    return 160, 24
  if consumer_regs not in (232, 240):
    raise ValueError(f"MosaicBwdConfig.consumer_regs must be 232 or 240, got {consumer_regs}: "
                     "two consumers and the producer share the SM's 64K registers")
  return consumer_regs, 40 if consumer_regs == 232 else 24


def _clamp_start(start, length: int, block: int, ragged: bool):
  """A warpgroup's first row (or key) for loads: inside the sequence.

  A surplus warpgroup of a ragged last CTA starts past the end; it reads the
  last real block instead (and stores nothing), so no input needs padding.
  """
  return lax.min(start, jnp.int32(length - block)) if ragged else start


def _when_inside(pl, start, length: int, ragged: bool):
  """Decorator: run the body when a warpgroup's first row (or key) `start`
  lies inside the sequence; unconditionally when no CTA reaches past it."""
  if not ragged:
    return lambda body: body()
  return pl.when(start < length)


def _compiler_params(plgpu, lean: bool):
  if lean:
    return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                                reduction_scratch_bytes=0)
  return plgpu.CompilerParams(approx_math=True)


# Helpers shared with the backward (gpu_mosaic_bwd.py); JAX 0.10 (CI) and 0.11
# (the device) spell some of these differently.
def _smem_transforms(plgpu, dtype, width, swizzle=128):
  """Tiling + swizzle of a shared-memory tile whose rows hold `width` elements
  (wgmma operands that meet in one instruction need the same swizzle)."""
  elem = jnp.dtype(dtype).itemsize
  swizzle = min(swizzle, width * elem)
  return (plgpu.TilingTransform((8, swizzle // elem)), plgpu.SwizzleTransform(swizzle))


def _transposed(plgpu, ref):
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # jax 0.10


def _load_vec(plgpu, ref, layout, optimized=False):
  try:
    return plgpu.load(ref, layout=layout, optimized=optimized)
  except TypeError:  # jax 0.10: the index is a positional argument
    return plgpu.load(ref, (), layout=layout, optimized=optimized)


def _longest_first(counts):
  """Launch order of the flattened work lists, longest first: a shorter tail of
  lone CTAs at the end of the grid."""
  return jnp.argsort(-counts.reshape(-1), stable=True).astype(jnp.int32)


def warpgroup_schedule(states, per_cta: int, *, by_keys: bool = False
                       ) -> tuple[WorkList, jax.Array]:
  """A CTA's work lists and each consumer warpgroup's tile per entry.

  states: int32[batch, nq, nk] `block_map` states at one warpgroup's tile
    (`tile_states`), padded with empty tiles to whole CTAs on the side the
    CTAs split: rows, or keys when `by_keys`.
  Returns (lists, own): the compacted non-empty tiles of each CTA of
  per_cta warpgroups (`block_map.WorkList` over CTAs: key blocks, or query
  blocks when `by_keys`), and int32[batch, n_cta, per_cta, list], warpgroup
  w's own tile state at every entry. One tile-state pass serves both, and is
  shared by every schedule at the same tiling.
  """
  if by_keys:
    states = jnp.swapaxes(states, 1, 2)
  batch, n, m = states.shape
  lists = compact(coarsen(states, per_cta, 1))
  own = states.reshape(batch, n // per_cta, per_cta, m)
  return lists, jnp.take_along_axis(own, lists.blocks[:, :, None, :], axis=3)


def _mask_tile(plgpu, s, state, key_axis: int, k0, lo, hi):
  """Logits s of keys k0.. (along key_axis) with -inf where a key lies outside
  its row's [k_start, k_end), by the tile's `block_map` state (a scalar):
  FULL keeps s, LOWER and UPPER test their one bound (one comparison per
  element), PARTIAL (and EMPTY) test both in one unsigned comparison,
  (k - k_start) < (k_end - k_start). lo(), hi(): the rows' int32 bounds as
  vectors along the other axis, in its reduced layout (called only by the
  branches that use them).

  Against two signed comparisons of k0 + iota on every partial tile: f+b 3%
  faster at 8192/64, 1-2% at the other shapes (NOTES_attention.md M42-M43).
  """
  other = 1 - key_axis
  b = lambda x: lax.broadcast_in_dim(x, s.shape, [other])
  iota = lambda: plgpu.broadcasted_iota(jnp.int32, s.shape, key_axis, layout=plgpu.Layout.WGMMA)
  cut = lambda keep: jnp.where(keep, s, -jnp.inf)

  def both():
    u = lambda x: lax.bitcast_convert_type(x, jnp.uint32)
    start = lo()
    width = jnp.maximum(hi() - start, 0)  # a dead row (empty interval): 0
    return cut(u(iota() - b(start - k0)) < u(b(width)))

  branches = [lambda: s, both, lambda: cut(iota() >= b(lo() - k0)),
              lambda: cut(iota() < b(hi() - k0))]
  # Anything else tests both bounds: PARTIAL, and EMPTY where a kernel runs
  # without skip_empty (its rows then meet no key: all -inf).
  index = jnp.where(state == FULL, 0, jnp.where(state == LOWER, 2,
                                                jnp.where(state == UPPER, 3, 1)))
  return lax.switch(index, branches)


def _fill_ring(pl, n, stages, issue, refill):
  """A producer warpgroup's ring of `stages` shared-memory slots: items 0 ..
  stages-1 (of n) by issue(t, slot) at once, then item t + stages into slot
  t mod stages by refill(t + stages, slot), which waits for the slot first."""
  for i in range(stages):
    pl.when(i < n)(functools.partial(issue, jnp.int32(i), i))

  @pl.loop(0, jnp.maximum(n - stages, 0))
  def _(t):
    slot = lax.rem(t, jnp.int32(stages))
    refill(t + stages, slot)


def _unless_empty(skip_empty, state, tile, skip):
  """A consumer's step over one listed tile: tile() (the products), or, with
  skip_empty, skip() where its own part of the tile is EMPTY (the same
  barrier waits and releases, no products; the outputs unchanged)."""
  return lax.cond(state == EMPTY, skip, tile) if skip_empty else tile()


def _persistent_share(n_items: int, n_ctas: int, heads: int, order_ref):
  """A persistent CTA's work items: (how many, i -> (head, order entry)).

  CTA c takes ranks i * n_ctas + (c, or n_ctas - 1 - c on odd rounds) of
  the n_items (head, order entry) pairs, the entries sorted longest list
  first (snake order keeps the CTAs' sums of work close) and the `heads`
  heads of one entry at adjacent ranks.
  """
  c = lax.axis_index("cta")
  rounds, rem = divmod(n_items, n_ctas)
  snake = lambda i: jnp.where(lax.rem(i, 2) == 0, c, n_ctas - 1 - c)
  n_mine = rounds + (snake(jnp.int32(rounds)) < rem).astype(jnp.int32)

  def share(i):
    r = i * n_ctas + snake(i)
    entry = order_ref[lax.div(r, jnp.int32(heads))]
    return lax.rem(r, jnp.int32(heads)), entry

  return n_mine, share


def _sm_count() -> int:
  """Streaming multiprocessors of the first GPU (a persistent grid's size);
  132 (an H100/H200 SXM) where no GPU is attached, as when lowering on a CPU."""
  try:
    return int(jax.devices("gpu")[0].core_count)
  except (RuntimeError, AttributeError, IndexError):
    return 132


def supported(dtype, head_dim: int) -> bool:
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


def fwd_schedule(ks, ke, cfg: MosaicFwdConfig, kv_len: int | None = None) -> FwdSchedule:
  """The forward's work lists for int32[batch, seq] key intervals [ks, ke)."""
  batch, seq = ks.shape
  kv_len = seq if kv_len is None else kv_len
  n_cta = -(-seq // cfg.cta_q)
  states = pad_states(tile_states(ks, ke, cfg.block_q, cfg.block_k, kv_len, split_partial=True),
                      n_cta * cfg.consumers, kv_len // cfg.block_k)
  wl, own = warpgroup_schedule(states, cfg.consumers)
  order = (_longest_first(wl.counts) if cfg.lpt
           else jnp.arange(batch * n_cta, dtype=jnp.int32))
  return FwdSchedule(order, wl.blocks, wl.counts, own)


def forward(q, k, v, ks, ke, *, scale: float, cfg: MosaicFwdConfig,
            sched: FwdSchedule | None = None):
  """(out [batch, seq, q_heads, d], lse float32[batch, q_heads, seq], base 2).

  sched: `fwd_schedule(ks, ke, cfg, kv_len)` computed beforehand, or None.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  bq, bk, stages = cfg.block_q, cfg.block_k, cfg.num_stages
  nh = math.gcd(cfg.heads, hq)
  persistent = bool(cfg.persistent)
  if persistent and nh > 1:
    raise ValueError("MosaicFwdConfig.persistent takes heads=1")
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
  n_ctas = min(_sm_count() if cfg.persistent == 1 else cfg.persistent,
               n_items) if persistent else 0

  def kernel(order_ref, blocks_ref, counts_ref, states_ref, ks_ref, ke_ref,
             q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
    wg = lax.axis_index("wg")
    (q_smem, k_smem, v_smem, lse_smem), (k_bar, v_bar, q_bar), \
        (k_free, v_free), sched_bar = scoped

    # A CTA's work items (q head, batch row, query tile), in turn: its nh
    # heads of one query tile, or with `persistent` its share of all of them
    # (`_persistent_share`).
    if persistent:
      n_mine, share = _persistent_share(n_items, n_ctas, n_hg, order_ref)

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

        @_when_inside(pl, row0, seq, ragged)
        def _():
          plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h],
                                  q_smem.at[wg, buf], q_bar.at[wg * nbuf + buf])

      def key_bounds(b, qi):
        row_ld = _clamp_start(first_row(qi), seq, bq, ragged)
        return (_load_vec(plgpu, ks_ref.at[b, pl.ds(row_ld, bq)], row_layout),
                _load_vec(plgpu, ke_ref.at[b, pl.ds(row_ld, bq)], row_layout))

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
        in_seq = _when_inside(pl, row0, seq, ragged)
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
              plgpu.wgmma(acc_ref, qo_smem, _transposed(plgpu, k_smem.at[slot]))
              sched()
              return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])

            s = _mask_tile(plgpu, s, state, 1, kb * bk, lambda: ks_row, lambda: ke_row)
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

          acc, m, l = _unless_empty(cfg.skip_empty, state, tile, skip)
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

          def one(t, g):
            slot = lax.rem(g, jnp.int32(stages))
            copy(h, b, qi, t, slot, lambda bar: pl.when(g >= stages)(
                lambda: plgpu.barrier_wait(bar)))
            return g + 1

          return lax.fori_loop(0, counts_ref[b, qi], one, g)

        lax.fori_loop(0, n_mine, stream, jnp.int32(0))
      else:
        n = counts_ref[b0, qi0]

        def at(g, slot, wait):  # g counts over the CTA's heads
          hh = lax.div(g, n)
          copy(hg * nh + hh, b0, qi0, g - hh * n, slot, wait)

        _fill_ring(pl, n * nh, stages, lambda g, slot: at(g, slot, lambda bar: None),
                   lambda g, slot: at(g, slot, plgpu.barrier_wait))

  def entry(*refs):
    transforms = _smem_transforms(plgpu, dtype, d)
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
      compiler_params=_compiler_params(plgpu, cfg.lean),
  )(order, blocks, counts, states, ks, ke, q, k, v)
  return out, lse
