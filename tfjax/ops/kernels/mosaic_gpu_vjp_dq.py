"""The Mosaic GPU backward's recomputing dq kernel.

The forward's walk over a query block's non-empty key blocks, `consumers_dq`
warpgroups of block_q_dq rows each (2 or 3), recomputing S and dP per tile;
with the forward's output it also computes delta = rowsum(o * dO) from the
tiles it loads anyway and runs before the dk/dv kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.mosaic_gpu_common import (LOG2E, SdpGrouping, clamp_start, fill_ring,
                                                 grid_position, load_vec, mask_tile,
                                                 mosaic_params, products_in_one_group,
                                                 smem_transforms, transposed, unless_empty,
                                                 warpgroup_registers, when_inside)


def dq(q, k, v, do, lse, delta, ks, ke, sched, *, scale, cfg, o=None):
  """dq [batch, seq, q_heads, d]: the forward's walk, with dP and dS.

  With `o` (the forward's output) instead of `delta`: (dq, delta), delta =
  rowsum(o * do) float32[batch, q_heads, seq] computed from the tiles the
  kernel loads anyway, for the dk/dv kernel that runs after it (no separate
  pass over o and dO).
  """
  # Imported here: Pallas's Mosaic GPU module takes ~0.4 s to import, needed on Hopper only.
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  group = hq // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = cfg.block_q_dq, cfg.block_k_dq, cfg.stages_dq
  n_cons = cfg.consumers_dq
  regs_consumer, regs_producer = warpgroup_registers(n_cons, cfg.consumer_regs)
  cta_q = n_cons * bq
  nq, nk = -(-seq // cta_q), seq // bk
  blocks, counts, states = sched  # mosaic_gpu_vjp.DqSchedule
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  tr = smem_transforms(plgpu, dtype, d)

  own_delta = o is not None
  grouped = cfg.sdp is not SdpGrouping.SEPARATE

  def kernel(blocks_ref, counts_ref, states_ref, ks_ref, ke_ref, q_ref, k_ref,
             v_ref, do_ref, lse_ref, delta_or_o_ref, dq_ref, *rest):
    # rest: (scoped,), or (delta out, scoped) when own_delta.
    h, qi, b, wg = grid_position("q")
    (q_smem, do_smem, k_smem, v_smem, *o_smem), (q_bar, do_bar, k_bar, v_bar, *o_bar), \
        (k_free, v_free) = rest[-1]
    n = counts_ref[b, qi]

    @pl.when(wg < n_cons)
    def _consumer():
      plgpu.set_max_registers(regs_consumer, action="increase")
      row0 = qi * cta_q + wg * bq
      # A surplus warpgroup of the last CTA (three consumers) reads the last
      # real rows, sees no key (its tiles are empty: the schedule pads them) and
      # stores nothing.
      ragged = seq % cta_q != 0
      in_seq = when_inside(pl, row0, seq, ragged)
      ld = clamp_start(row0, seq, bq, ragged)
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(ld, bq), h], q_smem.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(ld, bq), h], do_smem.at[wg], do_bar.at[wg])
      ks_row = load_vec(plgpu, ks_ref.at[b, pl.ds(ld, bq)], row_layout)
      ke_row = load_vec(plgpu, ke_ref.at[b, pl.ds(ld, bq)], row_layout)
      lse_row = load_vec(plgpu, lse_ref.at[b, h, pl.ds(ld, bq)], row_layout)
      q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
      if own_delta:
        o_tile, delta_smem = o_smem[0].at[wg], o_smem[1].at[wg]
        plgpu.copy_gmem_to_smem(delta_or_o_ref.at[b, pl.ds(ld, bq), h], o_tile,
                                o_bar[0].at[wg])
      else:
        delta_row = load_vec(plgpu, delta_or_o_ref.at[b, h, pl.ds(ld, bq)], row_layout)
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(do_bar.at[wg])
      if own_delta:
        plgpu.barrier_wait(o_bar[0].at[wg])
        f32 = lambda ref: load_vec(plgpu, ref, wgmma_layout, True).astype(jnp.float32)
        delta_row = jnp.sum(f32(o_tile) * f32(do_tile), axis=1)

        @in_seq
        def _():
          delta_smem[...] = delta_row
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(delta_smem, rest[0].at[b, h, pl.ds(row0, bq)])
      zeros = lambda shape: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)

      def body(t, carry):
        dq, kb, state = carry
        slot = lax.rem(t, jnp.int32(stages))
        t_next = lax.min(t + 1, jnp.int32(nk - 1))
        kb_next = blocks_ref[b, qi, t_next]
        state_next = states_ref[b, qi, wg, t_next]
        plgpu.barrier_wait(k_bar.at[slot])

        def s_fn(acc_ref):
          plgpu.wgmma(acc_ref, q_tile, transposed(plgpu, k_smem.at[slot]))
          return acc_ref[...]

        def dp_fn(acc_ref):
          plgpu.wgmma(acc_ref, do_tile, transposed(plgpu, v_smem.at[slot]))
          return acc_ref[...]

        def tile():
          if grouped:  # S and dP in one wgmma group
            plgpu.barrier_wait(v_bar.at[slot])

            s, dp = products_in_one_group(
                plgpu, pl, [(q_tile, transposed(plgpu, k_smem.at[slot])),
                            (do_tile, transposed(plgpu, v_smem.at[slot]))], (bq, bk))
            plgpu.barrier_arrive(v_free.at[slot])
          else:
            s = pl.run_scoped(s_fn, plgpu.ACC((bq, bk), jnp.float32))
          s = mask_tile(plgpu, s, state, 1, kb * bk, lambda: ks_row, lambda: ke_row)
          # Unscaled logits: the scale rides in exp2's argument (one FMA).
          p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse_row, (bq, bk), [0]))
          if not grouped:
            plgpu.barrier_wait(v_bar.at[slot])
            dp = pl.run_scoped(dp_fn, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
          ds = p * (dp - lax.broadcast_in_dim(delta_row, (bq, bk), [0]))

          def dq_fn(acc_ref):
            plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

          return pl.run_state(dq_fn)(plgpu.ACC.init(dq))

        def skip():  # our rows see none of these keys; the same barrier steps
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          return dq

        dq = unless_empty(cfg.skip_empty, state, tile, skip)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq, kb_next, state_next

      dq, _, _ = lax.fori_loop(0, n, body, (zeros((bq, d)), blocks_ref[b, qi, 0],
                                            states_ref[b, qi, wg, 0]))

      @in_seq
      def _():
        q_tile[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, pl.ds(row0, bq), h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == n_cons)
    def _producer():
      plgpu.set_max_registers(regs_producer, action="decrease")
      hk = lax.div(h, jnp.int32(group))

      def issue_k(t, slot):
        rows = pl.ds(blocks_ref[b, qi, t] * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])

      def issue_v(t, slot):
        rows = pl.ds(blocks_ref[b, qi, t] * bk, bk)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

      def issue(t, slot):
        issue_k(t, slot)
        issue_v(t, slot)

      def refill(t, slot):
        plgpu.barrier_wait(v_free.at[slot])
        issue_v(t, slot)
        plgpu.barrier_wait(k_free.at[slot])
        issue_k(t, slot)

      fill_ring(pl, n, stages, issue, refill)

  def entry(*refs):
    smem = [
        plgpu.SMEM((n_cons, bq, d), dtype, transforms=tr),
        plgpu.SMEM((n_cons, bq, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
    ]
    bars = [plgpu.Barrier(num_barriers=n_cons), plgpu.Barrier(num_barriers=n_cons),
            plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)]
    if own_delta:
      smem += [plgpu.SMEM((n_cons, bq, d), dtype, transforms=tr),
               plgpu.SMEM((n_cons, bq), jnp.float32)]
      bars += [plgpu.Barrier(num_barriers=n_cons)]
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        tuple(bars),
        (plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),) * 2,
        collective_axes="wg",
    )

  dq_type = jax.ShapeDtypeStruct(q.shape, dtype)
  return plgpu.kernel(
      entry,
      out_type=[dq_type, jax.ShapeDtypeStruct((batch, hq, seq), jnp.float32)]
      if own_delta else dq_type,
      grid=(hq, nq, batch),
      grid_names=("heads", "q", "batch"),
      num_threads=n_cons + 1,
      thread_name="wg",
      compiler_params=mosaic_params(plgpu, cfg.lean),
  )(blocks, counts, states, ks, ke, q, k, v, do, lse, o if own_delta else delta)
