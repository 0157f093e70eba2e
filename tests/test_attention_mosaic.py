"""Mosaic GPU (Hopper) kernels: lowering for CUDA anywhere, and (marker `gpu`)
forward and backward against the float32 XLA reference on a Hopper GPU."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import G, MOSAIC_BWD_CASES, MOSAIC_CASES, OWN_DELTA, RECOMPUTE
from kernel_layouts import TOL, random_inputs, random_layout, rel_error

from tfjax.ops.attention import xla_attention
from tfjax.ops.kernels import api, mosaic_gpu, mosaic_gpu_common, mosaic_gpu_fwd, mosaic_gpu_vjp
from tfjax.ops.kernels.mosaic_gpu import MosaicGpuConfig
from tfjax.ops.kernels.mosaic_gpu_fwd import FwdConfig as Fwd
from tfjax.ops.kernels.mosaic_gpu_vjp import DqKernel, SdpGrouping
from tfjax.ops.kernels.mosaic_gpu_vjp import VjpConfig as Vjp
from tfjax.ops.mask import transfusion_mask


@pytest.mark.parametrize("d,hq,hkv,seq,cfg", MOSAIC_CASES[:2] + MOSAIC_CASES[-7:])
def test_mosaic_forward_lowers_for_cuda(d, hq, hkv, seq, cfg):
  """The Mosaic GPU forward traces and lowers to a Mosaic GPU module anywhere."""
  q = jax.ShapeDtypeStruct((2, seq, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, seq, hkv, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)
  f = jax.jit(lambda q, k, v, ks, ke: mosaic_gpu_fwd.forward(q, k, v, ks, ke, scale=0.1, cfg=cfg))
  text = f.trace(q, kv, kv, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def _check_bf16_kernel_against_reference(cfg, seg, img, q, k, v, do):
  """impl="pallas" under `cfg`: output and gradients against the float32 XLA
  reference at the bf16 tolerance, bf16 results, zero rows on padding."""
  ker = lambda q, k, v: api.attention(q, k, v, seg, img, impl="pallas", config=cfg)
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
@pytest.mark.parametrize("d,hq,hkv,seq,cfg", MOSAIC_CASES)
def test_mosaic_forward_matches_reference(d, hq, hkv, seq, cfg):
  """Mosaic GPU forward (+ the head dim's shipped backward) against the
  float32 XLA reference."""
  if api.choose("auto", d) != "mosaic_gpu":
    pytest.skip("the Mosaic GPU kernels need a Hopper GPU")
  rng = np.random.default_rng(seq + d + hq + cfg.block_k)
  seg, img = random_layout(rng, 2, seq)
  seg[1, -90:] = 0  # a padding tail longer than a block
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = random_inputs(rng, 2, seq, hq, hkv, d, jnp.bfloat16)
  config = MosaicGpuConfig(cfg, mosaic_gpu_vjp.heuristic_config(d))
  _check_bf16_kernel_against_reference(config, seg, img, q, k, v, do)



@pytest.mark.parametrize("d,hq,hkv,seq,cfg", MOSAIC_BWD_CASES)
def test_mosaic_backward_lowers_for_cuda(d, hq, hkv, seq, cfg):
  q = jax.ShapeDtypeStruct((2, seq, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, seq, hkv, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)
  lse = jax.ShapeDtypeStruct((2, hq, seq), jnp.float32)
  f = jax.jit(lambda q, k, v, o, lse, do, ks, ke: mosaic_gpu_vjp.backward(
      q, k, v, o, lse, do, ks, ke, scale=0.1, cfg=cfg))
  text = f.trace(q, kv, kv, q, lse, q, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_mosaic_kernels_lower_under_scan_and_grad_with_a_plan():
  """The Mosaic kernels where the model puts them: a custom_vjp inside a layer
  scan, differentiated, their schedule built once outside the scan."""
  seq, d = 256, 128
  cfg = MosaicGpuConfig(Fwd(), Vjp(stages_dq=2, consumer_regs=232, sdp=G, dq=RECOMPUTE,
                                   consumers_dq=2))
  ks = jnp.zeros((1, seq), jnp.int32)
  ke = ks + seq

  def loss(x):
    sched = mosaic_gpu.schedule(ks, ke, cfg)
    def layer(h, _):
      return mosaic_gpu.attention(h, h, h, ks, ke, scale=0.1, config=cfg, sched=sched), None
    return jax.lax.scan(layer, x, None, length=2)[0].astype(jnp.float32).sum()

  x = jax.ShapeDtypeStruct((1, seq, 2, d), jnp.bfloat16)
  text = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2
  # Built once: one argsort (the launch order) per schedule, none in the scan.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.zeros(x.shape, x.dtype)))
  body = jaxpr[jaxpr.index("scan["):]
  assert "sort" not in body.split("jaxpr=")[1].split("linear=")[0]


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,seq,cfg", MOSAIC_BWD_CASES)
def test_mosaic_backward_matches_reference(d, hq, hkv, seq, cfg):
  """Mosaic GPU forward and backward against the float32 XLA reference."""
  if api.choose("auto", d) != "mosaic_gpu":
    pytest.skip("the Mosaic GPU kernels need a Hopper GPU")
  rng = np.random.default_rng(seq + d + hq + 1)
  seg, img = random_layout(rng, 2, seq)
  seg[1, -90:] = 0
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = random_inputs(rng, 2, seq, hq, hkv, d, jnp.bfloat16)
  _check_bf16_kernel_against_reference(MosaicGpuConfig(Fwd(), cfg), seg, img, q, k, v, do)


def test_kernel_choice_and_shipped_configs(monkeypatch):
  """The Mosaic GPU kernels on Hopper for bf16/f16 at head dims 64/128, the
  Triton kernels on other GPUs or for float32; the shipped configs per head
  dim and length; the sequence multiple follows the kernels that run."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for capability, dtype, want in (
      (9.0, jnp.bfloat16, "mosaic_gpu"), (9.0, jnp.float16, "mosaic_gpu"),
      (9.0, jnp.float32, "triton"), (10.0, jnp.bfloat16, "triton"), (8.0, jnp.bfloat16, "xla")):
    monkeypatch.setattr(api, "_compute_capability", lambda c=capability: c)
    assert api.choose("auto", 128, dtype) == want, (capability, dtype)
  assert api.choose("pallas", 64, jnp.bfloat16) == "triton"  # capability 8: asked for
  assert api.choose("pallas", 96, jnp.bfloat16) == "xla"
  c64, c128 = mosaic_gpu_vjp.heuristic_config(64), mosaic_gpu_vjp.heuristic_config(128)
  assert c128 == Vjp()  # the dataclass defaults are what ships at 128
  assert (c64.dq, c128.dq) == (OWN_DELTA, DqKernel.FROM_DS)
  assert 0 < c128.ds_capacity < 100 and c128.stages_dq == 3
  assert (c64.consumers_dkv, c64.consumers_dq) == (3, 3)
  assert (c64.persistent_dkv, c128.persistent_dkv) == (True, False)
  assert (c128.consumers_dkv, c128.consumers_dq) == (2, 3) and c128.sdp is SdpGrouping.DQ_ONLY
  assert c128.consumer_regs == 240 and c64.skip_empty and c128.skip_empty
  # Its fallback is the recomputing kernels with dq's own delta and a 2-deep ring.
  fallback = mosaic_gpu_vjp.recompute_config(c128)
  assert (fallback.dq, fallback.stages_dq) == (OWN_DELTA, 2)
  assert (fallback.consumers_dkv, fallback.consumers_dq, fallback.sdp) == (2, 3, c128.sdp)
  with pytest.raises(ValueError, match="FROM_DS"):
    mosaic_gpu_vjp.bwd_schedule(jnp.zeros((1, 128), jnp.int32), jnp.zeros((1, 128), jnp.int32),
                                dataclasses.replace(c128, skip_empty=False))
  fwd = mosaic_gpu_fwd.heuristic_config
  assert fwd(128) == Fwd() and fwd(64).consumers == 3 and fwd(128, 4096).consumers == 2
  assert (fwd(128, 8192).consumers, fwd(128, 8192).block_k) == (3, 64)
  # A persistent forward grid at head dim 64 only; heads per CTA excluded.
  assert [fwd(*a).persistent for a in ((64,), (128, 4096), (128, 8192))] == [True, False, False]
  with pytest.raises(ValueError, match="persistent takes heads=1"):
    mosaic_gpu_fwd.forward(*(jnp.zeros((1, 128, 2, 64), jnp.bfloat16),) * 3,
                           *(jnp.zeros((1, 128), jnp.int32),) * 2, scale=1.0,
                           cfg=Fwd(block_k=64, heads=2, persistent=True))
  # The plan and the call pick the same tiles from the sequence length.
  assert api.heuristic_config("mosaic_gpu", 128, seq_len=8192).fwd == fwd(128, 8192)
  assert Vjp(block_q_dq=128, consumers_dq=2).multiple == 256
  # Three consumers pad their last CTA themselves: the tiles alone set it.
  assert c64.multiple == 64 and Fwd(consumers=3).multiple == 128
  assert mosaic_gpu.heuristic_config(64).multiple == 128
  with pytest.raises(ValueError, match="2 or 3"):
    Fwd(consumers=4).registers
  with pytest.raises(ValueError, match="consumer_regs"):  # setmaxnreg would wait forever
    mosaic_gpu_common.warpgroup_registers(2, 248)
  assert mosaic_gpu_common.warpgroup_registers(2, 240) == (240, 24)


