"""Pallas attention kernels (Triton, Mosaic TPU) against the XLA reference on CPU
in interpret mode; the TPU kernels' ahead-of-time v5p compile; the kernel
choice, plan sharing and sharding around them (kernels/api.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import TRITON_CASES
from kernel_layouts import TOL, random_inputs, random_layout, rel_error

from tfjax.ops.attention import attention as ops_attention
from tfjax.ops.attention import xla_attention
from tfjax.ops.kernels import api
from tfjax.ops.mask import key_ranges, transfusion_mask


@pytest.mark.parametrize("dtype,d,hq,hkv,seq,block_q,block_k", TRITON_CASES)
def test_pallas_matches_reference(dtype, d, hq, hkv, seq, block_q, block_k):
  rng = np.random.default_rng(seq + d + hq)
  seg, img = random_layout(rng, 2, seq)
  seg[1, -70:] = 0  # a long padding tail: whole padding blocks
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = random_inputs(rng, 2, seq, hq, hkv, d, dtype)
  mask = transfusion_mask(seg, img)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: xla_attention(f32(q), f32(k), f32(v), mask)
  ker = lambda q, k, v: api.attention(q, k, v, seg, img, impl="pallas",
                                           block_q=block_q, block_k=block_k)
  with jax.default_matmul_precision("highest"):  # no tf32 in the reference
    o_ref, vjp_ref = jax.vjp(ref, q, k, v)
    grads_ref = vjp_ref(f32(do))
  o, grads = jax.jit(lambda q, k, v, do: (lambda r: (r[0], r[1](do)))(jax.vjp(ker, q, k, v)))(q, k, v, do)
  assert o.dtype == dtype and o.shape == q.shape
  tol = TOL[dtype]
  assert rel_error(o, o_ref) < tol
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert g.dtype == dtype, name
    assert rel_error(g, gr) < tol, f"d{name}: {rel_error(g, gr)}"
  # Padding rows give exact zeros and no gradient through them.
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o, np.float32)[pad] == 0)


def test_auto_is_xla_on_cpu_and_unsupported_head_dim_falls_back():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch rule")
  assert api.choose("auto", 128) == "xla"
  assert api.choose("pallas", 128) == "triton_interpret"
  assert api.choose("pallas", 96) == "xla"
  rng = np.random.default_rng(3)
  seg, img = map(jnp.asarray, random_layout(rng, 1, 64))
  q, k, v, _ = random_inputs(rng, 1, 64, 2, 2, 96, jnp.float32)
  out = ops_attention(q, k, v, seg, img, impl="pallas")
  want = xla_attention(q, k, v, transfusion_mask(seg, img))
  assert rel_error(out, want) < 1e-6


def test_under_scan_and_remat():
  """The kernel inside a scanned, rematerialised layer stack, differentiated."""
  rng = np.random.default_rng(5)
  seg, img = map(jnp.asarray, random_layout(rng, 1, 128, pad_max=10))
  q, k, v, _ = random_inputs(rng, 1, 128, 2, 2, 64, jnp.float32)

  def loss(x, impl):
    @jax.checkpoint
    def layer(h, _):
      return h + ops_attention(h, h, h, seg, img, impl=impl), None
    h, _ = jax.lax.scan(layer, x, None, length=2)
    return jnp.sum(h ** 2)

  g = jax.jit(jax.grad(lambda x: loss(x, "pallas")))(q)
  with jax.default_matmul_precision("highest"):
    g_ref = jax.grad(lambda x: loss(x, "xla"))(q)
  assert rel_error(g, g_ref) < 1e-4


def test_plan_shared_by_layers_matches_per_call_plans():
  """One AttentionPlan built outside a scanned layer stack gives the values and
  gradients of each call building its own; a plan for another length is refused."""
  rng = np.random.default_rng(11)
  seg, img = map(jnp.asarray, random_layout(rng, 2, 100, pad_max=10))
  q, _, _, _ = random_inputs(rng, 2, 100, 2, 2, 64, jnp.float32)
  plan = api.plan(seg, img, head_dim=64, dtype=jnp.float32, impl="pallas")
  assert plan.kind == api.choose("pallas", 64, jnp.float32) and plan.seq == 100
  assert plan.k_start.shape == (2, 128)  # padded to the tiles' multiple, 32

  def loss(x, plan):
    def layer(h, _):
      return h + ops_attention(h, h, h, seg, img, impl="pallas", plan=plan), None
    return jnp.sum(jax.lax.scan(layer, x, None, length=2)[0] ** 2)

  v_plan, g_plan = jax.jit(jax.value_and_grad(loss))(q, plan)
  v_own, g_own = jax.jit(jax.value_and_grad(lambda x: loss(x, None)))(q)
  assert float(v_plan) == float(v_own)
  np.testing.assert_array_equal(np.asarray(g_plan), np.asarray(g_own))
  with pytest.raises(ValueError, match="plan was built for sequence length 100"):
    ops_attention(q[:, :64], q[:, :64], q[:, :64], seg[:, :64], img[:, :64], impl="pallas",
                  plan=plan)
  from tfjax.ops import attention_plan
  assert attention_plan(seg, img, head_dim=64, impl="xla") is None


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from kernel_layouts import random_layout
from tfjax.ops.attention import attention
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
rng = np.random.default_rng(0)
seg, img = map(jnp.asarray, random_layout(rng, 4, 128))
q = jnp.asarray(rng.standard_normal((4, 128, 4, 64)), jnp.float32)
ref, g_ref = jax.value_and_grad(lambda q: jnp.sum(attention(q, q, q, seg, img, impl="xla") ** 2))(q)
# Explicit axes (jax.make_mesh's default) and Auto axes (what the trainer's Mesh has).
for types in ((AxisType.Explicit,) * 3, (AxisType.Auto,) * 3):
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=types)
  with jax.set_mesh(mesh):
    qs = jax.device_put(q, NamedSharding(mesh, P("data", None, "tensor", None)))
    ids = NamedSharding(mesh, P("data", None))
    f = jax.jit(jax.value_and_grad(
        lambda q, s, i: jnp.sum(attention(q, q, q, s, i, impl="pallas") ** 2)))
    args = (qs, jax.device_put(seg, ids), jax.device_put(img, ids))
    val, g = f(*args)
    txt = f.lower(*args).compile().as_text()
  assert abs(float(val) - float(ref)) / abs(float(ref)) < 1e-5, (types, val, ref)
  assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) < 1e-4, types
  assert "all-gather" not in txt, f"the batch was gathered around the kernel ({types})"
# Explicit mesh, ids left replicated: the wrapper reshards them to the batch split.
mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"))
with jax.set_mesh(mesh):
  qs = jax.device_put(q, NamedSharding(mesh, P("data", None, None, None)))
  val = jax.jit(lambda q: jnp.sum(attention(q, q, q, seg, img, impl="pallas") ** 2))(qs)
assert abs(float(val) - float(ref)) / abs(float(ref)) < 1e-5
# A plan built under the mesh (per device, on its batch slice) and shared.
from tfjax.ops import attention_plan
for types in ((AxisType.Explicit,) * 3, (AxisType.Auto,) * 3):
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=types)
  with jax.set_mesh(mesh):
    qs = jax.device_put(q, NamedSharding(mesh, P("data", None, "tensor", None)))
    ids = NamedSharding(mesh, P("data", None))
    def loss(q, s, i):
      plan = attention_plan(s, i, head_dim=64, dtype=q.dtype, impl="pallas")
      h = attention(q, q, q, s, i, impl="pallas", plan=plan)
      return jnp.sum(attention(h, h, h, s, i, impl="pallas", plan=plan) ** 2)
    f = jax.jit(jax.value_and_grad(loss))
    args = (qs, jax.device_put(seg, ids), jax.device_put(img, ids))
    val, g = f(*args)
    txt = f.lower(*args).compile().as_text()
  h = attention(q, q, q, seg, img, impl="xla")
  want = jnp.sum(attention(h, h, h, seg, img, impl="xla") ** 2)
  assert abs(float(val) - float(want)) / abs(float(want)) < 1e-5, (types, val, want)
  assert "all-gather" not in txt, f"the batch was gathered around the planned kernel ({types})"
  # Its launch orders index each device's slice: refused outside the mesh.
  with jax.set_mesh(mesh):
    plan = jax.jit(lambda s, i: attention_plan(s, i, head_dim=64, dtype=q.dtype,
                                               impl="pallas"))(*args[1:])
  try:
    attention(q, q, q, seg, img, impl="pallas", plan=plan)
    raise AssertionError("a mesh-built plan was accepted without the mesh")
  except ValueError as e:
    assert "built under a mesh" in str(e)
print("OK")
"""


