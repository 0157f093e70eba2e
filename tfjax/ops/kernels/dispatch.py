"""Choose and call the block-sparse attention kernel for the backend.

`attention(q, k, v, segment_ids, image_ids, impl=...)` has the semantics of
`tfjax.ops.attention.xla_attention` under `transfusion_mask`:

  impl="auto"    GPU (Hopper or newer): the Pallas GPU kernels (on Hopper, for
                 bf16/f16 at head dims 64/128, the Mosaic GPU kernels of
                 gpu_mosaic.py and gpu_mosaic_bwd.py, else the Triton kernels
                 of gpu.py; the default Mosaic backward is the deterministic
                 two-kernel one; TFJAX_MOSAIC_BWD=64,64,2,64,64,2,1,240 picks
                 the fused kernel, whose dq is summed by float32 atomics);
                 TPU: the Pallas TPU kernel; anything else (CPU): the XLA
                 reference, since interpret mode is far too slow to train with.
  impl="pallas"  the kernel for the backend; on CPU, the GPU kernel in Pallas
                 interpret mode (tests).

The sequence is padded to a multiple of the block size with padding positions
(segment id 0), which attend to nothing and are sliced off again.

Plans: everything the kernels derive from the mask (the padded key intervals,
each kernel's work lists and launch order) depends on segment_ids and
image_ids only. `plan(...)` builds it once per batch as an `AttentionPlan`
(a pytree), and `attention(..., plan=plan)` uses it instead of rebuilding it;
the Transformer builds one per step for all its layers. Without a plan each
call builds its own (on the H100, 4-12% of an f+b call at the benchmark's
shapes: benchmarks/RESULTS.md).

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
                  block_k: int | None = None, dtype=jnp.bfloat16,
                  seq_len: int | None = None):
  """The kernel's tiling config; block_q/block_k override every kernel's tiles.

  seq_len: query rows per sequence (some defaults depend on it), or None.
  """
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
    cfg = dataclasses.replace(cfg, mosaic_fwd=gpu.GpuConfig.mosaic_default(head_dim, seq_len),
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


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("k_start", "k_end", "sched"),
                   meta_fields=("kind", "config", "seq", "batch_axes"))
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Everything the kernels derive from the mask, computed once per batch.

  The key intervals and the kernels' work lists depend on segment_ids and
  image_ids only, not on q, k or v: a model computes them once (`plan`) and
  hands the plan to every layer's `attention(..., plan=plan)`, as
  FlexAttention's BlockMask is built once and reused. Without a plan each
  call builds its own (the same arrays, every layer, forward and backward
  in XLA ops around the kernels).

  k_start, k_end: int32[batch, padded seq] key intervals.
  sched: the kernel family's schedule (gpu.Schedule / tpu.Schedule). Built
    outside jit it is also `gpu.settle`d: its data-dependent kernel choices
    (the dS^T buffer's fit) are made on the host once, not in every call.
  kind, config: the implementation and tiling the schedule was built for;
    seq: the unpadded sequence length; batch_axes: the mesh axes the batch
    was split over while building it, None without a mesh (all static). The
    launch orders index the device's own batch slice, so the attention calls
    split the batch the same way.
  """
  k_start: jax.Array
  k_end: jax.Array
  sched: object
  kind: str
  config: object
  seq: int
  batch_axes: tuple | None = None


