"""The Mosaic GPU backward's dk/dv kernel (with `VjpConfig.dq=FROM_DS` it also
stores its dS^T tiles for mosaic_gpu_vjp_ds.dq_from_ds).

Per CTA `consumers_dkv` warpgroups of block_k_dkv keys each (2 or 3), their
K and V resident in shared memory; a producer warpgroup streams the key
block's non-empty query tiles (q, dO, lse, delta, key bounds) through a ring.
dV and dK accumulate in registers; S^T and dP^T are recomputed per tile. With
three consumers the last CTA may reach past the sequence: its surplus
warpgroups read the last real tile, meet only empty tiles and store nothing.
With `persistent_dkv` the grid is one CTA per SM walking its share of the
(head, key chunk, batch row) items, the next item's K/V loaded under the
current item's tiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.mosaic_gpu_common import (LOG2E, DqKernel, SdpGrouping, clamp_start,
                                                 continue_ring, fill_ring, grid_position,
                                                 load_vec, mask_tile, mosaic_params,
                                                 persistent_share, products_in_one_group,
                                                 sm_count, smem_transforms, transposed,
                                                 unless_empty, warpgroup_registers,
                                                 when_inside)
from tfjax.ops.kernels.mosaic_gpu_vjp_ds import route_capacity


def dkv(q, k, v, do, lse, delta, ks, ke, sched, *, scale, cfg, ds_route=None):
  """dk, dv per q head [batch, seq, q_heads, d] (GQA groups summed by the caller);
  with cfg.dq FROM_DS also the dS^T tiles for `dq_from_ds`, at the rows that
  `ds_route` (a `DsRoute`) gives them."""
  # Imported here: Pallas's Mosaic GPU module takes ~0.4 s to import, needed on Hopper only.
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  group = hq // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = cfg.block_q_dkv, cfg.block_k_dkv, cfg.stages_dkv
  n_cons = cfg.consumers_dkv
  if n_cons == 3 and d > 64:
    raise ValueError("VjpConfig.consumers_dkv=3 takes head dim 64")
  regs_consumer, regs_producer = warpgroup_registers(n_cons, cfg.consumer_regs)
  cta_k = n_cons * bk
  nq, nkc = seq // bq, -(-seq // cta_k)
  blocks, counts, states, order = sched  # mosaic_gpu_vjp.DkvSchedule
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  tr = smem_transforms(plgpu, dtype, d)
  sdp_group = cfg.sdp is SdpGrouping.GROUPED  # S and dP in one wgmma group here too

  ds_out = cfg.dq is DqKernel.FROM_DS
  tr_ds = smem_transforms(plgpu, dtype, bq)

  cap = route_capacity(ds_route, cfg) if ds_out else 0

  persistent = cfg.persistent_dkv
  nbuf = 2 if persistent else 1  # K/V buffers per consumer
  n_items = hq * nkc * batch
  # Two dS^T staging buffers per consumer: a store may then stay in flight
  # while the next tile's is written. At head dim 128 with two K/V buffers
  # this fills shared memory to within 1 KiB (`_query_tile_smem`).
  ds_bufs = 2
  # persistent_dkv=1: one CTA per SM; N > 1: N CTAs (tests use a few, so that
  # every CTA walks several items).
  n_ctas = min(cfg.persistent_ctas or sm_count(), n_items) if persistent else 0

  def kernel(*refs):
    # refs: ([order,] blocks, counts, states, q, k, v, do, lse, delta, ks, ke,
    # [dS^T rows,] dk, dv, [dS^T out,] scoped)
    refs = list(refs)
    order_ref = refs.pop(0) if persistent else None
    (blocks_ref, counts_ref, states_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
     delta_ref, ks_ref, ke_ref) = refs[:11]
    if ds_out:
      rows_ref, dk_ref, dv_ref, ds_ref, scoped = refs[11:]
    else:
      dk_ref, dv_ref, scoped = refs[11:]
    wg = lax.axis_index("wg")
    (k_smem, v_smem, q_smem, do_smem, f32_rows, i32_rows, *ds_smem), \
        (k_bar, v_bar, q_bar, do_bar, vec_bar), free = scoped
    lse_smem, delta_smem, ks_smem, ke_smem = _row_vectors(f32_rows, i32_rows)

    if persistent:
      n_mine, share = persistent_share(n_items, n_ctas, hq, order_ref)

      def item(i):
        h, pair = share(i)
        n_kc = jnp.int32(nkc)
        return h, lax.rem(pair, n_kc), lax.div(pair, n_kc)
    else:
      h0, j0, b0, _ = grid_position("kv")
      n_mine = 1
      item = lambda i: (h0, j0, b0)

    def keep_ds(h, j, b, t, stored, ds16):
      """dS^T of list entry t to global memory for the dq kernel (ds_out), through
      `ds_bufs` shared-memory buffers per consumer, taken in turn by its stores
      (`stored` so far; a skipped tile stores nothing): the store that last
      used the buffer must have read it first. Returns the new count."""
      if not ds_out:
        return stored
      buf = ds_smem[0].at[wg, lax.rem(stored, jnp.int32(ds_bufs))]
      plgpu.wait_smem_to_gmem(ds_bufs - 1, wait_read_only=True)
      buf[...] = ds16
      plgpu.commit_smem()
      row = h * jnp.int32(cap) + rows_ref[b, j, wg, t]
      plgpu.copy_smem_to_gmem(buf, ds_ref.at[row])
      return stored + 1

    @pl.when(wg < n_cons)
    def _consumer():
      plgpu.set_max_registers(regs_consumer, action="increase")
      # A surplus warpgroup of the last CTA (three consumers) reads the last
      # real key block, meets no row (its tiles are empty) and stores nothing.
      ragged = seq % cta_k != 0

      def load_kv(i, buf):
        h, j, b = item(i)
        kb_load = clamp_start(j * cta_k + wg * bk, seq, bk, ragged)
        hk = lax.div(h, jnp.int32(group))
        kv = wg * nbuf + buf
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kb_load, bk), hk], k_smem.at[kv],
                                k_bar.at[kv])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kb_load, bk), hk], v_smem.at[kv],
                                v_bar.at[kv])

      if persistent:
        pl.when(n_mine > 0)(lambda: load_kv(jnp.int32(0), 0))
      else:
        load_kv(0, 0)
      zeros = lambda shape: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)

      def item_body(i, carry):
        g, stored = carry  # ring tiles consumed and dS^T tiles stored before this item
        buf = lax.rem(i, jnp.int32(nbuf)) if persistent else 0
        h, j, b = item(i)
        n = counts_ref[b, j]
        kb0 = j * cta_k + wg * bk
        # One flat index per (consumer, buffer): a literal buffer index in a
        # ref's indexer would reach the tile loop's lax.cond as a constant
        # operand, which Mosaic GPU on JAX 0.11 fails to lower.
        kv = wg * nbuf + buf
        with jax.named_scope("kv_wait"):  # profiler regions: mosaic_gpu_common.profiling
          plgpu.barrier_wait(k_bar.at[kv])
          plgpu.barrier_wait(v_bar.at[kv])
        k_tile, v_tile = k_smem.at[kv], v_smem.at[kv]

        def prefetch():
          # The next item's K and V into the other buffer, once the stores
          # of the item before this one (dK and dV, staged there) have read it.
          @pl.when(i + 1 < n_mine)
          def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            load_kv(i + 1, 1 - buf)

        def body(t, carry):
          dk, dv, state, stored = carry
          slot = lax.rem(g + t, jnp.int32(stages))
          state_next = states_ref[b, j, wg, lax.min(t + 1, jnp.int32(nq - 1))]
          plgpu.barrier_wait(q_bar.at[slot])

          def tile():
            dv_new, dk_new, ds16 = _key_tile_grads(
                plgpu, pl, dk, dv, state, k_tile, v_tile, q_smem.at[slot], do_smem.at[slot],
                do_bar.at[slot], vec_bar.at[slot], lse_smem.at[slot], delta_smem.at[slot],
                ks_smem.at[slot], ke_smem.at[slot], kb0=kb0, qk_scale=qk_scale,
                sdp_group=sdp_group)
            return dv_new, dk_new, keep_ds(h, j, b, t, stored, ds16)

          def skip():  # our keys meet none of these rows; the same waits (phases)
            plgpu.barrier_wait(do_bar.at[slot])
            plgpu.barrier_wait(vec_bar.at[slot])
            return dv, dk, stored

          with jax.named_scope("tile"):
            dv, dk, stored = unless_empty(cfg.skip_empty, state, tile, skip)
          plgpu.barrier_arrive(free.at[slot])
          if persistent:
            pl.when(t == 0)(prefetch)
          return dk, dv, state_next, stored

        with jax.named_scope("tiles"):
          dk, dv, _, stored = lax.fori_loop(
              0, n, body, (zeros((bk, d)), zeros((bk, d)), states_ref[b, j, wg, 0], stored))
        if persistent:
          pl.when(n == 0)(prefetch)
        rows = pl.ds(kb0, bk)
        with jax.named_scope("store"):
          when_inside(pl, kb0, seq, ragged)(lambda: _store_key_grads(
              plgpu, dk * scale, dv, k_tile, v_tile, dk_ref.at[b, rows, h],
              dv_ref.at[b, rows, h], wait=not persistent))
        return g + n, stored

      with jax.named_scope("consumer"):
        if persistent:
          lax.fori_loop(0, n_mine, item_body, (jnp.int32(0), jnp.int32(0)))
          plgpu.wait_smem_to_gmem(0)
        else:
          item_body(jnp.int32(0), (jnp.int32(0), jnp.int32(0)))

    @pl.when(wg == n_cons)
    def _producer():
      plgpu.set_max_registers(regs_producer, action="decrease")

      def stream(i, g):
        h, j, b = item(i)
        return _stream_query_tiles(
            plgpu, pl, counts_ref[b, j], stages, bq, blocks_ref.at[b, j], b, h, q_ref, do_ref,
            lse_ref, delta_ref, ks_ref, ke_ref, q_smem, do_smem, lse_smem, delta_smem, ks_smem,
            ke_smem, q_bar, do_bar, vec_bar, free, g0=g if persistent else None)

      with jax.named_scope("producer"):
        if persistent:
          lax.fori_loop(0, n_mine, stream, jnp.int32(0))
        else:
          stream(0, None)

  def entry(*refs):
    smem = [
        plgpu.SMEM((n_cons * nbuf, bk, d), dtype, transforms=tr),
        plgpu.SMEM((n_cons * nbuf, bk, d), dtype, transforms=tr),
        *_query_tile_smem(plgpu, stages, bq, d, dtype, tr),
    ]
    if ds_out:
      smem.append(plgpu.SMEM((n_cons, ds_bufs, bk, bq), dtype, transforms=tr_ds))
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        *_key_block_barriers(plgpu, stages, n_cons, nbuf),
        collective_axes="wg",
    )

  shape = jax.ShapeDtypeStruct((batch, seq, hq, d), dtype)
  # dS^T [keys, rows] tiles, `cap` rows per head (`DsRoute`), written only where
  # the consumer's tile is not empty.
  ds_type = jax.ShapeDtypeStruct((hq * cap, bk, bq), dtype)
  inputs = (blocks, counts, states, q, k, v, do, lse, delta, ks, ke)
  if persistent:
    inputs = (order,) + inputs
  if ds_out:
    inputs += (ds_route.rows,)
  if persistent:
    grid, names = (n_ctas,), ("cta",)
  else:
    grid, names = (hq, nkc, batch), ("heads", "kv", "batch")
  return plgpu.kernel(
      entry,
      out_type=[shape, shape, ds_type] if ds_out else [shape, shape],
      grid=grid,
      grid_names=names,
      num_threads=n_cons + 1,
      thread_name="wg",
      compiler_params=mosaic_params(plgpu, cfg.lean),
  )(*inputs)


def _key_tile_grads(plgpu, pl, dk, dv, state, k_tile, v_tile, q_tile, do_tile, do_bar, vec_bar,
                    lse_row, delta_row, ks_row, ke_row, *, kb0, qk_scale, sdp_group):
  """One consumer's step of the dk/dv walk over a streamed query tile whose q
  has landed: (dV + P^T dO, dK + dS^T Q, dS^T in the input dtype), float32
  accumulators [block_k, d], waiting for dO (`do_bar`) and the tile's row
  vectors (`vec_bar`) where they are first read. S^T = K Q^T and dP^T =
  V dO^T are issued as one wgmma group with sdp_group, else S^T alone first
  and dP^T beside dV."""
  bk, bq = k_tile.shape[0], q_tile.shape[0]
  dtype = q_tile.dtype
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  if sdp_group:
    plgpu.barrier_wait(do_bar)
    s_t, dp_t = products_in_one_group(
        plgpu, pl, [(k_tile, transposed(plgpu, q_tile)),
                    (v_tile, transposed(plgpu, do_tile))], (bk, bq))
  else:
    def st_fn(acc_ref):
      plgpu.wgmma(acc_ref, k_tile, transposed(plgpu, q_tile))
      return acc_ref[...]

    s_t = pl.run_scoped(st_fn, plgpu.ACC((bk, bq), jnp.float32))
  plgpu.barrier_wait(vec_bar)
  p_t = _probs_t(plgpu, s_t, qk_scale, state, kb0, ks_row, ke_row, lse_row)
  delta_c = lambda: load_vec(plgpu, delta_row, col_layout)
  if sdp_group:
    ds16 = (p_t * (dp_t - lax.broadcast_in_dim(delta_c(), (bk, bq), [1]))).astype(dtype)

    def dv_dk(refs):
      plgpu.wgmma(refs[0], p_t.astype(dtype), do_tile)
      plgpu.wgmma(refs[1], ds16, q_tile)

    dv_new, dk_new = pl.run_state(dv_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
    return dv_new, dk_new, ds16
  plgpu.barrier_wait(do_bar)

  def dv_dp(refs):
    plgpu.wgmma(refs[0], p_t.astype(dtype), do_tile)
    plgpu.wgmma(refs[1], v_tile, transposed(plgpu, do_tile))

  zeros = plgpu.layout_cast(jnp.full((bk, bq), 0.0, jnp.float32), plgpu.Layout.WGMMA)
  dv_new, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
  ds16 = (p_t * (dp_t - lax.broadcast_in_dim(delta_c(), (bk, bq), [1]))).astype(dtype)

  def dk_fn(acc_ref):
    plgpu.wgmma(acc_ref, ds16, q_tile)

  return dv_new, pl.run_state(dk_fn)(plgpu.ACC.init(dk)), ds16


def _probs_t(plgpu, s_t, qk_scale, state, k0, lo_ref, hi_ref, lse_ref):
  """P^T [keys, rows] = exp2(qk_scale * S^T - lse) for unscaled logits S^T of
  keys k0.. against streamed query rows whose visible keys are [lo, hi)
  (shared-memory vectors, with lse), masked as the tile's `block_map` state
  says (`mosaic_gpu_common.mask_tile`). The scale rides in exp2's argument (one
  fused multiply-add)."""
  col = plgpu.Layout.WGMMA.reduce(0)
  s_t = mask_tile(plgpu, s_t, state, 0, k0, lambda: load_vec(plgpu, lo_ref, col),
                  lambda: load_vec(plgpu, hi_ref, col))
  return jnp.exp2(s_t * qk_scale
                  - lax.broadcast_in_dim(load_vec(plgpu, lse_ref, col), s_t.shape, [1]))


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
