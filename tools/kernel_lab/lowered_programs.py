"""Hash the lowered program of every attention-kernel test case (CPU only).

  python tools/kernel_lab/lowered_programs.py --write tools/kernel_lab/lowered_programs.json
  python tools/kernel_lab/lowered_programs.py --check tools/kernel_lab/lowered_programs.json

Proves that a refactoring of tfjax/ops/kernels/ changed no kernel: each case
(the kernel tests' configurations, and the configs the dispatch picks at
head dims 64/128 and sequence lengths 4096/8192 on a Hopper GPU) is traced and
lowered on this machine for the platform its kernels run on: "cuda" for the
Triton and Mosaic GPU kernels, a v5p topology (libtpu) for the Mosaic TPU
kernels, and the CPU for the Pallas interpret-mode programs the CPU tests run.

Normalisation (`normalised_text`): the StableHLO is printed without
locations, and every kernel module embedded in a custom call (Mosaic GPU
`module`, Triton `ir`, Mosaic TPU `body`: MLIR bytecode) is parsed and
printed again without locations; Mosaic GPU's `kernel_hash` (a hash of the
module with its locations) is dropped. Locations name source files, lines
and Python function names, which a move changes without changing a kernel;
everything else (ops, types, shapes, constants, grids, kernel names,
compiler settings) is compared.

Hashes depend on the JAX version (recorded in the file; --check refuses
another). A case missing from the new tree is reported as removed, not as a
mismatch: the refactoring may delete kernels no default reaches.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.interpreters import mlir  # noqa: E402
from jax._src.lib import tpu as tpu_dialect  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402

# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


def _strip_locs(text: str) -> str:
  """`text` without any loc(...) (balanced, quoted strings skipped): the
  locations an unregistered dialect's ops keep among their properties (the
  Triton IR's) survive printing without debug info."""
  out, i = [], 0
  while True:
    j = text.find("loc(", i)
    if j < 0:
      out.append(text[i:])
      return "".join(out)
    out.append(text[i:j])
    depth, k, quoted = 0, j + 3, False
    while True:
      c = text[k]
      if quoted:
        if c == "\\":
          k += 1
        elif c == '"':
          quoted = False
      elif c == '"':
        quoted = True
      elif c == "(":
        depth += 1
      elif c == ")":
        depth -= 1
        if depth == 0:
          break
      k += 1
    i = k + 1


def _module_text(raw: bytes) -> str:
  """An MLIR module (bytecode or text) printed without locations."""
  ctx = mlir.make_ir_context()
  tpu_dialect.register_dialect(ctx)  # Mosaic TPU bodies use its memory-space attributes
  ctx.allow_unregistered_dialects = True
  with ctx:
    text = _strip_locs(ir.Module.parse(raw).operation.get_asm(enable_debug_info=False))
  # Triton's dot keeps its source file as a property of its own.
  return re.sub(r'"[^"]*\.py"(:\d+:\d+)?', '"<source>"', text)


def _digest(text: str) -> str:
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
  """The lowered program without locations, its kernels' modules included."""
  module = lowered.compiler_ir("stablehlo")
  with module.context:
    for call in _custom_calls(module.operation, []):
      attrs = call.attributes
      if "mhlo.backend_config" in attrs:
        cfg = ir.DictAttr(attrs["mhlo.backend_config"])
        fields = {}
        for i in range(len(cfg)):
          named = cfg[i]
          fields[named.name] = named.attr
        new = {}
        for name, attr in fields.items():
          if name == "kernel_hash":
            continue
          if name in ("module", "ir"):
            raw = bytes(ir.StringAttr(attr).value_bytes)
            attr = ir.StringAttr.get("normalised:" + _digest(_module_text(raw)))
          new[name] = attr
        attrs["mhlo.backend_config"] = ir.DictAttr.get(new)
      elif "backend_config" in attrs:
        text = ir.StringAttr(attrs["backend_config"]).value
        if text.startswith("{") and "custom_call_config" in text:
          cfg = json.loads(text)
          body = cfg["custom_call_config"]["body"]
          cfg["custom_call_config"]["body"] = "normalised:" + _digest(
              _module_text(base64.b64decode(body)))
          attrs["backend_config"] = ir.StringAttr.get(json.dumps(cfg, sort_keys=True))
    text = module.operation.get_asm(enable_debug_info=False)
  # Lowering-time unique suffixes of private functions (argsort_8) follow
  # the order of first use: kept, they are part of the program.
  return text


