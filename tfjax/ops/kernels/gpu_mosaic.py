"""Block-sparse Transfusion attention for Hopper: Pallas Mosaic GPU kernels.

Forward (`forward`), and a backward (`backward`: a dk/dv kernel and a dq
kernel, same warp-specialised pattern, described at `MosaicBwdConfig`).

Forward: one CTA per (q head, 2 * block_q query rows, batch row), three
warpgroups:

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

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import block_map

LOG2E = math.log2(math.e)
BIG = 1e30  # same convention as gpu.py: lse of a row with no key


@dataclasses.dataclass(frozen=True)
class MosaicFwdConfig:
  """block_q: rows per consumer warpgroup (the CTA covers 2 * block_q);
  block_k: keys per tile; num_stages: K/V shared-memory ring depth;
  heads: q heads one CTA walks in turn (its work list is the same for all;
  the K/V stream runs on across them and the next head's Q tile is
  prefetched); lpt: launch the query tiles with the most key blocks first."""
  block_q: int = 64
  block_k: int = 128
  num_stages: int = 2
  heads: int = 1
  lpt: bool = True

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
  nh = math.gcd(cfg.heads, hq)
  nbuf = 2 if nh > 1 else 1
  cta_q = 2 * bq
  if seq % cta_q or kv_len % bk:
    raise ValueError(f"lengths ({seq}, {kv_len}) must be multiples of ({cta_q}, {bk})")
  if not supported(dtype, d):
    raise ValueError(f"Mosaic GPU forward takes bf16/f16 and head dim 64/128, got {dtype}/{d}")
  nq, nk = seq // cta_q, kv_len // bk
  wl = block_map(ks, ke, cta_q, bk, kv_len).q_blocks
  blocks, counts = wl.blocks, wl.counts
  flat_counts = counts.reshape(-1)
  if cfg.lpt:  # the longest work lists first: a shorter tail
    order = jnp.argsort(-flat_counts, stable=True).astype(jnp.int32)
  else:
    order = jnp.arange(batch * nq, dtype=jnp.int32)
  # Per block_q rows: a tile [k0, k0 + bk) is full for them iff
  # k0 >= max k_start and k0 + bk <= min k_end (an empty row never passes).
  ks_max = jnp.max(ks.reshape(batch, seq // bq, bq), axis=-1)
  ke_min = jnp.min(ke.reshape(batch, seq // bq, bq), axis=-1)
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)

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

  def kernel(order_ref, blocks_ref, counts_ref, ksmax_ref, kemin_ref, ks_ref, ke_ref,
             q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
    hg = lax.axis_index("hg")
    flat = order_ref[lax.axis_index("tile")]
    b = lax.div(flat, jnp.int32(nq))
    qi = lax.rem(flat, jnp.int32(nq))
    wg = lax.axis_index("wg")
    (q_smem, k_smem, v_smem, lse_smem), (k_bar, v_bar, q_bar), \
        (k_free, v_free), sched_bar = scoped
    n = counts_ref[b, qi]
    total = n * nh  # K/V tiles the CTA streams, over its heads

    def sched():
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row0 = qi * cta_q + wg * bq

      def load_q(hh, buf):
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), hg * nh + hh],
                                q_smem.at[wg, buf], q_bar.at[wg * nbuf + buf])

      load_q(0, 0)
      ks_row = load_rows(ks_ref.at[b, pl.ds(row0, bq)])
      ke_row = load_rows(ke_ref.at[b, pl.ds(row0, bq)])
      wblk = qi * 2 + wg
      kmax = ksmax_ref[b, wblk]
      kmin = kemin_ref[b, wblk]

      @pl.when(total > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      pl.when(wg == 1)(sched)

      def head_body(hh, _):
        buf = lax.rem(hh, jnp.int32(nbuf))
        qo_smem = q_smem.at[wg, buf]
        if nbuf > 1:
          @pl.when(hh + 1 < nh)
          def _prefetch():
            # The other buffer holds the previous head's output: its store
            # must have been read out before the next Q tile lands there.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            load_q(hh + 1, 1 - buf)
        plgpu.barrier_wait(q_bar.at[wg * nbuf + buf])

        def body(t, carry):
          acc, m, l, kb = carry
          g = hh * n + t
          slot = lax.rem(g, jnp.int32(stages))
          # The next tile's key block, read now: its latency hides under
          # this tile's matrix products instead of stalling the mask test.
          kb_next = blocks_ref[b, qi, lax.min(t + 1, jnp.int32(nk - 1))]

          def qk(acc_ref):
            plgpu.wgmma(acc_ref, qo_smem, transposed(k_smem.at[slot]))
            sched()
            return acc_ref[...]

          s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
          plgpu.barrier_arrive(k_free.at[slot])
          s = s * qk_scale
          k0 = kb * bk
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

            @pl.when(g + 1 < total)
            def _():
              plgpu.barrier_wait(k_bar.at[lax.rem(g + 1, jnp.int32(stages))])

          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m_new, l, kb_next

        m0 = plgpu.layout_cast(jnp.full((bq,), -BIG, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
        acc0 = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), wgmma_layout)
        acc, m, l, _ = lax.fori_loop(0, n, body, (acc0, m0, l0, blocks_ref[b, qi, 0]))
        live = l > 0.0
        l_safe = jnp.where(live, l, 1.0)
        acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        h = hg * nh + hh
        qo_smem[...] = acc.astype(dtype)
        lse_smem[wg, buf] = jnp.where(live, m + jnp.log(l_safe) * (1.0 / math.log(2.0)), BIG)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg, buf], lse_ref.at[b, h, pl.ds(row0, bq)])
        return 0

      lax.fori_loop(0, nh, head_body, 0)
      pl.when(wg == 0)(sched)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def rows_and_head(g):
        hh = lax.div(g, n)
        t = g - hh * n
        hk = lax.div(hg * nh + hh, jnp.int32(group))
        return pl.ds(blocks_ref[b, qi, t] * bk, bk), hk

      def issue(g, slot):
        rows, hk = rows_and_head(g)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        pl.when(i < total)(functools.partial(issue, jnp.int32(i), i))

      @pl.loop(0, jnp.maximum(total - stages, 0))
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        rows, hk = rows_and_head(t + stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

  def entry(*refs):
    elem = jnp.dtype(dtype).itemsize
    swizzle = min(128, d * elem)
    transforms = (plgpu.TilingTransform((8, swizzle // elem)), plgpu.SwizzleTransform(swizzle))
    smem = [
        plgpu.SMEM((2, nbuf, bq, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
        plgpu.SMEM((2, nbuf, bq), jnp.float32),
    ]
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=2 * nbuf)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  out, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, hq, seq), jnp.float32)],
      grid=(hq // nh, batch * nq),
      grid_names=("hg", "tile"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(order, blocks, counts, ks_max, ke_min, ks, ke, q, k, v)
  return out, lse


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """Tiles of the two Mosaic GPU backward kernels.

  dk/dv: each consumer warpgroup owns block_k_dkv keys (CTA: 2x), the
  producer streams q/dO/lse/delta tiles of block_q_dkv rows (stages deep)
  over the key block's non-empty query blocks. dq: each consumer owns
  block_q_dq query rows (CTA: 2x), the producer streams K/V tiles of
  block_k_dq keys over the query block's non-empty key blocks.
  """
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  stages_dkv: int = 2
  block_q_dq: int = 64
  block_k_dq: int = 64
  stages_dq: int = 2

  @property
  def multiple(self) -> int:
    return math.lcm(self.block_q_dkv, 2 * self.block_k_dkv, 2 * self.block_q_dq, self.block_k_dq)


def _smem_transforms(plgpu, dtype, d):
  elem = jnp.dtype(dtype).itemsize
  swizzle = min(128, d * elem)
  return (plgpu.TilingTransform((8, swizzle // elem)), plgpu.SwizzleTransform(swizzle))


def _transposed(plgpu, ref):
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # jax 0.10


def _load_vec(plgpu, ref, layout):
  try:
    return plgpu.load(ref, layout=layout, optimized=False)
  except TypeError:  # jax 0.10: the index is a positional argument
    return plgpu.load(ref, (), layout=layout, optimized=False)


def backward(q, k, v, o, lse, do, ks, ke, *, scale: float, cfg: MosaicBwdConfig):
  """(dq, dk, dv) from the forward's out and base-2 lse [batch, q_heads, seq]."""
  batch, seq, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  dk, dv = _dkv(q, k, v, do, lse, delta, ks, ke, scale=scale, cfg=cfg)
  if group > 1:
    dk = dk.astype(jnp.float32).reshape(batch, seq, hkv, group, d).sum(axis=3).astype(k.dtype)
    dv = dv.astype(jnp.float32).reshape(batch, seq, hkv, group, d).sum(axis=3).astype(v.dtype)
  dq = _dq(q, k, v, do, lse, delta, ks, ke, scale=scale, cfg=cfg)
  return dq, dk, dv


