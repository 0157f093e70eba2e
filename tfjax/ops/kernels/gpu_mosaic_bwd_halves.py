"""Block-sparse Transfusion attention for Hopper: the dk/dv kernel as two
independent halves per SM (MosaicBwdConfig.halves_dkv).

The two-kernel backward's dk/dv kernel (`gpu_mosaic_bwd_two_kernel.dkv`)
runs two consumer warpgroups on one work item at a time, 64 keys each, fed
by one ring of query tiles; so both wait for K and V at the start of an item
and both convert and store dK and dV at its end, and nothing fills the
tensor cores meanwhile (NOTES_attention.md M50: about 5 us per item, ~90 us
of the 366 us kernel at 8192/128). Here one persistent CTA per SM holds two
halves, each a consumer and its own producer warpgroup walking their own
share of (head, 64-key block, batch row) items through their own ring, so
one half's item boundary falls under the other half's tiles. Each half
streams only the tiles its 64 keys meet (the shared ring had to stream
the union of both consumers' lists). The price: the two halves read their
query tiles separately, and at head dim 128 each half's shared memory leaves
room for one dS^T staging buffer (the launched kernel has two per consumer).

Same schedule (`gpu_mosaic_bwd.DkvSchedule`, the 128-key chunks' lists and
each consumer's own tile states) and the same dS^T route
(`gpu_mosaic_bwd_ds.DsRoute`) as the two-consumer kernels: an item is a
(chunk, consumer) pair of that schedule. Registers: four warpgroups of 128
threads launch at 128 registers each; the consumers take 232, the producers 24.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import EMPTY
from tfjax.ops.kernels.gpu_mosaic_bwd import (_key_block_barriers, _query_tile_smem,
                                              _row_vectors, _store_key_grads, copy_query_tile)
from tfjax.ops.kernels.gpu_mosaic_bwd_ds import route_capacity
from tfjax.ops.kernels.gpu_mosaic_parts import (LOG2E, mosaic_params, persistent_share, sm_count,
                                                smem_transforms)

CONSUMER_REGS, PRODUCER_REGS = 232, 24  # 2 x 232 + 2 x 24 = 4 x 128


def dkv(q, k, v, do, lse, delta, ks, ke, sched, *, scale, cfg, ds_route=None):
  """dk, dv per q head [batch, seq, q_heads, d], and with cfg.dq_from_ds the
  dS^T tiles at `ds_route`'s rows: `gpu_mosaic_bwd_two_kernel.dkv`'s outputs,
  bit for bit (the same products in the same order per key block)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  from tfjax.ops.kernels.gpu_mosaic_bwd_two_kernel import _key_tile_grads

  batch, seq, hq, d = q.shape
  group = hq // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = cfg.block_q_dkv, cfg.block_k_dkv, cfg.stages_dkv
  if cfg.consumers_dkv != 2 or not cfg.skip_empty:
    raise ValueError("MosaicBwdConfig.halves_dkv takes consumers_dkv=2 and skip_empty=1 "
                     "(its items are the two consumers' halves of the 128-key chunks)")
  cta_k = 2 * bk
  if seq % cta_k:
    raise ValueError(f"halves_dkv: sequence length {seq} is not a multiple of {cta_k}")
  nkc = seq // cta_k
  blocks, counts, states, order = sched
  qk_scale = float(scale) * LOG2E
  tr = smem_transforms(plgpu, dtype, d)
  ds_out = bool(cfg.dq_from_ds)
  tr_ds = smem_transforms(plgpu, dtype, bq)
  cap = route_capacity(ds_route, cfg) if ds_out else 0
  # Per half at head dim 128: K, V 32 KiB, a 2-deep ring of q and dO 64 KiB,
  # one 8 KiB dS^T buffer (a second would pass the 227 KiB of the SM).
  ds_bufs = 2 if d <= 64 else 1
  n_items = hq * nkc * batch * 2  # (head, chunk, batch row, consumer half)
  n_ctas = min(sm_count() if cfg.halves_dkv == 1 else cfg.halves_dkv, -(-n_items // 2))
  n_workers = 2 * n_ctas

  def kernel(*refs):
    (order_ref, blocks_ref, counts_ref, states_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
     delta_ref, ks_ref, ke_ref) = refs[:12]
    if ds_out:
      rows_ref, dk_ref, dv_ref, ds_ref, scoped = refs[12:]
    else:
      dk_ref, dv_ref, scoped = refs[12:]
    wg = lax.axis_index("wg")
    half = lax.rem(wg, 2)  # warpgroups 0, 1 consume; 2, 3 produce for 0, 1
    (k_smem, v_smem, q_smem, do_smem, f32_rows, i32_rows, *ds_smem), \
        (k_bar, v_bar, q_bar, do_bar, vec_bar), free = scoped
    lse_smem, delta_smem, ks_smem, ke_smem = _row_vectors(f32_rows, i32_rows)
    # The two halves of a CTA take ranks n_ctas apart: different lists, so
    # that their item boundaries drift apart.
    n_mine, share = persistent_share(n_items, n_workers, 2 * hq, order_ref,
                                     worker=half * n_ctas + lax.axis_index("cta"))

    def item(i):
      """(q head, consumer w of the chunk, chunk, batch row) of item i."""
      sub, pair = share(i)
      n_kc = jnp.int32(nkc)
      return lax.div(sub, 2), lax.rem(sub, 2), lax.rem(pair, n_kc), lax.div(pair, n_kc)

    ring = lambda g: half * stages + lax.rem(g, jnp.int32(stages))

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(CONSUMER_REGS, action="increase")
      zeros = lambda: plgpu.layout_cast(jnp.full((bk, d), 0.0, jnp.float32),
                                        plgpu.Layout.WGMMA)
      k_tile, v_tile = k_smem.at[half], v_smem.at[half]

      def item_body(i, carry):
        g, stored = carry  # tiles consumed and dS^T tiles stored before this item
        h, w, j, b = item(i)
        n = counts_ref[b, j]
        kb0 = j * cta_k + w * bk
        # The last item's dK/dV stores (staged in K and V) have read them.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        hk = lax.div(h, jnp.int32(group))
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kb0, bk), hk], k_tile, k_bar.at[half])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kb0, bk), hk], v_tile, v_bar.at[half])
        plgpu.barrier_wait(k_bar.at[half])
        plgpu.barrier_wait(v_bar.at[half])

        def keep_ds(t, stored, ds16):
          if not ds_out:
            return stored
          buf = ds_smem[0].at[half, lax.rem(stored, jnp.int32(ds_bufs))]
          plgpu.wait_smem_to_gmem(ds_bufs - 1, wait_read_only=True)
          buf[...] = ds16
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(buf, ds_ref.at[h * jnp.int32(cap) + rows_ref[b, j, w, t]])
          return stored + 1

        def body(t, carry):
          dk, dv, g, stored, state = carry
          state_next = states_ref[b, j, w, lax.min(t + 1, n - 1)]

          def tile():
            slot = ring(g)
            plgpu.barrier_wait(q_bar.at[slot])
            dv_new, dk_new, ds16 = _key_tile_grads(
                plgpu, pl, dk, dv, state, k_tile, v_tile, q_smem.at[slot], do_smem.at[slot],
                do_bar.at[slot], vec_bar.at[slot], lse_smem.at[slot], delta_smem.at[slot],
                ks_smem.at[slot], ke_smem.at[slot], kb0=kb0, qk_scale=qk_scale,
                sdp_group=cfg.sdp_group == 1)
            stored_new = keep_ds(t, stored, ds16)
            plgpu.barrier_arrive(free.at[slot])
            return dk_new, dv_new, g + 1, stored_new

          # Our keys meet none of these rows: the producer streamed nothing.
          dk, dv, g, stored = lax.cond(state == EMPTY, lambda: (dk, dv, g, stored), tile)
          return dk, dv, g, stored, state_next

        dk, dv, g, stored, _ = lax.fori_loop(
            0, n, body, (zeros(), zeros(), g, stored, states_ref[b, j, w, 0]))
        rows = pl.ds(kb0, bk)
        _store_key_grads(plgpu, dk * scale, dv, k_tile, v_tile, dk_ref.at[b, rows, h],
                         dv_ref.at[b, rows, h], wait=False)
        return g, stored

      lax.fori_loop(0, n_mine, item_body, (jnp.int32(0), jnp.int32(0)))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg >= 2)
    def _producer():
      plgpu.set_max_registers(PRODUCER_REGS, action="decrease")

      def stream(i, g):
        h, w, j, b = item(i)

        def one(t, g):
          live = states_ref[b, j, w, t] != EMPTY

          @pl.when(live)
          def _():
            slot = ring(g)
            pl.when(g >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
            copy_query_tile(plgpu, pl, pl.ds(blocks_ref[b, j, t] * bq, bq), slot, b, h, q_ref,
                            do_ref, lse_ref, delta_ref, ks_ref, ke_ref, q_smem, do_smem,
                            lse_smem, delta_smem, ks_smem, ke_smem, q_bar, do_bar, vec_bar)
          return g + live.astype(jnp.int32)

        return lax.fori_loop(0, counts_ref[b, j], one, g)

      lax.fori_loop(0, n_mine, stream, jnp.int32(0))

  def entry(*refs):
    smem = [
        plgpu.SMEM((2, bk, d), dtype, transforms=tr),
        plgpu.SMEM((2, bk, d), dtype, transforms=tr),
        *_query_tile_smem(plgpu, 2 * stages, bq, d, dtype, tr),
    ]
    if ds_out:
      smem.append(plgpu.SMEM((2, ds_bufs, bk, bq), dtype, transforms=tr_ds))
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        # K/V per half; q, dO, row vectors and release (by its one consumer)
        # per slot of the two rings.
        *_key_block_barriers(plgpu, 2 * stages, consumers=1, kv_buffers=2),
        collective_axes="wg",
    )

  shape = jax.ShapeDtypeStruct((batch, seq, hq, d), dtype)
  ds_type = jax.ShapeDtypeStruct((hq * cap, bk, bq), dtype)
  inputs = (order, blocks, counts, states, q, k, v, do, lse, delta, ks, ke)
  if ds_out:
    inputs += (ds_route.rows,)
  return plgpu.kernel(
      entry,
      out_type=[shape, shape, ds_type] if ds_out else [shape, shape],
      grid=(n_ctas,),
      grid_names=("cta",),
      num_threads=4,
      thread_name="wg",
      compiler_params=mosaic_params(plgpu, cfg.lean),
  )(*inputs)
