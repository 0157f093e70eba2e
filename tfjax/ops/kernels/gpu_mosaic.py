"""Block-sparse Transfusion attention forward for Hopper: Pallas Mosaic GPU.

One CTA per (q head, 2 * block_q query rows, batch row), three warpgroups:

  warpgroups 0, 1  consumers: each owns block_q query rows (its Q tile in
                   shared memory), runs QK^T and PV on the tensor cores
                   (wgmma; the accumulators in registers, P from registers)
                   and the online softmax between them. A schedule barrier
                   lets one warpgroup's softmax overlap the other's matrix
                   products.
  warpgroup 2      producer: walks the CTA's compacted work list (its
                   non-empty key blocks, `block_map.q_blocks` at
                   (2 * block_q, block_k) tiles) and streams those K and V
                   tiles into a ring of `num_stages` shared-memory slots with
                   the bulk tensor copy engine (TMA), waiting for the
                   consumers to release each slot.

Empty tiles are never visited. A consumer decides per tile whether its own
rows see the whole key block (from the max k_start and min k_end of its rows,
precomputed per block_q rows); only then is the mask skipped, otherwise it is
built from two comparisons against the rows' [k_start, k_end) intervals.
Rows with an empty interval (padding) get 0 out and lse = BIG, like the
Triton kernel, whose backward (gpu._backward) consumes this kernel's
base-2 log-sum-exp unchanged.

bf16/f16 only, head dims 64 and 128 (dispatch falls back to the Triton
kernel otherwise). There is no interpret mode: on CPU it lowers (tests check
that) but cannot run. Run on an H100 with JAX 0.11.2: see
benchmarks/NOTES_attention.md for tests and timings.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import block_map

LOG2E = math.log2(math.e)
BIG = 1e30  # same convention as gpu.py: lse of a row with no key


@dataclasses.dataclass(frozen=True)
class MosaicFwdConfig:
  """block_q: rows per consumer warpgroup (the CTA covers 2 * block_q);
  block_k: keys per tile; num_stages: K/V shared-memory ring depth."""
  block_q: int = 64
  block_k: int = 128
  num_stages: int = 2

  @property
  def multiple(self) -> int:
    return math.lcm(2 * self.block_q, self.block_k)


def supported(dtype, head_dim: int) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
      head_dim in (64, 128)


def forward(q, k, v, ks, ke, *, scale: float, cfg: MosaicFwdConfig):
  """(out [batch, seq, q_heads, d], lse float32[batch, q_heads, seq], base 2)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  dtype = q.dtype
  bq, bk, stages = cfg.block_q, cfg.block_k, cfg.num_stages
  cta_q = 2 * bq
  if seq % cta_q or kv_len % bk:
    raise ValueError(f"lengths ({seq}, {kv_len}) must be multiples of ({cta_q}, {bk})")
  if not supported(dtype, d):
    raise ValueError(f"Mosaic GPU forward takes bf16/f16 and head dim 64/128, got {dtype}/{d}")
  nq = seq // cta_q
  wl = block_map(ks, ke, cta_q, bk, kv_len).q_blocks
  blocks, counts = wl.blocks, wl.counts
  # Per block_q rows: a tile [k0, k0 + bk) is full for them iff
  # k0 >= max k_start and k0 + bk <= min k_end (an empty row never passes).
  ks_max = jnp.max(ks.reshape(batch, seq // bq, bq), axis=-1)
  ke_min = jnp.min(ke.reshape(batch, seq // bq, bq), axis=-1)
  qk_scale = float(scale) * LOG2E

  # JAX 0.10 / 0.11 spell two of these differently (the device runs 0.11).
  def load_rows(ref):
    try:
      return plgpu.load(ref, layout=row_layout, optimized=False)
    except TypeError:  # jax 0.10: the index is a positional argument
      return plgpu.load(ref, (), layout=row_layout, optimized=False)

  def transposed(ref):
    if hasattr(ref, "transpose"):
      return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))  # jax 0.10

  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def kernel(blocks_ref, counts_ref, ksmax_ref, kemin_ref, ks_ref, ke_ref,
             q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
    h = lax.axis_index("heads")
    qi = lax.axis_index("q")
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    (qo_smem2, k_smem, v_smem, lse_smem2), (k_bar, v_bar, q_bar), \
        (k_free, v_free), sched_bar = scoped
    n = counts_ref[b, qi]

    def sched():
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      row0 = qi * cta_q + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], qo_smem, q_bar.at[wg])
      ks_row = load_rows(ks_ref.at[b, pl.ds(row0, bq)])
      ke_row = load_rows(ke_ref.at[b, pl.ds(row0, bq)])
      wblk = qi * 2 + wg
      kmax = ksmax_ref[b, wblk]
      kmin = kemin_ref[b, wblk]
      plgpu.barrier_wait(q_bar.at[wg])

      m0 = plgpu.layout_cast(jnp.full((bq,), -BIG, jnp.float32), row_layout)
      l0 = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
      acc0 = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), wgmma_layout)

      @pl.when(n > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      pl.when(wg == 1)(sched)

      def body(t, carry):
        acc, m, l = carry
        slot = lax.rem(t, jnp.int32(stages))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, transposed(k_smem.at[slot]))
          sched()
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        s = s * qk_scale
        k0 = blocks_ref[b, qi, t] * bk
        full = (k0 >= kmax) & (k0 + bk <= kmin)

        def masked():
          kpos = k0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wgmma_layout)
          ok = (kpos >= lax.broadcast_in_dim(ks_row, (bq, bk), [0])) & (
              kpos < lax.broadcast_in_dim(ke_row, (bq, bk), [0]))
          return jnp.where(ok, s, -jnp.inf)

        s = lax.cond(full, lambda: s, masked)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched_bar)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          nxt = t + 1

          @pl.when(nxt < n)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      acc, m, l = lax.fori_loop(0, n, body, (acc0, m0, l0))
      pl.when(wg == 0)(sched)

      live = l > 0.0
      l_safe = jnp.where(live, l, 1.0)
      acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(live, m + jnp.log(l_safe) * (1.0 / math.log(2.0)), BIG)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(row0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      hk = lax.div(h, jnp.int32(group))

      def issue(t, slot):
        rows = pl.ds(blocks_ref[b, qi, t] * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        pl.when(i < n)(functools.partial(issue, i, i))

      @pl.loop(0, jnp.maximum(n - stages, 0))
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        rows = pl.ds(blocks_ref[b, qi, t + stages] * bk, bk)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

  def entry(blocks_ref, counts_ref, ksmax_ref, kemin_ref, ks_ref, ke_ref,
            q_ref, k_ref, v_ref, out_ref, lse_ref):
    elem = jnp.dtype(dtype).itemsize
    swizzle = min(128, d * elem)
    transforms = (plgpu.TilingTransform((8, swizzle // elem)), plgpu.SwizzleTransform(swizzle))
    smem = [
        plgpu.SMEM((2, bq, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
        plgpu.SMEM((2, bq), jnp.float32),
    ]
    pl.run_scoped(
        lambda *scoped: kernel(blocks_ref, counts_ref, ksmax_ref, kemin_ref, ks_ref, ke_ref,
                               q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
        smem,
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  out, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, hq, seq), jnp.float32)],
      grid=(hq, nq, batch),
      grid_names=("heads", "q", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(blocks, counts, ks_max, ke_min, ks, ke, q, k, v)
  return out, lse
