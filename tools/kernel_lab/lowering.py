"""The attention kernels' test cases, lowered on the CPU, and their normalised programs.

`cases()` maps a case name to (platform, build): build() traces and lowers
one program for the platform its kernels run on: "cuda" for the Triton and
Mosaic GPU kernels, "tpu" (a v5p topology, libtpu) for the Mosaic TPU
kernels, "cpu" for the Pallas interpret-mode programs the CPU tests run. The
cases are the kernel tests' configurations (tests/kernel_cases.py) and
the configs the dispatch picks on a Hopper GPU.

Normalisation (`normalised_text`): the StableHLO is printed without
locations, and every kernel module embedded in a custom call (Mosaic GPU
`module`, Triton `ir`, Mosaic TPU `body`: MLIR bytecode) is parsed (its
dialect registered) and printed again without locations; Mosaic GPU's
`kernel_hash` (a hash of the module with its locations) is dropped.
Locations name source files, lines and Python function names, which a move
changes without changing a kernel; everything else (ops, types, shapes,
constants, grids, kernel names, compiler settings) is compared.

Used by lowered_programs.py (all cases; the script's folder is on its path)
and tests/test_kernel_lowering.py (a subset, in CI; loaded by file path).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.interpreters import mlir
from jax._src.lib import mosaic_gpu_dialect, triton as triton_lib
from jax._src.lib import tpu as tpu_dialect
from jax._src.lib.mlir import ir

from tfjax.config.files import load_module
from tfjax.ops.kernels import api, mosaic_gpu, mosaic_gpu_fwd, mosaic_gpu_vjp, mosaic_tpu, triton
from tfjax.ops.kernels.mosaic_gpu import MosaicGpuConfig
from tfjax.ops.kernels.mosaic_gpu_fwd import FwdConfig as Fwd
from tfjax.ops.kernels.mosaic_gpu_vjp import VjpConfig as Vjp
from tfjax.ops.mask import key_ranges

# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


def _module_text(raw: bytes) -> str:
  """An MLIR module (bytecode or text) printed without locations. The
  kernels' dialects are registered: an op of an unregistered one keeps its
  properties as raw bytes, printed as whichever attribute (often a location)
  their first byte indexes."""
  ctx = mlir.make_ir_context()
  for dialect in (tpu_dialect, mosaic_gpu_dialect, triton_lib.dialect):
    dialect.register_dialect(ctx)
  ctx.allow_unregistered_dialects = True  # the stable_mosaic* serialisation wrappers
  with ctx:
    return ir.Module.parse(raw).operation.get_asm(enable_debug_info=False)


def digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _custom_calls(op, out):
  for region in op.regions:
    for block in region.blocks:
      for o in block.operations:
        if o.operation.name == "stablehlo.custom_call":
          out.append(o.operation)
        _custom_calls(o.operation, out)
  return out


def normalised_text(lowered) -> str:
  """The lowered program without locations, its kernels' modules included.

  Lowering-time unique suffixes of private functions (argsort_8) follow the
  order of first use: they are kept, as part of the program (so each case is
  lowered after `jax.clear_caches()`, as if alone).
  """
  module = lowered.compiler_ir("stablehlo")
  with module.context:
    for call in _custom_calls(module.operation, []):
      attrs = call.attributes
      if "mhlo.backend_config" in attrs:  # Mosaic GPU, Triton
        cfg = ir.DictAttr(attrs["mhlo.backend_config"])
        new = {}
        for i in range(len(cfg)):
          name, attr = cfg[i].name, cfg[i].attr
          if name == "kernel_hash":
            continue
          if name in ("module", "ir"):
            raw = bytes(ir.StringAttr(attr).value_bytes)
            attr = ir.StringAttr.get("normalised:" + digest(_module_text(raw)))
          new[name] = attr
        attrs["mhlo.backend_config"] = ir.DictAttr.get(new)
      elif "backend_config" in attrs:  # Mosaic TPU: JSON with a base64 body
        text = ir.StringAttr(attrs["backend_config"]).value
        if text.startswith("{") and "custom_call_config" in text:
          cfg = json.loads(text)
          body = cfg["custom_call_config"]["body"]
          cfg["custom_call_config"]["body"] = "normalised:" + digest(
              _module_text(base64.b64decode(body)))
          attrs["backend_config"] = ir.StringAttr.get(json.dumps(cfg, sort_keys=True))
    return module.operation.get_asm(enable_debug_info=False)


def case_digest(build) -> tuple[str, str]:
  """(hash, normalised text) of one case's program, lowered as if alone."""
  jax.clear_caches()  # lowering caches would leave traces of earlier cases
  text = normalised_text(build())
  return digest(text), text


