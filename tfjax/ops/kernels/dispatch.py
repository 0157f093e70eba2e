"""Choose and call the block-sparse attention kernel for the backend.

`attention(q, k, v, segment_ids, image_ids, impl=...)` has the semantics of
`tfjax.ops.attention.xla_attention` under `transfusion_mask`:

  impl="auto"    GPU (Hopper or newer): the Pallas GPU kernels (on Hopper, for
                 bf16/f16 at head dims 64/128, the Mosaic GPU kernels of
                 gpu_mosaic.py and gpu_mosaic_bwd.py, else the Triton kernels
                 of gpu.py; at head dim 64 the Mosaic backward is fused and its
                 dq is summed by float32 atomics, so not bit-reproducible:
                 TFJAX_MOSAIC_BWD=64,64,2,64,64,2,0 picks the deterministic
                 two-kernel backward);
                 TPU: the Pallas TPU kernel; anything else (CPU): the XLA
                 reference, since interpret mode is far too slow to train with.
  impl="pallas"  the kernel for the backend; on CPU, the GPU kernel in Pallas
                 interpret mode (tests).

The sequence is padded to a multiple of the block size with padding positions
(segment id 0), which attend to nothing and are sliced off again.

Sharding: a Pallas call is opaque to XLA's partitioner, which would gather a
sharded batch onto every device. When a mesh is set with `jax.set_mesh(mesh)` (as the trainer
should, around tracing its step), the call is wrapped in
`shard_map` with the batch over the mesh axes named in `BATCH_AXES` and heads
over `HEAD_AXES` (those present in the mesh and dividing the dimension), so
each device runs the kernel on its own slice, with no communication: the mask
never crosses a sequence.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tfjax.ops.mask import key_ranges

# Mesh axes (config.mesh.rules: "batch" -> (data, fsdp), "heads" -> tensor).
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)
SUPPORTED_HEAD_DIMS = (64, 128)


def _backend() -> str:
  return jax.default_backend()


def _compute_capability() -> float:
  """The first device's compute capability (e.g. 9.0), 0 where it has none."""
  try:
    return float(getattr(jax.devices()[0], "compute_capability", "0"))
  except (ValueError, TypeError, RuntimeError):
    return 0.0


def _gpu_is_hopper_or_newer() -> bool:
  return _compute_capability() >= 9.0


def _gpu_is_hopper() -> bool:
  """Compute capability 9.x: where the Mosaic GPU kernels (wgmma) run."""
  return 9.0 <= _compute_capability() < 10.0


def use_mosaic_forward(kind: str, head_dim: int, dtype) -> bool:
  """The Mosaic GPU forward applies: a Hopper GPU, bf16/f16, head dim 64/128.

  TFJAX_MOSAIC_FWD=0 in the environment turns it off (Triton forward).
  """
  from tfjax.ops.kernels import gpu_mosaic
  return (kind == "gpu" and os.environ.get("TFJAX_MOSAIC_FWD", "1") != "0"
          and gpu_mosaic.supported(dtype, head_dim) and _gpu_is_hopper())


def choose(impl: str, head_dim: int) -> str:
  """The concrete implementation: "xla", "gpu", "gpu_interpret" or "tpu"."""
  backend = _backend()
  if head_dim not in SUPPORTED_HEAD_DIMS:
    if impl == "pallas":
      logging.warning("Pallas attention supports head dims %s, not %d: falling back "
                      "to XLA (config key model.dim / model.num_heads)",
                      SUPPORTED_HEAD_DIMS, head_dim)
    return "xla"
  if backend == "tpu":
    return "tpu"
  if backend == "gpu":
    if impl == "pallas" or _gpu_is_hopper_or_newer():
      return "gpu"
    return "xla"
  return "gpu_interpret" if impl == "pallas" else "xla"


def kernel_config(kind: str, head_dim: int, block_q: int | None = None,
                  block_k: int | None = None, dtype=jnp.bfloat16):
  """The kernel's tiling config; block_q/block_k override every kernel's tiles."""
  if kind == "tpu":
    from tfjax.ops.kernels import tpu
    cfg = tpu.TpuConfig()
    if block_q or block_k:
      cfg = tpu.TpuConfig(block_q=block_q or cfg.block_q, block_k=block_k or cfg.block_k)
    return cfg
  from tfjax.ops.kernels import gpu
  if block_q or block_k:  # the Triton kernels' tiles; the Mosaic forward keeps its own
    cfg = gpu.GpuConfig.uniform(block_q or 64, block_k or 64)
  else:
    cfg = gpu.GpuConfig.for_head_dim(head_dim, dtype)
  if use_mosaic_forward(kind, head_dim, dtype):
    cfg = dataclasses.replace(cfg, mosaic_fwd=gpu.GpuConfig.mosaic_default(head_dim),
                              mosaic_bwd=mosaic_backward_config(head_dim))
  return cfg


def mosaic_backward_config(head_dim: int) -> tuple | None:
  """The Mosaic GPU backward's tiles, or None for the Triton backward.

  TFJAX_MOSAIC_BWD in the environment: "0" (Triton) or comma-separated
  integers (gpu_mosaic_bwd.MosaicBwdConfig fields, in order; omitted trailing
  fields keep their defaults) override the default.
  """
  from tfjax.ops.kernels import gpu
  env = os.environ.get("TFJAX_MOSAIC_BWD", "")
  if env == "0":
    return None
  if env:
    return tuple(int(x) for x in env.split(","))
  return gpu.GpuConfig.mosaic_bwd_default(head_dim)