def test_shard_map_over_batch_and_heads():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # kernel_layouts lives beside this file
  env["PYTHONPATH"] = os.pathsep.join([root, os.path.dirname(os.path.abspath(__file__)),
                                       env.get("PYTHONPATH", "")])
  r = subprocess.run([sys.executable, "-c", _SHARDED],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_tpu_kernel_interpret_matches_reference():
  """The Mosaic kernel's numerics in Pallas TPU interpret mode (CPU)."""
  if jax.default_backend() != "cpu":
    pytest.skip("TPU interpret mode is checked on the CPU backend")
  from tfjax.ops.kernels import mosaic_tpu
  rng = np.random.default_rng(11)
  seg, img = random_layout(rng, 1, 256)
  seg[0, -50:] = 0
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = key_ranges(seg, img)
  q, k, v, do = random_inputs(rng, 1, 256, 2, 1, 128, jnp.float32)
  mask = transfusion_mask(seg, img)
  ker = lambda q, k, v: mosaic_tpu.attention(q, k, v, ks, ke, scale=128 ** -0.5,
                                             config=mosaic_tpu.MosaicTpuConfig(128, 128),
                                             interpret=True)
  o, vjp = jax.vjp(ker, q, k, v)
  grads = vjp(do)
  with jax.default_matmul_precision("highest"):
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    grads_ref = vjp_ref(do)
  assert rel_error(o, o_ref) < 1e-4
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert rel_error(g, gr) < 1e-4, name


_TPU_AOT = r"""
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tfjax.ops.kernels import mosaic_tpu
from tfjax.ops.mask import key_ranges
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
mesh = Mesh(np.array(topo.devices), ("data",))
B, L, H, D = 4, 8192, 8, 128
def local(q, k, v, do, seg, img):
  ks, ke = key_ranges(seg, img)
  o, vjp = jax.vjp(lambda q, k, v: mosaic_tpu.attention(q, k, v, ks, ke, scale=D ** -0.5),
                   q, k, v)
  return (o,) + vjp(do)
x, ids = P("data", None, None, None), P("data", None)
fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(x, x, x, x, ids, ids),
                           out_specs=(x, x, x, x), check_vma=False))
sds = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
q = sds((B, L, H, D), jnp.bfloat16, x)
kv = sds((B, L, H // 2, D), jnp.bfloat16, x)
seg = sds((B, L), jnp.int32, ids)
txt = fn.trace(q, kv, kv, q, seg, seg).lower().compile().as_text()
assert txt.count("tpu_custom_call") == 3, "expected the fwd, dk/dv and dq Mosaic kernels"
print("OK")
"""


def test_tpu_kernel_compiles_for_v5p_ahead_of_time():
  """Mosaic lowering + libtpu compile, fwd and bwd, L=8192, head dim 128, GQA."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]==0.10.2')")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # libtpu takes a process lock; another process holding it must not block us.
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_PLATFORMS", None)
  r = subprocess.run([sys.executable, "-c", _TPU_AOT], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_gpu_kernel_mixed_tiles_and_folded_mask():
  """Per-kernel tile sizes differ and the full-tile branch is folded away."""
  from tfjax.ops.kernels.triton import Tiles, TritonConfig
  rng = np.random.default_rng(13)
  seg, img = map(jnp.asarray, random_layout(rng, 1, 128, pad_max=10))
  q, k, v, do = random_inputs(rng, 1, 128, 2, 2, 64, jnp.float32)
  cfg = TritonConfig(fwd=Tiles(64, 128), dkv=Tiles(128, 64), dq=Tiles(64, 32),
                     skip_full_mask=False)
  ker = lambda q, k, v: api.attention(q, k, v, seg, img, impl="pallas", config=cfg)
  o, vjp = jax.vjp(ker, q, k, v)
  grads = vjp(do)
  with jax.default_matmul_precision("highest"):
    mask = transfusion_mask(seg, img)
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    grads_ref = vjp_ref(do)
  assert rel_error(o, o_ref) < 1e-4
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert rel_error(g, gr) < 1e-4, name