# ---------------------------------------------------------------------------
# Cases: the kernel tests' configurations
# ---------------------------------------------------------------------------

BF16 = jnp.bfloat16

# tests/kernel_cases.py, the kernel tests' configurations (tests/ is no package).
_TESTS = load_module(os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "tests", "kernel_cases.py"))
G, RECOMPUTE = _TESTS.G, _TESTS.RECOMPUTE
MOSAIC_FWD, MOSAIC_VJP = _TESTS.MOSAIC_CASES, _TESTS.MOSAIC_BWD_CASES
TRITON, TRITON_DEFAULTS = _TESTS.TRITON_CASES, _TESTS.TRITON_DEFAULT_CASES


def _sds(shape, dtype, sharding=None):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _ids(batch, seq):
  return _sds((batch, seq), jnp.int32)


def _padded(seq, cfg):
  """seq rounded up to the config's multiple (as the dispatch pads)."""
  return -(-seq // cfg.multiple) * cfg.multiple


def _fb(fn):
  """Forward and backward of fn(q, k, v, *rest): (out, dq, dk, dv) for cotangent do."""
  def run(q, k, v, do, *rest):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
    return (out,) + vjp(do)
  return run


def _cuda(f, *args):
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def _layout(batch, seq):
  """A fixed packed layout (documents of 97 tokens, images of 40 inside them)."""
  pos = np.arange(seq)
  seg = np.broadcast_to(pos // 97 + 1, (batch, seq)).astype(np.int32).copy()
  img = np.where((pos % 97 >= 20) & (pos % 97 < 60), pos // 97 + 1, 0)
  img = np.broadcast_to(img, (batch, seq)).astype(np.int32).copy()
  seg[-1, -30:] = 0
  return jnp.asarray(seg), jnp.asarray(img)


def _gpu_fb(cfg, batch, seq, hq, hkv, d, dtype=BF16):
  """Forward+backward of the GPU kernels (`cfg`'s family) at seq rounded up."""
  seq = _padded(seq, cfg)
  q, kv = _sds((batch, seq, hq, d), dtype), _sds((batch, seq, hkv, d), dtype)
  if isinstance(cfg, MosaicGpuConfig):
    fn = lambda q, k, v, ks, ke: mosaic_gpu.attention(q, k, v, ks, ke, scale=0.1, config=cfg)
  else:
    fn = lambda q, k, v, ks, ke: triton.attention(q, k, v, ks, ke, scale=0.1, config=cfg)
  return _cuda(_fb(fn), q, kv, kv, q, _ids(batch, seq), _ids(batch, seq))


def _mosaic_fwd(d, hq, hkv, seq, cfg):
  seq = _padded(seq, cfg)
  return _cuda(lambda q, k, v, ks, ke: mosaic_gpu_fwd.forward(q, k, v, ks, ke, scale=0.1, cfg=cfg),
               _sds((2, seq, hq, d), BF16), _sds((2, seq, hkv, d), BF16),
               _sds((2, seq, hkv, d), BF16), _ids(2, seq), _ids(2, seq))


def _mosaic_vjp(d, hq, hkv, seq, cfg):
  seq = _padded(seq, cfg)
  q, kv = _sds((2, seq, hq, d), BF16), _sds((2, seq, hkv, d), BF16)
  return _cuda(lambda q, k, v, o, lse, do, ks, ke: mosaic_gpu_vjp.backward(
      q, k, v, o, lse, do, ks, ke, scale=0.1, cfg=cfg), q, kv, kv, q,
      _sds((2, hq, seq), jnp.float32), q, _ids(2, seq), _ids(2, seq))


def _mosaic_scan():
  """The model's use: a schedule built once outside a scanned, differentiated stack."""
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
  return _cuda(jax.grad(loss), _sds((1, seq, 2, d), BF16))


def _mosaic_settled(seg, settle: bool):
  """A schedule settled on the host (dS^T buffer fit decided) or inside jit."""
  cfg = MosaicGpuConfig(Fwd(), Vjp(ds_capacity=60))
  ks, ke = key_ranges(seg, jnp.zeros_like(seg))
  make = lambda ks, ke: mosaic_gpu.settle(mosaic_gpu.schedule(ks, ke, cfg), cfg)
  sched = make(ks, ke) if settle else jax.jit(make)(ks, ke)
  loss = lambda q: mosaic_gpu.attention(q, q, q, ks, ke, scale=0.1, config=cfg,
                                        sched=sched).astype(jnp.float32).sum()
  return _cuda(jax.grad(loss), _sds((2, seg.shape[1], 4, 128), BF16))


def _hopper_default_config(head_dim, seq_len):
  """The dispatch's choice and config for bf16 on a Hopper GPU."""
  saved = api._compute_capability, jax.default_backend
  api._compute_capability, jax.default_backend = (lambda: 9.0), (lambda: "gpu")
  try:
    kind = api.choose("auto", head_dim, BF16)
  finally:
    api._compute_capability, jax.default_backend = saved
  assert kind == "mosaic_gpu", kind
  return api.heuristic_config(kind, head_dim, BF16, seq_len)


def _hopper_default(d, seq_len):
  cfg = _hopper_default_config(d, seq_len)
  # a short sequence lowered with the long one's config
  return _gpu_fb(cfg, 2, 3 * cfg.multiple, 4, 2, d)


def _triton_forward_only(d):
  cfg = triton.heuristic_config(d, BF16)
  q, kv = _sds((2, 64, 4, d), BF16), _sds((2, 512, 2, d), BF16)
  return _cuda(lambda q, k, v, ks, ke: triton.attention_forward(q, k, v, ks, ke, scale=0.1,
                                                                config=cfg),
               q, kv, kv, _ids(2, 64), _ids(2, 64))


def _triton_interpret(dtype, d, hq, hkv, seq, bq, bk):
  """The CPU tests' program: the dispatch (padding, plan), Pallas interpret mode."""
  seg, img = _layout(2, seq)
  q, kv = _sds((2, seq, hq, d), dtype), _sds((2, seq, hkv, d), dtype)
  f = _fb(lambda q, k, v: api.attention(q, k, v, seg, img, impl="pallas", block_q=bq,
                                        block_k=bk))
  return jax.jit(f).trace(q, kv, kv, q).lower()


def _tpu_attention(q, k, v, ks, ke, block, interpret):
  cfg = (mosaic_tpu.MosaicTpuConfig(block, block) if block else
         mosaic_tpu.heuristic_config(q.shape[-1]))
  return mosaic_tpu.attention(q, k, v, ks, ke, scale=0.1, config=cfg, interpret=interpret)


def _mosaic_tpu_interpret():
  seg, img = _layout(1, 256)
  ks, ke = key_ranges(seg, img)
  q, kv = _sds((1, 256, 2, 128), jnp.float32), _sds((1, 256, 1, 128), jnp.float32)
  f = _fb(lambda q, k, v: _tpu_attention(q, k, v, ks, ke, 128, True))
  return jax.jit(f).trace(q, kv, kv, q).lower()


def _mosaic_tpu(block, d):
  """Lowered for one chip of a v5p topology (libtpu, no TPU needed)."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = Mesh(np.array(topo.devices[:1]), ("x",))
  sh = NamedSharding(mesh, P())
  q, kv = _sds((2, 512, 4, d), BF16, sh), _sds((2, 512, 2, d), BF16, sh)
  ids = _sds((2, 512), jnp.int32, sh)
  f = _fb(lambda q, k, v, ks, ke: _tpu_attention(q, k, v, ks, ke, block, False))
  with jax.set_mesh(mesh):
    return jax.jit(f).trace(q, kv, kv, q, ids, ids).lower()


def cases() -> dict:
  """name -> (platform: "cuda", "tpu" or "cpu", zero-argument build returning a `Lowered`)."""
  out = {}
  shape = lambda d, hq, hkv, seq: f"d{d} hq{hq} hkv{hkv} L{seq}"
  for i, (d, hq, hkv, seq, cfg) in enumerate(MOSAIC_FWD):
    out[f"mosaic_gpu_fwd[{i}] {shape(d, hq, hkv, seq)}"] = (
        "cuda", lambda c=(d, hq, hkv, seq, cfg): _mosaic_fwd(*c))
  for i, (d, hq, hkv, seq, cfg) in enumerate(MOSAIC_VJP):
    out[f"mosaic_gpu_vjp[{i}] {shape(d, hq, hkv, seq)}"] = (
        "cuda", lambda c=(d, hq, hkv, seq, cfg): _mosaic_vjp(*c))
    out[f"mosaic_gpu[{i}] fwd+vjp {shape(d, hq, hkv, seq)}"] = (
        "cuda", lambda c=(MosaicGpuConfig(Fwd(), cfg), 2, seq, hq, hkv, d): _gpu_fb(*c))
  out["mosaic_gpu scan grad, schedule built once"] = ("cuda", _mosaic_scan)
  docs = jnp.broadcast_to(jnp.arange(384) // 64 + 1, (2, 384)).astype(jnp.int32)
  one_doc = jnp.ones((2, 384), jnp.int32)
  for name, seg, settle in (("fits", docs, True), ("overflows", one_doc, True),
                            ("traced", one_doc, False)):
    out[f"mosaic_gpu settled[{name}]"] = ("cuda", lambda a=(seg, settle): _mosaic_settled(*a))
  for d in (64, 128):
    for seq_len in (4096, 8192):
      out[f"hopper_default d{d} seq_len{seq_len}"] = (
          "cuda", lambda a=(d, seq_len): _hopper_default(*a))
  for dtype, d, hq, hkv, seq, bq, bk in TRITON + TRITON_DEFAULTS:
    dtype = jnp.dtype(dtype).name
    cfg = api.heuristic_config("triton", d, jnp.dtype(dtype), None, bq, bk)
    out[f"triton {dtype} {shape(d, hq, hkv, seq)} blocks{bq},{bk}"] = (
        "cuda", lambda c=(cfg, 2, seq, hq, hkv, d, jnp.dtype(dtype)): _gpu_fb(*c))
  mixed = triton.TritonConfig(fwd=triton.Tiles(64, 128, 4, 3), dkv=triton.Tiles(128, 64, 4, 3),
                              dq=triton.Tiles(64, 32, 4, 3), skip_full_mask=False)
  out["triton mixed tiles, folded mask"] = (
      "cuda", lambda: _gpu_fb(mixed, 1, 128, 2, 2, 64, jnp.float32))
  for d in (64, 128):
    out[f"triton forward-only d{d}"] = ("cuda", lambda d=d: _triton_forward_only(d))
  for dtype, d, hq, hkv, seq, bq, bk in TRITON:
    dtype = jnp.dtype(dtype).name
    out[f"triton_interpret {dtype} {shape(d, hq, hkv, seq)} blocks{bq},{bk}"] = (
        "cpu", lambda c=(jnp.dtype(dtype), d, hq, hkv, seq, bq, bk): _triton_interpret(*c))
  out["mosaic_tpu_interpret f32 d128 hq2 hkv1 L256 blocks128"] = ("cpu", _mosaic_tpu_interpret)
  for block, d in ((None, 128), (128, 64)):
    out[f"mosaic_tpu v5p bf16 d{d} blocks{block}"] = ("tpu", lambda a=(block, d): _mosaic_tpu(*a))
  return out