def _dkv(q, k, v, do, lse, delta, ks, ke, *, scale, cfg):
  """dk, dv per q head [batch, seq, q_heads, d] (GQA groups summed by the caller)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from tfjax.ops.kernels.block_map import FULL, tile_states

  batch, seq, hq, d = q.shape
  group = hq // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = cfg.block_q_dkv, cfg.block_k_dkv, cfg.stages_dkv
  cta_k = 2 * bk
  nq, nkc = seq // bq, seq // cta_k
  wl = block_map(ks, ke, bq, cta_k).kv_blocks          # [batch, nkc, nq]
  blocks, counts = wl.blocks, wl.counts
  # Per warpgroup (bk keys) and list entry: is that tile full?
  st = jnp.swapaxes(tile_states(ks, ke, bq, bk), 1, 2).reshape(batch, nkc, 2, nq)
  full = (jnp.take_along_axis(st, blocks[:, :, None, :], axis=3) == FULL).astype(jnp.int32)
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  tr = _smem_transforms(plgpu, dtype, d)

  def kernel(blocks_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
             delta_ref, ks_ref, ke_ref, dk_ref, dv_ref, scoped):
    h = lax.axis_index("heads")
    j = lax.axis_index("kv")
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ks_smem, ke_smem), \
        (k_bar, v_bar, q_bar, do_bar, vec_bar), free = scoped
    n = counts_ref[b, j]

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      kb0 = j * cta_k + wg * bk
      hk = lax.div(h, jnp.int32(group))
      plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kb0, bk), hk], k_smem.at[wg], k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kb0, bk), hk], v_smem.at[wg], v_bar.at[wg])
      plgpu.barrier_wait(k_bar.at[wg])
      plgpu.barrier_wait(v_bar.at[wg])
      k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
      zeros = lambda shape: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)

      def body(t, carry):
        dk, dv, is_full = carry
        slot = lax.rem(t, jnp.int32(stages))
        full_next = full_ref[b, j, wg, lax.min(t + 1, jnp.int32(nq - 1))]
        plgpu.barrier_wait(q_bar.at[slot])

        def st_fn(acc_ref):
          plgpu.wgmma(acc_ref, k_tile, _transposed(plgpu, q_smem.at[slot]))
          return acc_ref[...]

        s_t = pl.run_scoped(st_fn, plgpu.ACC((bk, bq), jnp.float32)) * qk_scale
        plgpu.barrier_wait(vec_bar.at[slot])

        def masked():
          kpos = kb0 + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=wgmma_layout)
          lo = _load_vec(plgpu, ks_smem.at[slot], col_layout)
          hi = _load_vec(plgpu, ke_smem.at[slot], col_layout)
          ok = (kpos >= lax.broadcast_in_dim(lo, (bk, bq), [1])) & (
              kpos < lax.broadcast_in_dim(hi, (bk, bq), [1]))
          return jnp.where(ok, s_t, -jnp.inf)

        s_t = lax.cond(is_full != 0, lambda: s_t, masked)
        lse_c = _load_vec(plgpu, lse_smem.at[slot], col_layout)
        p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse_c, (bk, bq), [1]))
        plgpu.barrier_wait(do_bar.at[slot])

        def dv_dp(refs):
          dv_ref_, dp_ref_ = refs
          plgpu.wgmma(dv_ref_, p_t.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(dp_ref_, v_tile, _transposed(plgpu, do_smem.at[slot]))

        dv, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros((bk, bq)))))
        delta_c = _load_vec(plgpu, delta_smem.at[slot], col_layout)
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_c, (bk, bq), [1]))

        def dk_fn(acc_ref):
          plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_smem.at[slot])

        dk = pl.run_state(dk_fn)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv, full_next

      dk, dv, _ = lax.fori_loop(0, n, body, (zeros((bk, d)), zeros((bk, d)),
                                             full_ref[b, j, wg, 0]))
      k_tile[...] = (dk * scale).astype(dtype)
      v_tile[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[b, pl.ds(kb0, bk), h])
      plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[b, pl.ds(kb0, bk), h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def issue(t, slot):
        rows = pl.ds(blocks_ref[b, j, t] * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], vec_bar.at[slot])
        plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], vec_bar.at[slot])
        plgpu.copy_gmem_to_smem(ke_ref.at[b, rows], ke_smem.at[slot], vec_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], vec_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])

      for i in range(stages):
        pl.when(i < n)(functools.partial(issue, jnp.int32(i), i))

      @pl.loop(0, jnp.maximum(n - stages, 0))
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        plgpu.barrier_wait(free.at[slot])
        issue(t + stages, slot)

  def entry(*refs):
    smem = [
        plgpu.SMEM((2, bk, d), dtype, transforms=tr),
        plgpu.SMEM((2, bk, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.int32),
        plgpu.SMEM((stages, bq), jnp.int32),
    ]
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_arrivals=4, num_barriers=stages)),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        collective_axes="wg",
    )

  shape = jax.ShapeDtypeStruct((batch, seq, hq, d), dtype)
  return plgpu.kernel(
      entry,
      out_type=[shape, shape],
      grid=(hq, nkc, batch),
      grid_names=("heads", "kv", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(blocks, counts, full, q, k, v, do, lse, delta, ks, ke)


def _dq(q, k, v, do, lse, delta, ks, ke, *, scale, cfg):
  """dq [batch, seq, q_heads, d]: the forward's walk, with dP and dS."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, seq, hq, d = q.shape
  group = hq // k.shape[2]
  dtype = q.dtype
  bq, bk, stages = cfg.block_q_dq, cfg.block_k_dq, cfg.stages_dq
  cta_q = 2 * bq
  nq, nk = seq // cta_q, seq // bk
  wl = block_map(ks, ke, cta_q, bk).q_blocks
  blocks, counts = wl.blocks, wl.counts
  ks_max = jnp.max(ks.reshape(batch, seq // bq, bq), axis=-1)
  ke_min = jnp.min(ke.reshape(batch, seq // bq, bq), axis=-1)
  qk_scale = float(scale) * LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  tr = _smem_transforms(plgpu, dtype, d)

  def kernel(blocks_ref, counts_ref, ksmax_ref, kemin_ref, ks_ref, ke_ref, q_ref, k_ref,
             v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped):
    h = lax.axis_index("heads")
    qi = lax.axis_index("q")
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    (q_smem, do_smem, k_smem, v_smem), (q_bar, do_bar, k_bar, v_bar), (k_free, v_free) = scoped
    n = counts_ref[b, qi]

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      row0 = qi * cta_q + wg * bq
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, bq), h], do_smem.at[wg], do_bar.at[wg])
      ks_row = _load_vec(plgpu, ks_ref.at[b, pl.ds(row0, bq)], row_layout)
      ke_row = _load_vec(plgpu, ke_ref.at[b, pl.ds(row0, bq)], row_layout)
      lse_row = _load_vec(plgpu, lse_ref.at[b, h, pl.ds(row0, bq)], row_layout)
      delta_row = _load_vec(plgpu, delta_ref.at[b, h, pl.ds(row0, bq)], row_layout)
      wblk = qi * 2 + wg
      kmax = ksmax_ref[b, wblk]
      kmin = kemin_ref[b, wblk]
      q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(do_bar.at[wg])
      zeros = lambda shape: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)

      def body(t, carry):
        dq, kb = carry
        slot = lax.rem(t, jnp.int32(stages))
        kb_next = blocks_ref[b, qi, lax.min(t + 1, jnp.int32(nk - 1))]
        plgpu.barrier_wait(k_bar.at[slot])

        def s_fn(acc_ref):
          plgpu.wgmma(acc_ref, q_tile, _transposed(plgpu, k_smem.at[slot]))
          return acc_ref[...]

        s = pl.run_scoped(s_fn, plgpu.ACC((bq, bk), jnp.float32)) * qk_scale
        k0 = kb * bk
        full = (k0 >= kmax) & (k0 + bk <= kmin)

        def masked():
          kpos = k0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wgmma_layout)
          ok = (kpos >= lax.broadcast_in_dim(ks_row, (bq, bk), [0])) & (
              kpos < lax.broadcast_in_dim(ke_row, (bq, bk), [0]))
          return jnp.where(ok, s, -jnp.inf)

        s = lax.cond(full, lambda: s, masked)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse_row, (bq, bk), [0]))
        plgpu.barrier_wait(v_bar.at[slot])

        def dp_fn(acc_ref):
          plgpu.wgmma(acc_ref, do_tile, _transposed(plgpu, v_smem.at[slot]))
          return acc_ref[...]

        dp = pl.run_scoped(dp_fn, plgpu.ACC((bq, bk), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(delta_row, (bq, bk), [0]))

        def dq_fn(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

        dq = pl.run_state(dq_fn)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(k_free.at[slot])
        return dq, kb_next

      dq, _ = lax.fori_loop(0, n, body, (zeros((bq, d)), blocks_ref[b, qi, 0]))
      q_tile[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, pl.ds(row0, bq), h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      hk = lax.div(h, jnp.int32(group))

      def issue_k(t, slot):
        rows = pl.ds(blocks_ref[b, qi, t] * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk], k_smem.at[slot], k_bar.at[slot])

      def issue_v(t, slot):
        rows = pl.ds(blocks_ref[b, qi, t] * bk, bk)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        @pl.when(i < n)
        def _():
          issue_k(jnp.int32(i), i)
          issue_v(jnp.int32(i), i)

      @pl.loop(0, jnp.maximum(n - stages, 0))
      def _(t):
        slot = lax.rem(t, jnp.int32(stages))
        plgpu.barrier_wait(v_free.at[slot])
        issue_v(t + stages, slot)
        plgpu.barrier_wait(k_free.at[slot])
        issue_k(t + stages, slot)

  def entry(*refs):
    smem = [
        plgpu.SMEM((2, bq, d), dtype, transforms=tr),
        plgpu.SMEM((2, bq, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
        plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
    ]
    pl.run_scoped(
        lambda *scoped: kernel(*refs, scoped),
        smem,
        (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(hq, nq, batch),
      grid_names=("heads", "q", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(blocks, counts, ks_max, ke_min, ks, ke, q, k, v, do, lse, delta)