def test_a_settled_schedule_decides_the_ds_buffer_once_on_the_host():
  """FROM_DS at head dim 128 with a 60% dS^T buffer: a schedule built outside
  jit is `settle`d (as `api.plan` does), its backward then lowers without the
  lax.cond and only with the kernels of the branch its layout needs (the dS^T
  buffer where the tiles fit, the recomputing dq where they do not); a
  schedule settled inside jit keeps the cond."""
  from tfjax.ops.mask import key_ranges
  seq, hq, d = 384, 4, 128
  cfg = MosaicGpuConfig(Fwd(), Vjp(ds_capacity=60))
  x = jax.ShapeDtypeStruct((2, seq, hq, d), jnp.bfloat16)

  def lowered(ks, ke, sched):
    def loss(q):
      return mosaic_gpu.attention(q, q, q, ks, ke, scale=0.1, config=cfg,
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
    sched = mosaic_gpu.settle(mosaic_gpu.schedule(ks, ke, cfg), cfg)
    assert sched.bwd.ds_fits == mosaic_gpu_vjp.DsFits(fits)
    text = lowered(ks, ke, sched)
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dk/dv, dq
    assert (ds_tiles in text) == fits
  traced = jax.jit(lambda ks, ke: mosaic_gpu.settle(mosaic_gpu.schedule(ks, ke, cfg), cfg))(ks, ke)
  assert traced.bwd.ds_fits is None
  text = lowered(ks, ke, traced)
  assert "stablehlo.case" in text and ds_tiles in text


def test_mosaic_profiler_only_when_asked():
  """`mosaic_gpu_common.profiling` turns on Mosaic GPU's in-kernel profiler in
  every kernel's compiler settings (tools/kernel_lab/mgpu_trace.py); outside
  it nothing is recorded and no shared memory is taken."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  params = mosaic_gpu_common.mosaic_params
  assert params(plgpu, False).profile_space == 0
  with mosaic_gpu_common.profiling("/tmp/traces", space=32):
    for lean in (False, True):
      p = params(plgpu, lean)
      assert (p.profile_dir, p.profile_space) == ("/tmp/traces", 32)
      assert p.unsafe_no_auto_barriers == lean
  assert params(plgpu, True).profile_space == 0
