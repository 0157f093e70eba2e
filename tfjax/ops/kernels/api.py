"""Transfusion-masked attention through the block-sparse kernels: which kernel, where.

`attention(q, k, v, segment_ids, image_ids, impl=...)` has the semantics of
`reference.xla_attention` under `transfusion_mask`. `choose` is the one place
that picks the kernel:

  impl="auto"    Hopper GPU, bf16/f16, head dim 64/128: the Mosaic GPU kernels
                 (mosaic_gpu.py); another GPU of compute capability 9 or more,
                 or float32: the Triton kernels (triton.py); TPU: the Mosaic
                 TPU kernels (mosaic_tpu.py); anything else (CPU, older GPUs):
                 the XLA reference, since interpret mode is far too slow to
                 train with.
  impl="pallas"  as "auto", but the Triton kernels on any GPU, and on CPU the
                 Triton kernels in Pallas interpret mode (tests).

Each kernel module's `heuristic_config` gives its shipped tiles. The sequence
is padded to the config's multiple with padding positions (segment id 0),
which attend to nothing and are sliced off again.

Plans: what the kernels derive from the mask (key intervals, work lists,
launch orders) depends on segment_ids and image_ids only. `plan(...)` builds
it once per batch as an `AttentionPlan` (a pytree) and `attention(...,
plan=plan)` uses it; the Transformer builds one per step for all its layers.

Sharding: a Pallas call is opaque to XLA's partitioner, which would gather a
sharded batch onto every device. Under a mesh set with `jax.set_mesh(mesh)`
the call is wrapped in `shard_map`, the batch and the heads split as the
active logical axis rules (`config.mesh.rules`, made current with the mesh by
`tfjax.train.mesh.activate`) split the model's q, ("batch", "seq", "heads",
"head_dim"); without rules, as `DEFAULT_RULES` (config.mesh.rules' defaults).
Of those axes the ones in the mesh and dividing are used, so each device runs
the kernel on its own slice with no communication: the mask never crosses a
sequence. On a mesh with Explicit axes, q's own sharding decides instead.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tfjax.ops.kernels import mosaic_gpu, mosaic_tpu, triton
from tfjax.ops.kernels.reference import xla_attention
from tfjax.ops.mask import key_ranges, transfusion_mask

# Where the kernels split q/k/v without active logical axis rules: the
# defaults of config.mesh.rules for q's logical axes (QKV_LOGICAL_AXES).
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"))
QKV_LOGICAL_AXES = ("batch", "seq", "heads", "head_dim")  # as the model constrains q
SUPPORTED_HEAD_DIMS = (64, 128)
# What `choose` returns: the XLA reference or one kernel family.
KINDS = ("xla", "mosaic_gpu", "triton", "triton_interpret", "mosaic_tpu")


def _compute_capability() -> float:
  """The first device's compute capability (e.g. 9.0), 0 where it has none."""
  try:
    return float(getattr(jax.devices()[0], "compute_capability", "0"))
  except (ValueError, TypeError, RuntimeError):
    return 0.0


def choose(impl: str, head_dim: int, dtype=jnp.bfloat16) -> str:
  """The kernel for `impl` ("auto" or "pallas") on this backend: one of KINDS."""
  backend = jax.default_backend()
  if head_dim not in SUPPORTED_HEAD_DIMS:
    if impl == "pallas":
      logging.warning("Pallas attention supports head dims %s, not %d: falling back "
                      "to XLA (config key model.dim / model.num_heads)",
                      SUPPORTED_HEAD_DIMS, head_dim)
    return "xla"
  if backend == "tpu":
    return "mosaic_tpu"
  if backend == "gpu":
    capability = _compute_capability()
    if 9.0 <= capability < 10.0 and mosaic_gpu.supported(dtype, head_dim):
      return "mosaic_gpu"  # wgmma: Hopper only
    return "triton" if impl == "pallas" or capability >= 9.0 else "xla"
  return "triton_interpret" if impl == "pallas" else "xla"