# ---------------------------------------------------------------------------
# Cases: the kernel tests' configurations (tests/test_attention_*.py) in
# their historical positional form, mapped onto today's API by the builders
# below (the only part that changes with the library's API).
# ---------------------------------------------------------------------------

# (head_dim, q_heads, kv_heads, seq, forward fields) of test_attention_mosaic
MOSAIC_FWD = [
    (64, 4, 2, 512, (64, 128, 3, 2)),
    (128, 2, 2, 384, (64, 128, 2, 1)),
    (128, 4, 1, 512, (64, 64, 2, 4, False, False)),
    (64, 2, 2, 320, (64, 64, 4, 2)),
    (128, 2, 2, 384, (64, 128, 2, 1, True, True, False, False)),
    (64, 4, 2, 512, (64, 128, 2, 1, True, True, False, True, 3)),
    (128, 2, 2, 384, (64, 64, 2, 2, True, True, False, True, 3)),
    (128, 4, 2, 448, (64, 64, 2, 1, True, True, False, True, 3)),
    (128, 4, 2, 448, (64, 64, 2, 1, True, True, False, True, 3, 5)),
    (64, 4, 2, 512, (64, 128, 2, 1, True, True, False, True, 2, 3)),
    (64, 4, 2, 512, (64, 128, 2, 1, True, True, False, True, 3, 5)),
]

# (head_dim, q_heads, kv_heads, seq, backward fields) of test_attention_mosaic
MOSAIC_BWD = [
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 1)),
    (128, 2, 2, 384, (64, 64, 2, 64, 64, 2, 1)),
    (128, 2, 1, 384, (64, 64, 2, 64, 64, 2, 1, 240)),
    (64, 2, 2, 320, (64, 64, 3, 64, 64, 2, 1, 240)),
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1)),
    (128, 2, 2, 384, (64, 64, 3, 64, 128, 2, 0, 232, 0)),
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 1, 240, 1, 0, 1)),
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 1, 240, 1, 0, 0, 0)),
    (128, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 0, 1)),
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1, 3, 3)),
    (128, 2, 2, 320, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 3)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 2, 0, 240, 2, 0, 0, 1, 1)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 2, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1)),
    (64, 2, 2, 320, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 3, 3, 1)),
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 2, 1, 30)),
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 2, 1, 60)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 100)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 30)),
    (64, 4, 2, 512, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 1, 3, 3, 0, 100, 5)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 100, 5)),
]

# (dtype, head_dim, q_heads, kv_heads, seq, block_q, block_k) of test_attention_kernels
TRITON = [
    ("float32", 64, 4, 2, 256, 64, 64),
    ("bfloat16", 128, 2, 2, 256, 64, 128),
    ("bfloat16", 64, 4, 1, 320, 128, 64),
    ("float32", 128, 2, 1, 200, None, None),
]

FUSED = (64, 64, 2, 64, 64, 2, 1)
TWO_KERNEL = (64, 64, 2, 64, 64, 2, 0)


# ---------------------------------------------------------------------------
# Builders: today's API (tfjax/ops/kernels/ after the move to one module per
# backend and pass). Before it (commit 66cc520) they called dispatch, gpu,
# gpu_mosaic and gpu_mosaic_bwd with the positional tuples directly.
# ---------------------------------------------------------------------------

