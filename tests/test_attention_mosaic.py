"""Mosaic GPU (Hopper) kernels: lowering for CUDA anywhere, and (marker `gpu`)
forward and backward against the float32 XLA reference on a Hopper GPU."""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from kernel_layouts import TOL, random_inputs, random_layout, rel_error  # noqa: E402

from tfjax.ops.attention import xla_attention  # noqa: E402
from tfjax.ops.kernels import dispatch  # noqa: E402
from tfjax.ops.mask import transfusion_mask  # noqa: E402


MOSAIC_CASES = [
    # (head_dim, q_heads, kv_heads, seq,
    #  (block_q per warpgroup, block_k, stages, heads per CTA[, lpt]))
    (64, 4, 2, 512, (64, 128, 3, 2)),         # GQA, 2 heads per CTA (2 kv heads)
    (128, 2, 2, 384, (64, 128, 2, 1)),        # CTA rows (128) != key tile
    (128, 4, 1, 512, (64, 64, 2, 4, False, False)),  # MQA, narrow key tiles, grid order, heads inner
    (64, 2, 2, 320, (64, 64, 4, 2)),          # padded to 384
    (128, 2, 2, 384, (64, 128, 2, 1, True, True, False, False)),  # no empty-tile skipping
    # three consumers: 192-row CTAs, the last one reaching past 512
    (64, 4, 2, 512, (64, 128, 2, 1, True, True, False, True, 3)),
    (128, 2, 2, 384, (64, 64, 2, 2, True, True, False, True, 3)),  # 3 consumers, 2 heads
    (128, 4, 2, 448, (64, 64, 2, 1, True, True, False, True, 3)),  # the L>=8192 default, GQA
    # persistent grids of 5 and 3 CTAs (several items each, Q tiles in turn):
    # the L>=8192 default's tiles at 128 (GQA, the last CTA's rows past 448),
    # two consumers in ping-pong, and the head-dim-64 default (GQA, past 512)
    (128, 4, 2, 448, (64, 64, 2, 1, True, True, False, True, 3, 5)),
    (64, 4, 2, 512, (64, 128, 2, 1, True, True, False, True, 2, 3)),
    (64, 4, 2, 512, (64, 128, 2, 1, True, True, False, True, 3, 5)),
]