def _local_plan(segment_ids, image_ids, *, kind, config) -> AttentionPlan:
  """The plan for one device's batch slice."""
  seq = segment_ids.shape[1]
  padded = -(-seq // config.multiple) * config.multiple
  ks, ke = key_ranges(_pad_to(segment_ids, padded), _pad_to(image_ids, padded))
  if kind == "tpu":
    from tfjax.ops.kernels import tpu
    sched = tpu.schedule(ks, ke, config)
  else:
    from tfjax.ops.kernels import gpu
    # Built outside jit, the schedule's data-dependent choices are made here,
    # once, instead of in every backward (`gpu.settle`).
    sched = gpu.settle(gpu.schedule(ks, ke, config, interpret=kind == "gpu_interpret"), config)
  return AttentionPlan(ks, ke, sched, kind, config, seq)


def _local_attention(q, k, v, plan: AttentionPlan, *, scale):
  """The kernel on one device's slice, under its plan."""
  seq, config = q.shape[1], plan.config
  padded = plan.k_start.shape[1]
  q, k, v = (_pad_to(x, padded) for x in (q, k, v))
  if plan.kind == "tpu":
    from tfjax.ops.kernels import tpu
    out = tpu.attention(q, k, v, plan.k_start, plan.k_end, scale=scale, config=config,
                        sched=plan.sched)
  else:
    from tfjax.ops.kernels import gpu
    out = gpu.attention(q, k, v, plan.k_start, plan.k_end, scale=scale, config=config,
                        interpret=plan.kind == "gpu_interpret", sched=plan.sched)
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


def _is_explicit(mesh) -> bool:
  """Arrays on this mesh carry their sharding in their type (Explicit axes)."""
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _explicit_spec(mesh, x):
  """(batch axes, head axes) read off the type of x [batch, seq, heads,
  head_dim] on a mesh with Explicit axes.

  Returns None on an Auto mesh, where shard_map may reshard to our specs.
  """
  if not _is_explicit(mesh):
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  spec = spec + (None,) * (x.ndim - len(spec))
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(f"the attention kernel needs seq and head_dim unsharded, got {spec}"
                     " (config key mesh.rules: 'seq' and 'head_dim' must map to None)")
  return spec[0], spec[2]


def _batch_and_head_axes(mesh, q, kv_heads: int):
  """(batch axes, kv-head axes, explicit?) of the kernel's shard_map: on an
  explicit-sharding mesh q's own spec, else the mesh axes that divide."""
  typed = _explicit_spec(mesh, q)
  if typed is not None:
    return typed + (True,)
  return _mesh_axes(mesh, BATCH_AXES, q.shape[0]), _mesh_axes(mesh, HEAD_AXES, kv_heads), False


def _sharded_mesh():
  """The mesh set with `jax.set_mesh`, or None when there is nothing to shard."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  return mesh


def _resolve(impl: str, head_dim: int, dtype, block_q, block_k, config, seq_len):
  kind = choose(impl, head_dim)
  if kind == "xla":
    return kind, None
  return kind, config or kernel_config(kind, head_dim, block_q, block_k, dtype, seq_len)


def plan(segment_ids: jax.Array, image_ids: jax.Array, *, head_dim: int,
         dtype=jnp.bfloat16, impl: str = "auto", block_q: int | None = None,
         block_k: int | None = None, config=None) -> AttentionPlan | None:
  """The attention plan of a packed batch, for every layer's `attention`.

  Args:
    segment_ids, image_ids: int[batch, seq] (see `tfjax.ops.mask`).
    head_dim, dtype: of the q/k/v the plan will serve (they pick the kernels
      and their tiles).
    impl, block_q, block_k, config: as for `attention`.
  Returns:
    An AttentionPlan, or None where `impl` resolves to the XLA reference
    (which needs none). Under a mesh (`jax.set_mesh`) the plan is built
    per device on its batch slice, sharded like the batch.
  """
  kind, config = _resolve(impl, head_dim, dtype, block_q, block_k, config,
                          segment_ids.shape[1])
  if kind == "xla":
    return None
  fn = functools.partial(_local_plan, kind=kind, config=config)
  mesh = _sharded_mesh()
  if mesh is None:
    return fn(segment_ids, image_ids)
  b_axes = _mesh_axes(mesh, BATCH_AXES, segment_ids.shape[0])
  ids = P(b_axes, None)
  if _is_explicit(mesh):
    segment_ids, image_ids = (jax.sharding.reshard(x, ids) for x in (segment_ids, image_ids))
  # Every plan array is batch-major (the launch orders flatten batch first and
  # index the device's own slice), so one batch spec shards them all.
  built = jax.shard_map(fn, mesh=mesh, in_specs=(ids, ids), out_specs=P(b_axes),
                        check_vma=False)(segment_ids, image_ids)
  return dataclasses.replace(built, batch_axes=b_axes)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              image_ids: jax.Array, impl: str = "auto", scale: float | None = None,
              block_q: int | None = None, block_k: int | None = None,
              config=None, plan: AttentionPlan | None = None) -> jax.Array:
  """Transfusion-masked attention through the block-sparse kernel.

  Args:
    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids, image_ids: int[batch, seq] (see `tfjax.ops.mask`).
    impl: "pallas" or "auto" (see module docstring).
    scale: logit scale, default head_dim ** -0.5.
    block_q, block_k: override the tile sizes.
    config: a full kernel config (gpu.GpuConfig / tpu.TpuConfig) instead.
    plan: `plan(segment_ids, image_ids, ...)` for this batch, built once and
      shared by the layers; it fixes the kernel and its tiles (impl, block_q,
      block_k and config are then unused). None: built inside this call.
  Returns:
    [batch, seq, q_heads, head_dim] in q's dtype.
  """
  head_dim = q.shape[-1]
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q_heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}"
                     " (config keys model.num_heads / model.num_kv_heads)")
  scale = head_dim ** -0.5 if scale is None else scale
  if plan is None:  # each call (each device) builds its own
    kind, config = _resolve(impl, head_dim, q.dtype, block_q, block_k, config, q.shape[1])
    if kind == "xla":
      from tfjax.ops.attention import xla_attention
      from tfjax.ops.mask import transfusion_mask
      return xla_attention(q, k, v, transfusion_mask(segment_ids, image_ids), scale)
    make_plan = functools.partial(_local_plan, kind=kind, config=config)

    def local(q, k, v, segment_ids, image_ids):
      return _local_attention(q, k, v, make_plan(segment_ids, image_ids), scale=scale)
    args = (q, k, v, segment_ids, image_ids)
  else:
    if plan.seq != q.shape[1]:
      raise ValueError(f"the attention plan was built for sequence length {plan.seq}, "
                       f"q has {q.shape[1]}: build it from this batch's segment_ids")
    local = functools.partial(_local_attention, scale=scale)
    args = (q, k, v, plan)
  mesh = _sharded_mesh()
  if plan is not None and plan.batch_axes and (
      mesh is None or not set(plan.batch_axes) <= set(mesh.axis_names)):
    raise ValueError(f"the attention plan was built under a mesh (batch over "
                     f"{plan.batch_axes}); use it under that mesh (jax.set_mesh)")
  if mesh is None:
    return local(*args)
  b_axes, h_axes, typed = _batch_and_head_axes(mesh, q, k.shape[2])
  if plan is not None:  # split the batch as the plan's launch orders assume
    b_axes = plan.batch_axes
  qkv, ids = P(b_axes, None, h_axes, None), P(b_axes, None)
  if typed:  # reshards are no-ops where the spec already matches
    reshard = jax.sharding.reshard
    args = tuple(reshard(x, qkv) for x in args[:3]) + (
        tuple(reshard(x, ids) for x in args[3:]) if plan is None else (plan,))
  # The plan's arrays are all batch-major: one batch spec covers the pytree.
  in_specs = (qkv,) * 3 + ((ids, ids) if plan is None else (P(b_axes),))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv,
                       check_vma=False)(*args)


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