def heuristic_config(kind: str, head_dim: int, dtype=jnp.bfloat16, seq_len: int | None = None,
                     block_q: int | None = None, block_k: int | None = None):
  """The shipped config of kernel `kind` (seq_len: query rows per sequence,
  which some defaults depend on). block_q/block_k override the Triton and
  TPU kernels' tiles; the Mosaic GPU kernels keep their own."""
  if kind == "mosaic_tpu":
    cfg = mosaic_tpu.heuristic_config(head_dim)
    if block_q or block_k:
      cfg = mosaic_tpu.MosaicTpuConfig(block_q=block_q or cfg.block_q,
                                       block_k=block_k or cfg.block_k)
    return cfg
  if kind == "mosaic_gpu":
    return mosaic_gpu.heuristic_config(head_dim, seq_len)
  if block_q or block_k:
    return triton.TritonConfig.uniform(block_q or 64, block_k or 64)
  return triton.heuristic_config(head_dim, dtype)


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
  sched: the kernel family's schedule (its module's `Schedule`). Built
    outside jit a Mosaic GPU one is also `settle`d: its data-dependent choice
    (the dS^T buffer's fit) is made on the host once, not in every call.
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
  if kind == "mosaic_tpu":
    sched = mosaic_tpu.schedule(ks, ke, config)
  elif kind == "mosaic_gpu":
    # Built outside jit, the schedule's data-dependent choices are made here,
    # once, instead of in every backward (`mosaic_gpu.settle`).
    sched = mosaic_gpu.settle(mosaic_gpu.schedule(ks, ke, config), config)
  else:
    sched = triton.schedule(ks, ke, config)
  return AttentionPlan(ks, ke, sched, kind, config, seq)


def _local_attention(q, k, v, plan: AttentionPlan, *, scale):
  """The kernel on one device's slice, under its plan."""
  seq, config = q.shape[1], plan.config
  padded = plan.k_start.shape[1]
  q, k, v = (_pad_to(x, padded) for x in (q, k, v))
  ks, ke, sched = plan.k_start, plan.k_end, plan.sched
  if plan.kind == "mosaic_tpu":
    out = mosaic_tpu.attention(q, k, v, ks, ke, scale=scale, config=config, sched=sched)
  elif plan.kind == "mosaic_gpu":
    out = mosaic_gpu.attention(q, k, v, ks, ke, scale=scale, config=config, sched=sched)
  else:
    out = triton.attention(q, k, v, ks, ke, scale=scale, config=config, sched=sched,
                           interpret=plan.kind == "triton_interpret")
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


def rule_axes() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(batch axes, head axes): the mesh axes the active flax logical axis rules
  (`nn.logical_axis_rules`, config.mesh.rules under `tfjax.train.mesh.activate`)
  give q's batch and heads; DEFAULT_RULES where none are active. k and v are
  split over the same head axes (each device's kv heads serve its q heads).
  Read at trace time, as flax's logical constraints are."""
  rules = nn.get_logical_axis_rules() or DEFAULT_RULES
  spec = nn.logical_to_mesh_axes(QKV_LOGICAL_AXES, rules)
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(f"the attention kernel needs seq and head_dim unsharded, the rules give "
                     f"q {spec} (config key mesh.rules: 'seq' and 'head_dim' must map to None)")
  names = lambda axes: () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return names(spec[0]), names(spec[2])


def _batch_and_head_axes(mesh, q, kv_heads: int):
  """(batch axes, kv-head axes, explicit?) of the kernel's shard_map: on an
  explicit-sharding mesh q's own spec, else the rules' axes that divide."""
  typed = _explicit_spec(mesh, q)
  if typed is not None:
    return typed + (True,)
  batch, heads = rule_axes()
  return _mesh_axes(mesh, batch, q.shape[0]), _mesh_axes(mesh, heads, kv_heads), False


def _sharded_mesh():
  """The mesh set with `jax.set_mesh`, or None when there is nothing to shard."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  return mesh


def _resolve(impl: str, head_dim: int, dtype, block_q, block_k, config, seq_len):
  kind = choose(impl, head_dim, dtype)
  if kind == "xla":
    return kind, None
  return kind, config or heuristic_config(kind, head_dim, dtype, seq_len, block_q, block_k)


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
  b_axes = _mesh_axes(mesh, rule_axes()[0], segment_ids.shape[0])
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
    config: a full kernel config for the chosen kind (`heuristic_config`'s type).
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
  kind = choose(impl, head_dim, q.dtype)
  if kind not in ("mosaic_gpu", "triton", "triton_interpret"):
    return None
  # The Triton forward on every GPU: the Mosaic one needs 128-row query
  # tiles, more than a decoding step's queries.
  config = triton.heuristic_config(head_dim, q.dtype)
  block_q, block_k = config.fwd.block_q, config.fwd.block_k
  seq = q.shape[1]
  q_len = -(-seq // block_q) * block_q
  kv_len = -(-k.shape[1] // block_k) * block_k
  q, k_start, k_end = _pad_to(q, q_len), _pad_to(k_start, q_len), _pad_to(k_end, q_len)
  k, v = _pad_to(k, kv_len), _pad_to(v, kv_len)
  scale = head_dim ** -0.5 if scale is None else scale
  out = triton.attention_forward(q, k, v, k_start, k_end, scale=scale, config=config,
                                 interpret=kind == "triton_interpret")
  return out[:, :seq]