@pytest.mark.parametrize("d,hq,hkv,seq,mcfg", MOSAIC_CASES[:2] + MOSAIC_CASES[-7:])
def test_mosaic_forward_lowers_for_cuda(d, hq, hkv, seq, mcfg):
  """The Mosaic GPU forward traces and lowers to a Mosaic GPU module anywhere."""
  from tfjax.ops.kernels import gpu_mosaic
  q = jax.ShapeDtypeStruct((2, seq, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, seq, hkv, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)
  cfg = gpu_mosaic.MosaicFwdConfig(*mcfg)
  f = jax.jit(lambda q, k, v, ks, ke: gpu_mosaic.forward(q, k, v, ks, ke, scale=0.1, cfg=cfg))
  text = f.trace(q, kv, kv, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def _check_bf16_kernel_against_reference(cfg, seg, img, q, k, v, do):
  """impl="pallas" under `cfg`: output and gradients against the float32 XLA
  reference at the bf16 tolerance, bf16 results, zero rows on padding."""
  ker = lambda q, k, v: dispatch.attention(q, k, v, seg, img, impl="pallas", config=cfg)
  mask = transfusion_mask(seg, img)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), f32(q), f32(k), f32(v))
    grads_ref = vjp_ref(f32(do))
  o, grads = jax.jit(lambda q, k, v, do: (lambda r: (r[0], r[1](do)))(jax.vjp(ker, q, k, v)))(
      q, k, v, do)
  assert o.dtype == jnp.bfloat16 and o.shape == q.shape
  assert rel_error(o, o_ref) < TOL[jnp.bfloat16]
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert g.dtype == jnp.bfloat16, name
    assert rel_error(g, gr) < TOL[jnp.bfloat16], f"d{name}: {rel_error(g, gr)}"
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o, np.float32)[pad] == 0)
  assert np.all(np.asarray(grads[0], np.float32)[pad] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,seq,mcfg", MOSAIC_CASES)
def test_mosaic_forward_matches_reference(d, hq, hkv, seq, mcfg):
  """Mosaic GPU forward (+ Triton backward) against the float32 XLA reference."""
  from tfjax.ops.kernels import gpu
  if not dispatch._gpu_is_hopper():
    pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
  rng = np.random.default_rng(seq + d + hq + mcfg[1])
  seg, img = random_layout(rng, 2, seq)
  seg[1, -90:] = 0  # a padding tail longer than a block
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = random_inputs(rng, 2, seq, hq, hkv, d, jnp.bfloat16)
  cfg = dataclasses.replace(gpu.GpuConfig.for_head_dim(d), mosaic_fwd=mcfg)
  _check_bf16_kernel_against_reference(cfg, seg, img, q, k, v, do)


MOSAIC_BWD_CASES = [
    # (head_dim, q_heads, kv_heads, seq, MosaicBwdConfig fields: dk/dv tiles,
    #  dq tiles, fuse_dq, consumer registers, sdp_group, lean, dq_own_keys,
    #  skip_empty, dq_delta)
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 1)),    # GQA, fused
    (128, 2, 2, 384, (64, 64, 2, 64, 64, 2, 1)),   # fused at head dim 128
    (128, 2, 1, 384, (64, 64, 2, 64, 64, 2, 1, 240)),  # fused, 240 registers, multi-query
    (64, 2, 2, 320, (64, 64, 3, 64, 64, 2, 1, 240)),  # fused, 3-deep ring, padded to 384
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1)),  # two kernels, GQA, delta in dq
    (128, 2, 2, 384, (64, 64, 3, 64, 128, 2, 0, 232, 0)),  # two kernels, wide dq key tiles, S then dP
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 1, 240, 1, 0, 1)),  # fused, dQ over own keys, GQA
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 1, 240, 1, 0, 0, 0)),  # fused, no empty-tile skipping
    (128, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 0, 1)),  # two kernels, no skip, delta in dq
    # two kernels with three consumers each: the last 192-key and 192-row CTAs
    # reach past 512 (GQA, delta in dq); dq alone at head dim 128
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1, 3, 3)),
    (128, 2, 2, 320, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 3)),
    # 240 registers, S^T and dP^T apart in dk/dv only, GQA
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 2, 0, 240, 2, 0, 0, 1, 1)),
    # dq from the dk/dv kernel's dS^T tiles: the head-dim-128 kernels with a
    # 2-deep dq ring (GQA), and three consumers each at 64 past the end
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 2, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1)),
    (64, 2, 2, 320, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 3, 3, 1)),
    # buffers of 30% and 60% of the dq lists' padded tiles, this layout
    # listing 53%: the cond takes the recomputing fallback
    # (`gpu_mosaic_bwd.recompute_config`), then the packed tiles
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 2, 1, 30)),
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 2, 1, 60)),
    # the head-dim-128 default (3-deep dq ring, GQA) with a full buffer (the
    # packed tiles) and as it ships (30%: here the fallback)
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 100)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 30)),
    # the persistent dk/dv kernel on 5 CTAs (several work items each, the
    # K/V buffers in turn): the head-dim-64 default (three consumers past the
    # end, delta in dq, GQA) and the head-dim-128 one storing dS^T tiles
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1, 3, 3, 0, 100, 5)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 100, 5)),
]


@pytest.mark.parametrize("d,hq,hkv,seq,bcfg",
                         [MOSAIC_BWD_CASES[i] for i in (0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                                         16, 17, 18, 19)])