from tfjax.ops.kernels import (api, mosaic_gpu, mosaic_gpu_fwd, mosaic_gpu_vjp,  # noqa: E402
                               mosaic_tpu, triton)
from tfjax.ops.kernels.mosaic_gpu_vjp import DqKernel, SdpGrouping  # noqa: E402
from tfjax.ops.mask import key_ranges  # noqa: E402


class Removed(Exception):
  """A case whose kernel path the move deleted (no default reached it)."""


# The positional configs' field order and defaults before the move.
_FWD_FIELDS = dict(block_q=64, block_k=128, num_stages=2, heads=1, lpt=True, heads_outer=True,
                   lean=False, skip_empty=True, consumers=2, persistent=0)
_BWD_FIELDS = dict(block_q_dkv=64, block_k_dkv=64, stages_dkv=2, block_q_dq=64, block_k_dq=64,
                   stages_dq=2, fuse_dq=1, consumer_regs=232, sdp_group=1, lean=0,
                   dq_own_keys=0, skip_empty=1, dq_delta=0, consumers_dkv=2, consumers_dq=2,
                   dq_from_ds=0, ds_capacity=100, persistent_dkv=0)


def legacy_fwd(fields) -> mosaic_gpu_fwd.FwdConfig:
  """A positional MosaicFwdConfig tuple as today's named forward config."""
  f = dict(_FWD_FIELDS, **dict(zip(_FWD_FIELDS, fields)))
  persistent = f.pop("persistent")
  return mosaic_gpu_fwd.FwdConfig(**{k: (bool(v) if isinstance(_FWD_FIELDS[k], bool) else v)
                                     for k, v in f.items()},
                                  persistent=bool(persistent),
                                  persistent_ctas=persistent if persistent > 1 else None)


def legacy_vjp(fields) -> mosaic_gpu_vjp.VjpConfig:
  """A positional MosaicBwdConfig tuple as today's named backward config."""
  f = dict(_BWD_FIELDS, **dict(zip(_BWD_FIELDS, fields)))
  if f["fuse_dq"] or f["dq_own_keys"]:
    raise Removed("the fused dk/dv/dq kernel")
  dq = (DqKernel.FROM_DS if f["dq_from_ds"] else
        DqKernel.RECOMPUTE_OWN_DELTA if f["dq_delta"] else DqKernel.RECOMPUTE)
  sdp = {0: SdpGrouping.SEPARATE, 1: SdpGrouping.GROUPED, 2: SdpGrouping.DQ_ONLY}[f["sdp_group"]]
  return mosaic_gpu_vjp.VjpConfig(
      **{k: f[k] for k in ("block_q_dkv", "block_k_dkv", "stages_dkv", "block_q_dq",
                           "block_k_dq", "stages_dq", "consumer_regs", "consumers_dkv",
                           "consumers_dq", "ds_capacity")},
      sdp=sdp, lean=bool(f["lean"]), skip_empty=bool(f["skip_empty"]), dq=dq,
      persistent_dkv=bool(f["persistent_dkv"]),
      persistent_ctas=f["persistent_dkv"] if f["persistent_dkv"] > 1 else None)


def mosaic_fwd_config(fields):
  return legacy_fwd(fields)


def mosaic_bwd_config(fields):
  return legacy_vjp(fields)


def triton_config(head_dim, dtype, block_q=None, block_k=None):
  """What the dispatch gives the Triton kernels."""
  return api.heuristic_config("triton", head_dim, dtype, None, block_q, block_k)


def gpu_config(fwd_fields, bwd_fields, head_dim):
  """The Mosaic GPU forward and backward under the given fields."""
  del head_dim
  if bwd_fields is None:
    raise Removed("the Mosaic GPU forward with the Triton backward")
  return mosaic_gpu.MosaicGpuConfig(legacy_fwd(fwd_fields), legacy_vjp(bwd_fields))