def _pad_to(x: jax.Array, length: int, value=0) -> jax.Array:
  pad = length - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _local_attention(q, k, v, segment_ids, image_ids, *, kind, scale, config):
  """The kernel on one device's slice."""
  seq = q.shape[1]
  padded = -(-seq // config.multiple) * config.multiple
  q, k, v = (_pad_to(x, padded) for x in (q, k, v))
  segment_ids = _pad_to(segment_ids, padded)
  image_ids = _pad_to(image_ids, padded)
  ks, ke = key_ranges(segment_ids, image_ids)
  if kind == "tpu":
    from tfjax.ops.kernels import tpu
    out = tpu.attention(q, k, v, ks, ke, scale=scale, config=config)
  else:
    from tfjax.ops.kernels import gpu
    out = gpu.attention(q, k, v, ks, ke, scale=scale, config=config,
                        interpret=kind == "gpu_interpret")
  return out[:, :seq]


def _mesh_axes(mesh, names, size):
  """The subset of `names` in the mesh whose product divides `size`."""
  axes = []
  prod = 1
  for n in names:
    if n in mesh.axis_names and mesh.shape[n] > 1 and size % (prod * mesh.shape[n]) == 0:
      axes.append(n)
      prod *= mesh.shape[n]
  return tuple(axes) or None


def _explicit_spec(mesh, x):
  """(batch axes, head axes) read off x's type on a mesh with Explicit axes.

  Returns None on an Auto mesh, where shard_map may reshard to our specs.
  """
  if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(f"the attention kernel needs seq and head_dim unsharded, got {spec}"
                     " (config key mesh.rules: 'seq' and 'head_dim' must map to None)")
  return spec[0], spec[2]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              image_ids: jax.Array, impl: str = "auto", scale: float | None = None,
              block_q: int | None = None, block_k: int | None = None,
              config=None) -> jax.Array:
  """Transfusion-masked attention through the block-sparse kernel.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids, image_ids: int[batch, seq] (see `tfjax.ops.mask`).
    impl: "pallas" or "auto" (see module docstring).
    scale: logit scale, default head_dim ** -0.5.
    block_q, block_k: override the tile sizes.
    config: a full kernel config (gpu.GpuConfig / tpu.TpuConfig) instead.
  Returns:
    [batch, seq, q_heads, head_dim] in q's dtype.
  """
  head_dim = q.shape[-1]
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q_heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}"
                     " (config keys model.num_heads / model.num_kv_heads)")
  scale = head_dim ** -0.5 if scale is None else scale
  kind = choose(impl, head_dim)
  if kind == "xla":
    from tfjax.ops.attention import xla_attention
    from tfjax.ops.mask import transfusion_mask
    return xla_attention(q, k, v, transfusion_mask(segment_ids, image_ids), scale)
  config = config or kernel_config(kind, head_dim, block_q, block_k, q.dtype)
  fn = functools.partial(_local_attention, kind=kind, scale=scale, config=config)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return fn(q, k, v, segment_ids, image_ids)
  b_axes = _mesh_axes(mesh, BATCH_AXES, q.shape[0])
  h_axes = _mesh_axes(mesh, HEAD_AXES, k.shape[2])
  typed = _explicit_spec(mesh, q)
  qkv = P(b_axes, None, h_axes, None)
  ids = P(b_axes, None)
  if typed is not None:  # explicit-sharding mesh: follow q's own spec
    b_axes, h_axes = typed
    qkv = P(b_axes, None, h_axes, None)
    ids = P(b_axes, None)
    reshard = jax.sharding.reshard  # no-ops where the spec already matches
    q, k, v = (reshard(x, qkv) for x in (q, k, v))
    segment_ids, image_ids = reshard(segment_ids, ids), reshard(image_ids, ids)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, ids, ids),
                       out_specs=qkv, check_vma=False)(q, k, v, segment_ids, image_ids)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array,
                     k_end: jax.Array, *, impl: str = "auto",
                     scale: float | None = None) -> jax.Array | None:
  """Forward-only kernel attention of new queries to a KV-cache buffer.

  q: [batch, seq, q_heads, head_dim]; k, v: the buffer [batch, max_len,
  kv_heads, head_dim] with the new keys already written; k_start/k_end:
  int32[batch, seq] intervals into the buffer. Returns None where no GPU
  kernel applies (CPU, TPU, other head dims): the caller's XLA path is right.
  """
  head_dim = q.shape[-1]
  kind = choose(impl, head_dim)
  if kind not in ("gpu", "gpu_interpret"):
    return None
  from tfjax.ops.kernels import gpu
  config = kernel_config(kind, head_dim, None, None, q.dtype)
  block_q, block_k = config.fwd[0], config.fwd[1]
  seq = q.shape[1]
  q_len = -(-seq // block_q) * block_q
  kv_len = -(-k.shape[1] // block_k) * block_k
  q, k_start, k_end = _pad_to(q, q_len), _pad_to(k_start, q_len), _pad_to(k_end, q_len)
  k, v = _pad_to(k, kv_len), _pad_to(v, kv_len)
  scale = head_dim ** -0.5 if scale is None else scale
  out = gpu.attention_forward(q, k, v, k_start, k_end, scale=scale, config=config,
                              interpret=kind == "gpu_interpret")
  return out[:, :seq]