def test_mosaic_backward_lowers_for_cuda(d, hq, hkv, seq, bcfg):
  from tfjax.ops.kernels import gpu_mosaic_bwd
  q = jax.ShapeDtypeStruct((2, seq, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, seq, hkv, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)
  lse = jax.ShapeDtypeStruct((2, hq, seq), jnp.float32)
  cfg = gpu_mosaic_bwd.MosaicBwdConfig(*bcfg)
  f = jax.jit(lambda q, k, v, o, lse, do, ks, ke: gpu_mosaic_bwd.backward(
      q, k, v, o, lse, do, ks, ke, scale=0.1, cfg=cfg))
  text = f.trace(q, kv, kv, q, lse, q, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("bwd", [(64, 64, 2, 64, 64, 2, 1), (64, 64, 2, 64, 64, 2, 0)],
                         ids=["fused", "two_kernel"])
def test_mosaic_backward_lowers_under_scan_and_grad_with_a_plan(bwd):
  """The Mosaic kernels where the model puts them: a custom_vjp inside a layer
  scan, differentiated, their schedule built once outside the scan (the fused
  backward's mutable dq accumulator, a jax.new_ref, included)."""
  from tfjax.ops.kernels import gpu
  seq, d = 256, 128
  cfg = dataclasses.replace(gpu.GpuConfig.for_head_dim(d), mosaic_fwd=(64, 128, 2, 1),
                            mosaic_bwd=bwd)
  ks = jnp.zeros((1, seq), jnp.int32)
  ke = ks + seq

  def loss(x):
    sched = gpu.schedule(ks, ke, cfg)
    def layer(h, _):
      return gpu.attention(h, h, h, ks, ke, scale=0.1, config=cfg, sched=sched), None
    return jax.lax.scan(layer, x, None, length=2)[0].astype(jnp.float32).sum()

  x = jax.ShapeDtypeStruct((1, seq, 2, d), jnp.bfloat16)
  text = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2
  # Built once: one argsort (the launch order) per schedule, none in the scan.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.zeros(x.shape, x.dtype)))
  body = jaxpr[jaxpr.index("scan["):]
  assert "sort" not in body.split("jaxpr=")[1].split("linear=")[0]


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,seq,bcfg", MOSAIC_BWD_CASES)
def test_mosaic_backward_matches_reference(d, hq, hkv, seq, bcfg):
  """Mosaic GPU forward and backward against the float32 XLA reference."""
  from tfjax.ops.kernels import gpu
  if not dispatch._gpu_is_hopper():
    pytest.skip("the Mosaic GPU kernels need a Hopper GPU")
  rng = np.random.default_rng(seq + d + hq + 1)
  seg, img = random_layout(rng, 2, seq)
  seg[1, -90:] = 0
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = random_inputs(rng, 2, seq, hq, hkv, d, jnp.bfloat16)
  cfg = dataclasses.replace(gpu.GpuConfig.for_head_dim(d), mosaic_fwd=(64, 128, 2, 1),
                            mosaic_bwd=bcfg)
  _check_bf16_kernel_against_reference(cfg, seg, img, q, k, v, do)


def test_mosaic_backward_config_choice(monkeypatch):
  """Two kernels at both head dims, three consumer warpgroups at 64 (the H100
  measurements), dq from stored dS^T at 128 (H200), a persistent dk/dv grid at
  64 (H200), TFJAX_MOSAIC_BWD overrides it, and the sequence multiple
  follows the kernels that run."""
  from tfjax.ops.kernels import gpu, gpu_mosaic, gpu_mosaic_bwd, gpu_mosaic_parts
  monkeypatch.delenv("TFJAX_MOSAIC_BWD", raising=False)
  c64 = gpu_mosaic_bwd.MosaicBwdConfig(*dispatch.mosaic_backward_config(64))
  c128 = gpu_mosaic_bwd.MosaicBwdConfig(*dispatch.mosaic_backward_config(128))
  assert c64.fuse_dq == c128.fuse_dq == 0 and c64.dq_delta == 1 and c64.dq_from_ds == 0
  # At 128, dq from the stored dS^T tiles, with the recomputing fallback (M35).
  assert c128.dq_from_ds == 1 and 0 < c128.ds_capacity < 100 and c128.stages_dq == 3
  assert (c64.consumers_dkv, c64.consumers_dq) == (3, 3)
  # The persistent dk/dv grid at 64 only (M44), and never with the fused kernel.
  assert (c64.persistent_dkv, c128.persistent_dkv) == (1, 0)
  with pytest.raises(ValueError, match="persistent_dkv"):
    gpu_mosaic_bwd.bwd_schedule(jnp.zeros((1, 128), jnp.int32), jnp.zeros((1, 128), jnp.int32),
                                dataclasses.replace(c64, fuse_dq=1))
  assert (c128.consumers_dkv, c128.consumers_dq) == (2, 3) and c128.sdp_group == 2
  assert c128.consumer_regs == 240
  # Its fallback is the recomputing kernels as they were the default (M40).
  fallback = gpu_mosaic_bwd.recompute_config(c128)
  assert (fallback.dq_from_ds, fallback.dq_delta, fallback.stages_dq) == (0, 1, 2)
  assert (fallback.consumers_dkv, fallback.consumers_dq, fallback.sdp_group) == (2, 3, 2)
  with pytest.raises(ValueError, match="dq_from_ds"):
    gpu_mosaic_bwd.bwd_schedule(jnp.zeros((1, 128), jnp.int32), jnp.zeros((1, 128), jnp.int32),
                                dataclasses.replace(c128, dq_from_ds=2))
  assert c64.skip_empty == c128.skip_empty == 1
  assert gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(64)).consumers == 3
  assert gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(128)).consumers == 2
  assert gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(128, 4096)).consumers == 2
  long_128 = gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(128, 8192))
  assert (long_128.consumers, long_128.block_k) == (3, 64)
  # A persistent forward grid at head dim 64 only (M47); heads per CTA excluded.
  assert [gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(*a)).persistent
          for a in ((64,), (128, 4096), (128, 8192))] == [1, 0, 0]
  with pytest.raises(ValueError, match="persistent takes heads=1"):
    gpu_mosaic.forward(*(jnp.zeros((1, 128, 2, 64), jnp.bfloat16),) * 3,
                       *(jnp.zeros((1, 128), jnp.int32),) * 2, scale=1.0,
                       cfg=gpu_mosaic.MosaicFwdConfig(64, 64, 2, 2, persistent=1))
  # The plan and the call pick the same tiles from the sequence length.
  if dispatch.use_mosaic_forward("gpu", 128, jnp.bfloat16):
    assert (dispatch.kernel_config("gpu", 128, seq_len=8192).mosaic_fwd
            == gpu.GpuConfig.mosaic_default(128, 8192))
  # The fused kernel has no dq tiles: (64 rows, 2 x 64 keys) alone set the multiple.
  assert gpu_mosaic_bwd.MosaicBwdConfig(64, 64, 2, 64, 128, 2, 1).multiple == 128
  assert gpu_mosaic_bwd.MosaicBwdConfig(64, 64, 2, 128, 64, 2, 0).multiple == 256
  # Three consumers pad their last CTA themselves: the tiles alone set it.
  assert c64.multiple == 64 and gpu_mosaic.MosaicFwdConfig(64, 128, consumers=3).multiple == 128
  with pytest.raises(ValueError, match="two-kernel"):
    gpu_mosaic_bwd.bwd_schedule(jnp.zeros((1, 128), jnp.int32), jnp.zeros((1, 128), jnp.int32),
                                gpu_mosaic_bwd.MosaicBwdConfig(consumers_dq=3))
  with pytest.raises(ValueError, match="2 or 3"):
    gpu_mosaic.MosaicFwdConfig(consumers=4).registers
  with pytest.raises(ValueError, match="consumer_regs"):  # setmaxnreg would wait forever
    gpu_mosaic_parts.warpgroup_registers(2, 248)
  assert gpu_mosaic_parts.warpgroup_registers(2, 240) == (240, 24)
  monkeypatch.setenv("TFJAX_MOSAIC_BWD", "64,64,2,64,64,2,0")
  assert gpu_mosaic_bwd.MosaicBwdConfig(*dispatch.mosaic_backward_config(64)).fuse_dq == 0
  monkeypatch.setenv("TFJAX_MOSAIC_BWD", "0")
  assert dispatch.mosaic_backward_config(64) is None