def mixed_triton_config():
  t = triton.Tiles
  return triton.TritonConfig(fwd=t(64, 128, 4, 3), dkv=t(128, 64, 4, 3), dq=t(64, 32, 4, 3),
                             skip_full_mask=False)


def hopper_default_config(head_dim, seq_len):
  """The dispatch's choice and config for bf16 on a Hopper GPU."""
  saved = api._compute_capability, jax.default_backend
  api._compute_capability, jax.default_backend = (lambda: 9.0), (lambda: "gpu")
  try:
    kind = api.choose("auto", head_dim, jnp.bfloat16)
  finally:
    api._compute_capability, jax.default_backend = saved
  assert kind == "mosaic_gpu", kind
  return api.heuristic_config(kind, head_dim, jnp.bfloat16, seq_len)


def multiple(cfg):
  return cfg.multiple


def padded(seq, cfg):
  """seq rounded up to the config's multiple (as the dispatch pads)."""
  return -(-seq // multiple(cfg)) * multiple(cfg)


def mosaic_forward(q, k, v, ks, ke, cfg):
  return mosaic_gpu_fwd.forward(q, k, v, ks, ke, scale=0.1, cfg=cfg)


def mosaic_backward(q, k, v, o, lse, do, ks, ke, cfg):
  return mosaic_gpu_vjp.backward(q, k, v, o, lse, do, ks, ke, scale=0.1, cfg=cfg)


def gpu_attention(q, k, v, ks, ke, cfg, *, interpret=False, sched=None):
  if isinstance(cfg, mosaic_gpu.MosaicGpuConfig):
    return mosaic_gpu.attention(q, k, v, ks, ke, scale=0.1, config=cfg, sched=sched)
  return triton.attention(q, k, v, ks, ke, scale=0.1, config=cfg, interpret=interpret,
                          sched=sched)


def gpu_schedule(ks, ke, cfg, settle=False):
  sched = mosaic_gpu.schedule(ks, ke, cfg)
  return mosaic_gpu.settle(sched, cfg) if settle else sched


def gpu_forward_only(q, k, v, ks, ke, cfg):
  return triton.attention_forward(q, k, v, ks, ke, scale=0.1, config=cfg)


def dispatch_attention(q, k, v, seg, img, **kw):
  return api.attention(q, k, v, seg, img, impl="pallas", **kw)


def tpu_attention(q, k, v, ks, ke, block, interpret):
  cfg = mosaic_tpu.MosaicTpuConfig(block, block) if block else mosaic_tpu.heuristic_config(0)
  return mosaic_tpu.attention(q, k, v, ks, ke, scale=0.1, config=cfg, interpret=interpret)


# ---------------------------------------------------------------------------
# Case construction (API-independent)
# ---------------------------------------------------------------------------

BF16 = jnp.bfloat16


def _sds(shape, dtype, sharding=None):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _fb(fn):
  """Forward and backward of fn(q, k, v): (out, dq, dk, dv) for cotangent do."""
  def run(q, k, v, do, *rest):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
    return (out,) + vjp(do)
  return run


def _ids(batch, seq):
  return _sds((batch, seq), jnp.int32)


def _layout(batch, seq):
  """A fixed packed layout (documents of 97 tokens, images of 40 inside them)."""
  pos = np.arange(seq)
  seg = np.broadcast_to(pos // 97 + 1, (batch, seq)).astype(np.int32).copy()
  img = np.where((pos % 97 >= 20) & (pos % 97 < 60), pos // 97 + 1, 0)
  img = np.broadcast_to(img, (batch, seq)).astype(np.int32).copy()
  seg[-1, -30:] = 0
  return jnp.asarray(seg), jnp.asarray(img)


def cases():
  """name -> zero-argument function returning a `Lowered`."""
  out = {}

  def cuda(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

  for i, (d, hq, hkv, seq, fields) in enumerate(MOSAIC_FWD):
    def fwd(d=d, hq=hq, hkv=hkv, seq=seq, fields=fields):
      cfg = mosaic_fwd_config(fields)
      seq = padded(seq, cfg)
      return cuda(lambda q, k, v, ks, ke: mosaic_forward(q, k, v, ks, ke, cfg),
                  _sds((2, seq, hq, d), BF16), _sds((2, seq, hkv, d), BF16),
                  _sds((2, seq, hkv, d), BF16), _ids(2, seq), _ids(2, seq))
    out[f"mosaic_fwd[{i}] d{d} hq{hq} hkv{hkv} L{seq} {fields}"] = fwd

    def fb_triton_bwd(d=d, hq=hq, hkv=hkv, seq=seq, fields=fields):
      cfg = gpu_config(fields, None, d)
      seq = padded(seq, cfg)
      q, kv = _sds((2, seq, hq, d), BF16), _sds((2, seq, hkv, d), BF16)
      return cuda(_fb(lambda q, k, v, ks, ke: gpu_attention(q, k, v, ks, ke, cfg)),
                  q, kv, kv, q, _ids(2, seq), _ids(2, seq))
    out[f"mosaic_fwd+triton_bwd[{i}] d{d} hq{hq} hkv{hkv} L{seq} {fields}"] = fb_triton_bwd

  for i, (d, hq, hkv, seq, fields) in enumerate(MOSAIC_BWD):
    def bwd(d=d, hq=hq, hkv=hkv, seq=seq, fields=fields):
      cfg = mosaic_bwd_config(fields)
      seq = padded(seq, cfg)
      q, kv = _sds((2, seq, hq, d), BF16), _sds((2, seq, hkv, d), BF16)
      return cuda(lambda q, k, v, o, lse, do, ks, ke: mosaic_backward(
          q, k, v, o, lse, do, ks, ke, cfg), q, kv, kv, q,
          _sds((2, hq, seq), jnp.float32), q, _ids(2, seq), _ids(2, seq))
    out[f"mosaic_bwd[{i}] d{d} hq{hq} hkv{hkv} L{seq} {fields}"] = bwd

    def fb(d=d, hq=hq, hkv=hkv, seq=seq, fields=fields):
      cfg = gpu_config((64, 128, 2, 1), fields, d)
      seq = padded(seq, cfg)
      q, kv = _sds((2, seq, hq, d), BF16), _sds((2, seq, hkv, d), BF16)
      return cuda(_fb(lambda q, k, v, ks, ke: gpu_attention(q, k, v, ks, ke, cfg)),
                  q, kv, kv, q, _ids(2, seq), _ids(2, seq))
    out[f"mosaic_fwd+bwd[{i}] d{d} hq{hq} hkv{hkv} L{seq} {fields}"] = fb

  # The model's use: a schedule built once outside a scanned, differentiated stack.
  for name, bwd_fields in (("fused", FUSED), ("two_kernel", TWO_KERNEL)):
    def scan(bwd_fields=bwd_fields):
      seq, d = 256, 128
      cfg = gpu_config((64, 128, 2, 1), bwd_fields, d)
      ks = jnp.zeros((1, seq), jnp.int32)
      ke = ks + seq

      def loss(x):
        sched = gpu_schedule(ks, ke, cfg)
        def layer(h, _):
          return gpu_attention(h, h, h, ks, ke, cfg, sched=sched), None
        return jax.lax.scan(layer, x, None, length=2)[0].astype(jnp.float32).sum()
      return cuda(jax.grad(loss), _sds((1, seq, 2, d), BF16))
    out[f"mosaic_scan_grad_plan[{name}]"] = scan

  # A settled schedule (dS^T buffer fit decided on the host) and a traced one.
  settled_bwd = (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1, 60)
  seq = 384
  docs = jnp.broadcast_to(jnp.arange(seq) // 64 + 1, (2, seq)).astype(jnp.int32)
  one_doc = jnp.ones((2, seq), jnp.int32)
  for name, seg, settle in (("fits", docs, True), ("overflows", one_doc, True),
                            ("traced", one_doc, False)):
    def settled(seg=seg, settle=settle, seq=seq):
      cfg = gpu_config((64, 128, 2, 1), settled_bwd, 128)
      ks, ke = key_ranges(seg, jnp.zeros_like(seg))
      sched = (gpu_schedule(ks, ke, cfg, settle=True) if settle else
               jax.jit(lambda ks, ke: gpu_schedule(ks, ke, cfg, settle=True))(ks, ke))
      loss = lambda q: gpu_attention(q, q, q, ks, ke, cfg, sched=sched).astype(
          jnp.float32).sum()
      return cuda(jax.grad(loss), _sds((2, seq, 4, 128), BF16))
    out[f"mosaic_settled[{name}]"] = settled

  # What the dispatch picks on a Hopper GPU (bf16), forward and backward.
  for d in (64, 128):
    for seq_len in (4096, 8192):
      def default(d=d, seq_len=seq_len):
        cfg = hopper_default_config(d, seq_len)
        seq = 3 * multiple(cfg)  # a short sequence lowered with the long one's config
        q, kv = _sds((2, seq, 4, d), BF16), _sds((2, seq, 2, d), BF16)
        return cuda(_fb(lambda q, k, v, ks, ke: gpu_attention(q, k, v, ks, ke, cfg)),
                    q, kv, kv, q, _ids(2, seq), _ids(2, seq))
      out[f"hopper_default d{d} seq_len{seq_len}"] = default

  # Triton kernels for CUDA (the non-Hopper path): the test cases' tiles and
  # the defaults, forward+backward, and the forward-only KV-cache kernel.
  for dtype, d, hq, hkv, seq, bq, bk in TRITON + [("bfloat16", 64, 4, 2, 256, None, None),
                                                  ("bfloat16", 128, 4, 2, 256, None, None)]:
    def triton(dtype=dtype, d=d, hq=hq, hkv=hkv, seq=seq, bq=bq, bk=bk):
      dt = jnp.dtype(dtype)
      cfg = triton_config(d, dt, bq, bk)
      seq = padded(seq, cfg)
      q, kv = _sds((2, seq, hq, d), dt), _sds((2, seq, hkv, d), dt)
      return cuda(_fb(lambda q, k, v, ks, ke: gpu_attention(q, k, v, ks, ke, cfg)),
                  q, kv, kv, q, _ids(2, seq), _ids(2, seq))
    out[f"triton_cuda {dtype} d{d} hq{hq} hkv{hkv} L{seq} blocks{bq},{bk}"] = triton

  def triton_mixed():
    cfg = mixed_triton_config()
    q = _sds((1, 128, 2, 64), jnp.float32)
    return cuda(_fb(lambda q, k, v, ks, ke: gpu_attention(q, k, v, ks, ke, cfg)),
                q, q, q, q, _ids(1, 128), _ids(1, 128))
  out["triton_cuda mixed tiles, folded mask"] = triton_mixed

  for d in (64, 128):
    def cached(d=d):
      cfg = triton_config(d, BF16)
      q, kv = _sds((2, 64, 4, d), BF16), _sds((2, 512, 2, d), BF16)
      return cuda(lambda q, k, v, ks, ke: gpu_forward_only(q, k, v, ks, ke, cfg),
                  q, kv, kv, _ids(2, 64), _ids(2, 64))
    out[f"triton_cuda forward-only d{d}"] = cached

  # The CPU tests' programs: Triton kernels in Pallas interpret mode through
  # the dispatch (padding, plan), and the TPU kernels in TPU interpret mode.
  for dtype, d, hq, hkv, seq, bq, bk in TRITON:
    def interp(dtype=dtype, d=d, hq=hq, hkv=hkv, seq=seq, bq=bq, bk=bk):
      dt = jnp.dtype(dtype)
      seg, img = _layout(2, seq)
      q, kv = _sds((2, seq, hq, d), dt), _sds((2, seq, hkv, d), dt)
      f = _fb(lambda q, k, v: dispatch_attention(q, k, v, seg, img, block_q=bq, block_k=bk))
      return jax.jit(f).trace(q, kv, kv, q).lower()
    out[f"triton_interpret {dtype} d{d} hq{hq} hkv{hkv} L{seq} blocks{bq},{bk}"] = interp

  def tpu_interp():
    seg, img = _layout(1, 256)
    ks, ke = key_ranges(seg, img)
    q, kv = _sds((1, 256, 2, 128), jnp.float32), _sds((1, 256, 1, 128), jnp.float32)
    f = _fb(lambda q, k, v: tpu_attention(q, k, v, ks, ke, 128, True))
    return jax.jit(f).trace(q, kv, kv, q).lower()
  out["tpu_interpret f32 d128 hq2 hkv1 L256 blocks128"] = tpu_interp

  for block, d in ((None, 128), (128, 64)):
    def tpu_mosaic(block=block, d=d):
      from jax.experimental import topologies
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
      mesh = Mesh(np.array(topo.devices[:1]), ("x",))
      sh = NamedSharding(mesh, P())
      q, kv = _sds((2, 512, 4, d), BF16, sh), _sds((2, 512, 2, d), BF16, sh)
      ids = _sds((2, 512), jnp.int32, sh)
      f = _fb(lambda q, k, v, ks, ke: tpu_attention(q, k, v, ks, ke, block, False))
      with jax.set_mesh(mesh):
        return jax.jit(f).trace(q, kv, kv, q, ids, ids).lower()
    out[f"tpu_mosaic v5p bf16 d{d} blocks{block}"] = tpu_mosaic
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--write", help="record the hashes into this JSON file")
  group.add_argument("--check", help="compare with the hashes in this JSON file")
  parser.add_argument("-k", default="", help="only cases whose name contains this")
  parser.add_argument("--dump", help="write each case's normalised text into this folder")
  args = parser.parse_args()
  if args.check:
    with open(args.check) as f:
      want = json.load(f)
    if want["jax"] != jax.__version__:
      sys.exit(f"{args.check} holds hashes for JAX {want['jax']}, this is {jax.__version__}")
  got, t0 = {}, time.time()
  removed_here = []
  for name, build in cases().items():
    if args.k not in name:
      continue
    jax.clear_caches()  # each case lowered as if alone: lowering caches leave traces
    try:
      text = normalised_text(build())
    except Removed as e:
      removed_here.append(name)
      print(f"removed           {name}: {e}", flush=True)
      continue
    got[name] = _digest(text)
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      with open(os.path.join(args.dump, re.sub(r"[^\w.+-]+", "_", name) + ".mlir"), "w") as f:
        f.write(text)
    print(f"{got[name]}  {name}", flush=True)
  print(f"{len(got)} cases in {time.time() - t0:.0f} s")
  if args.write:
    with open(args.write, "w") as f:
      json.dump({"jax": jax.__version__, "cases": got}, f, indent=1, sort_keys=True)
      f.write("\n")
    return
  cases_want = want["cases"]
  changed = [n for n in got if n in cases_want and got[n] != cases_want[n]]
  new = [n for n in got if n not in cases_want]
  removed = [n for n in cases_want if n not in got and args.k in n]
  assert set(removed) >= set(removed_here)
  same = len(got) - len(changed) - len(new)
  print(f"identical: {same}; changed: {len(changed)}; new: {len(new)}; removed: {len(removed)}")
  for kind, names in (("CHANGED", changed), ("NEW", new), ("REMOVED", removed)):
    for n in names:
      print(f"{kind}  {n}")
  sys.exit(1 if changed else 0)


if __name__ == "__main__":
  main()