def test_a_settled_schedule_decides_the_ds_buffer_once_on_the_host():
  """dq_from_ds at head dim 128 with a 60% dS^T buffer: a schedule built
  outside jit is `gpu.settle`d (as `dispatch.plan` does), its backward then
  lowers without the lax.cond and only with the kernels of the branch its
  layout needs (the dS^T buffer where the tiles fit, the recomputing dq
  where they do not); a schedule settled inside jit keeps the cond."""
  from tfjax.ops.kernels import gpu, gpu_mosaic_bwd
  from tfjax.ops.mask import key_ranges
  seq, hq, d = 384, 4, 128
  cfg = dataclasses.replace(
      gpu.GpuConfig.for_head_dim(d), mosaic_fwd=(64, 128, 2, 1),
      mosaic_bwd=(64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 60))
  x = jax.ShapeDtypeStruct((2, seq, hq, d), jnp.bfloat16)

  def lowered(ks, ke, sched):
    def loss(q):
      return gpu.attention(q, q, q, ks, ke, scale=0.1, config=cfg,
                           sched=sched).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()

  docs = jnp.broadcast_to(jnp.arange(seq) // 64 + 1, (2, seq)).astype(jnp.int32)
  # dS^T rows: 24 of the buffer's 44 per head for the 64-token documents, 48
  # for one causal document per row
  one_doc = jnp.ones((2, seq), jnp.int32)
  no_images = jnp.zeros((2, seq), jnp.int32)
  ds_tiles = "x64x64xbf16>"  # the dS^T buffer, [heads * capacity, 64, 64]
  for seg, fits in ((docs, True), (one_doc, False)):
    ks, ke = key_ranges(seg, no_images)
    sched = gpu.settle(gpu.schedule(ks, ke, cfg), cfg)
    assert sched.bwd.ds_fits == gpu_mosaic_bwd.DsFits(fits)
    text = lowered(ks, ke, sched)
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dk/dv, dq
    assert (ds_tiles in text) == fits
  traced = jax.jit(lambda ks, ke: gpu.settle(gpu.schedule(ks, ke, cfg), cfg))(ks, ke)
  assert traced.bwd.ds_fits is None
  text = lowered(ks, ke, traced)
  assert "stablehlo.case" in text and ds_tiles in text


def test_mosaic_profiler_only_when_asked(monkeypatch):
  """TFJAX_MOSAIC_PROFILE_DIR turns on Mosaic GPU's in-kernel profiler in every
  kernel's compiler settings (benchmarks/mgpu_trace.py); unset, nothing is
  recorded and no shared memory is taken."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from tfjax.ops.kernels.gpu_mosaic_parts import mosaic_params
  monkeypatch.delenv("TFJAX_MOSAIC_PROFILE_DIR", raising=False)
  assert mosaic_params(plgpu, False).profile_space == 0
  monkeypatch.setenv("TFJAX_MOSAIC_PROFILE_DIR", "/tmp/traces")
  monkeypatch.setenv("TFJAX_MOSAIC_PROFILE_SPACE", "32")
  for lean in (False, True):
    params = mosaic_params(plgpu, lean)
    assert (params.profile_dir, params.profile_space) == ("/tmp/traces", 32)
    assert params.unsafe_no_auto_barriers == lean


def test_trace_regions_and_gaps_from_a_profile():
  """mgpu_trace.region_stats pairs nested B/E events per warpgroup, tells the
  producer (last warpgroup) from the consumers, and measures the idle time
  between a consumer's top-level regions inside its outermost one."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  from mgpu_trace import region_stats
  ev = lambda tid, name, ph, ts: {"tid": tid, "name": name, "ph": ph, "ts": ts}
  consumer = [ev(1, "consumer", "B", 0), ev(1, "kv_wait", "B", 0), ev(1, "kv_wait", "E", 2),
              ev(1, "tiles", "B", 3), ev(1, "tile", "B", 3), ev(1, "tile", "E", 5),
              ev(1, "tiles", "E", 6), ev(1, "store", "B", 6.5), ev(1, "store", "E", 7),
              ev(1, "consumer", "E", 7)]
  producer = [ev(3, "producer", "B", 0), ev(3, "producer", "E", 4)]
  stats = region_stats(consumer + producer, warpgroups=3)
  r = stats["regions"]
  assert r[("c", "kv_wait")] == [2] and r[("c", "tiles")] == [3] and r[("c", "tile")] == [2]
  assert r[("c", "consumer")] == [7] and r[("p", "producer")] == [4]
  assert stats["gaps"] == {"kv_wait->tiles": [1], "tiles->store": [0.5]}
