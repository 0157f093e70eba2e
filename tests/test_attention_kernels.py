"""Block map and Pallas attention kernels against the XLA reference (CPU, interpret)."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from kernel_layouts import random_layout  # noqa: E402

from tfjax.ops.attention import attention as ops_attention  # noqa: E402
from tfjax.ops.attention import xla_attention  # noqa: E402
from tfjax.ops.kernels import block_map as bmap  # noqa: E402
from tfjax.ops.kernels import dispatch  # noqa: E402
from tfjax.ops.mask import key_ranges, transfusion_mask  # noqa: E402

# METHOD.md: float32 far under 1e-3, bf16 operands 1e-3..1e-2 (vs a float32
# reference on the same bf16 inputs).
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1.5e-2}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "NaN/inf in kernel result"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("seed", range(4))
def test_key_ranges_and_tile_states_match_mask(seed):
  rng = np.random.default_rng(seed)
  seg, img = random_layout(rng, 3, 512)
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  mask = transfusion_mask(seg, img)
  ks, ke = key_ranges(seg, img)
  kpos = jnp.arange(512)[None, None, :]
  assert bool(jnp.all(mask == ((kpos >= ks[..., None]) & (kpos < ke[..., None]))))
  for bq, bk in ((64, 64), (128, 64), (64, 128)):
    got = bmap.tile_states(ks, ke, bq, bk)
    want = bmap.dense_tile_states(mask, bq, bk)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_coarsened_tile_states_match_the_mask():
  """States of tile groups from the fine states (what the Mosaic schedules
  share) equal the dense mask's at the coarse tiling; padding adds empty."""
  rng = np.random.default_rng(5)
  seg, img = random_layout(rng, 2, 768)
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = key_ranges(seg, img)
  mask = transfusion_mask(seg, img)
  fine = bmap.tile_states(ks, ke, 64, 64)
  for fq, fk in ((2, 2), (3, 1), (1, 3), (2, 1)):
    got = bmap.coarsen(fine, fq, fk)
    want = bmap.dense_tile_states(mask, 64 * fq, 64 * fk)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  padded = np.asarray(bmap.pad_states(fine, 14, 15))
  assert padded.shape == (2, 14, 15)
  np.testing.assert_array_equal(padded[:, :12, :12], np.asarray(fine))
  assert np.all(padded[:, 12:] == bmap.EMPTY) and np.all(padded[:, :, 12:] == bmap.EMPTY)


def test_work_lists_are_the_nonempty_tiles():
  rng = np.random.default_rng(7)
  seg, img = random_layout(rng, 2, 512)
  ks, ke = key_ranges(jnp.asarray(seg), jnp.asarray(img))
  bm = bmap.block_map(ks, ke, 64, 128)
  states = np.asarray(bmap.tile_states(ks, ke, 64, 128))
  for wl, st in ((bm.q_blocks, states), (bm.kv_blocks, states.transpose(0, 2, 1))):
    blocks, full, counts = map(np.asarray, wl)
    for b in range(st.shape[0]):
      for i in range(st.shape[1]):
        n = counts[b, i]
        want = np.nonzero(st[b, i])[0]
        np.testing.assert_array_equal(blocks[b, i, :n], want)
        np.testing.assert_array_equal(full[b, i, :n], st[b, i, want] == bmap.FULL)
        assert np.all(blocks[b, i, n:] == (want[-1] if n else 0))
        assert np.all(full[b, i, n:] == 0)


@pytest.mark.parametrize("n_dkv,n_dq,order", [(2, 3, 1), (3, 3, 1), (2, 2, 1), (2, 3, 2),
                                              (3, 3, 2), (2, 2, 2)])
def test_ds_route_gives_every_visited_dq_tile_the_row_its_dkv_consumer_stored(
    n_dkv, n_dq, order):
  """dq_from_ds: every tile a dk/dv consumer computes gets its own row of the
  head's packed buffer, below the total, and each tile a dq consumer computes
  reads the row that the dk/dv consumer owning its key block stored for that
  query tile; in dq order an entry's consumers read adjacent rows."""
  from tfjax.ops.kernels import gpu_mosaic_bwd
  rng = np.random.default_rng(5)
  seg, img = random_layout(rng, 2, 512)
  ks, ke = key_ranges(jnp.asarray(seg), jnp.asarray(img))
  sched = gpu_mosaic_bwd.bwd_schedule(ks, ke, gpu_mosaic_bwd.MosaicBwdConfig(
      fuse_dq=0, consumers_dkv=n_dkv, consumers_dq=n_dq, dq_delta=0, dq_from_ds=order))
  kv_blocks, kv_counts, kv_states = map(np.asarray, sched.dkv[:3])
  q_blocks, q_counts, q_states = map(np.asarray, sched.dq)
  rows, dq_rows, total = (np.asarray(x) for x in sched.ds_route)
  stored = {}  # row -> (batch, query tile, key block)
  for b in range(2):
    for j in range(kv_counts.shape[1]):
      for t in range(kv_counts[b, j]):
        for w in range(n_dkv):
          if kv_states[b, j, w, t] != bmap.EMPTY:
            r = int(rows[b, j, w, t])
            assert 0 <= r < total and r not in stored
            stored[r] = (b, int(kv_blocks[b, j, t]), j * n_dkv + w)
  packed = (q_counts * n_dq).sum() if order == 2 else (kv_counts * n_dkv).sum()
  assert int(total) == packed
  visited = 0
  for b in range(2):
    for qi in range(q_counts.shape[1]):
      for t in range(q_counts[b, qi]):
        if order == 2:
          np.testing.assert_array_equal(dq_rows[b, qi, t], dq_rows[b, qi, t, 0] + np.arange(n_dq))
        for c in range(n_dq):
          if q_states[b, qi, c, t] != bmap.EMPTY:
            assert stored[int(dq_rows[b, qi, t, c])] == (b, qi * n_dq + c, int(q_blocks[b, qi, t]))
            visited += 1
  assert visited == len(stored) > 20  # 45 of the 64 tiles of this layout


@pytest.mark.parametrize("consumers", [2, 3])
def test_mosaic_schedules_give_each_warpgroup_its_own_tiles(consumers):
  """The Mosaic kernels' schedules (CTAs of `consumers` warpgroups, 64 rows or
  keys each; with 3 the last CTA reaches past 512): every CTA lists exactly
  the key (query) blocks its warpgroups meet, and each warpgroup's state per
  entry is the dense mask's state of its own tile; beyond the sequence, empty."""
  from tfjax.ops.kernels import gpu_mosaic, gpu_mosaic_bwd
  rng = np.random.default_rng(11)
  seg, img = random_layout(rng, 2, 512)
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = key_ranges(seg, img)
  cta = consumers * 64
  padded = -(-512 // cta) * cta
  mask = np.zeros((2, padded, padded), bool)
  mask[:, :512, :512] = np.asarray(transfusion_mask(seg, img))
  fwd = gpu_mosaic.fwd_schedule(
      ks, ke, gpu_mosaic.MosaicFwdConfig(64, 64, consumers=consumers))
  bwd = gpu_mosaic_bwd.bwd_schedule(ks, ke, gpu_mosaic_bwd.MosaicBwdConfig(
      fuse_dq=0, consumers_dkv=consumers, consumers_dq=consumers))
  by_rows = np.asarray(bmap.dense_tile_states(jnp.asarray(mask[:, :, :512]), 64, 64))
  by_keys = np.asarray(bmap.dense_tile_states(jnp.asarray(mask[:, :512]), 64, 64))
  by_keys = by_keys.transpose(0, 2, 1)
  for (blocks, counts, states), dense in (
      (fwd[1:], by_rows), (bwd.dq, by_rows), (bwd.dkv[:3], by_keys)):
    blocks, counts, states = map(np.asarray, (blocks, counts, states))
    assert blocks.shape[1] == padded // cta and states.shape[2] == consumers
    for b in range(2):
      for c in range(blocks.shape[1]):
        own = dense[b, c * consumers:(c + 1) * consumers]   # [consumers, other side]
        n = counts[b, c]
        np.testing.assert_array_equal(blocks[b, c, :n], np.nonzero(own.any(axis=0))[0])
        np.testing.assert_array_equal(states[b, c, :, :n], own[:, blocks[b, c, :n]])
  assert np.all(by_rows[:, 512 // 64:] == bmap.EMPTY)


def _inputs(rng, batch, seq, hq, hkv, d, dtype):
  draw = lambda h: jnp.asarray(rng.standard_normal((batch, seq, h, d)), dtype)
  return draw(hq), draw(hkv), draw(hkv), draw(hq)


CASES = [
    # (dtype, head_dim, q_heads, kv_heads, seq, block_q, block_k)
    (jnp.float32, 64, 4, 2, 256, 64, 64),     # GQA
    (jnp.bfloat16, 128, 2, 2, 256, 64, 128),  # unequal blocks
    (jnp.bfloat16, 64, 4, 1, 320, 128, 64),   # multi-query; padded to 384
    (jnp.float32, 128, 2, 1, 200, None, None),  # default blocks, padded
]


@pytest.mark.parametrize("dtype,d,hq,hkv,seq,block_q,block_k", CASES)
def test_pallas_matches_reference(dtype, d, hq, hkv, seq, block_q, block_k):
  rng = np.random.default_rng(seq + d + hq)
  seg, img = random_layout(rng, 2, seq)
  seg[1, -70:] = 0  # a long padding tail: whole padding blocks
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = _inputs(rng, 2, seq, hq, hkv, d, dtype)
  mask = transfusion_mask(seg, img)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: xla_attention(f32(q), f32(k), f32(v), mask)
  ker = lambda q, k, v: dispatch.attention(q, k, v, seg, img, impl="pallas",
                                           block_q=block_q, block_k=block_k)
  with jax.default_matmul_precision("highest"):  # no tf32 in the reference
    o_ref, vjp_ref = jax.vjp(ref, q, k, v)
    grads_ref = vjp_ref(f32(do))
  o, grads = jax.jit(lambda q, k, v, do: (lambda r: (r[0], r[1](do)))(jax.vjp(ker, q, k, v)))(q, k, v, do)
  assert o.dtype == dtype and o.shape == q.shape
  tol = TOL[dtype]
  assert _rel(o, o_ref) < tol
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert g.dtype == dtype, name
    assert _rel(g, gr) < tol, f"d{name}: {_rel(g, gr)}"
  # Padding rows give exact zeros and no gradient through them.
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o, np.float32)[pad] == 0)


def test_auto_is_xla_on_cpu_and_unsupported_head_dim_falls_back():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch rule")
  assert dispatch.choose("auto", 128) == "xla"
  assert dispatch.choose("pallas", 128) == "gpu_interpret"
  assert dispatch.choose("pallas", 96) == "xla"
  rng = np.random.default_rng(3)
  seg, img = map(jnp.asarray, random_layout(rng, 1, 64))
  q, k, v, _ = _inputs(rng, 1, 64, 2, 2, 96, jnp.float32)
  out = ops_attention(q, k, v, seg, img, impl="pallas")
  want = xla_attention(q, k, v, transfusion_mask(seg, img))
  assert _rel(out, want) < 1e-6


def test_under_scan_and_remat():
  """The kernel inside a scanned, rematerialised layer stack, differentiated."""
  rng = np.random.default_rng(5)
  seg, img = map(jnp.asarray, random_layout(rng, 1, 128, pad_max=10))
  q, k, v, _ = _inputs(rng, 1, 128, 2, 2, 64, jnp.float32)

  def loss(x, impl):
    @jax.checkpoint
    def layer(h, _):
      return h + ops_attention(h, h, h, seg, img, impl=impl), None
    h, _ = jax.lax.scan(layer, x, None, length=2)
    return jnp.sum(h ** 2)

  g = jax.jit(jax.grad(lambda x: loss(x, "pallas")))(q)
  with jax.default_matmul_precision("highest"):
    g_ref = jax.grad(lambda x: loss(x, "xla"))(q)
  assert _rel(g, g_ref) < 1e-4


def test_plan_shared_by_layers_matches_per_call_plans():
  """One AttentionPlan built outside a scanned layer stack gives the values and
  gradients of each call building its own; a plan for another length is refused."""
  rng = np.random.default_rng(11)
  seg, img = map(jnp.asarray, random_layout(rng, 2, 100, pad_max=10))
  q, _, _, _ = _inputs(rng, 2, 100, 2, 2, 64, jnp.float32)
  plan = dispatch.plan(seg, img, head_dim=64, dtype=jnp.float32, impl="pallas")
  assert plan.kind == dispatch.choose("pallas", 64) and plan.seq == 100
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
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, sys.argv[1])
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
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", _SHARDED, os.path.dirname(__file__)],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_tpu_kernel_interpret_matches_reference():
  """The Mosaic kernel's numerics in Pallas TPU interpret mode (CPU)."""
  if jax.default_backend() != "cpu":
    pytest.skip("TPU interpret mode is checked on the CPU backend")
  from tfjax.ops.kernels import tpu
  rng = np.random.default_rng(11)
  seg, img = random_layout(rng, 1, 256)
  seg[0, -50:] = 0
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = key_ranges(seg, img)
  q, k, v, do = _inputs(rng, 1, 256, 2, 1, 128, jnp.float32)
  mask = transfusion_mask(seg, img)
  ker = lambda q, k, v: tpu.attention(q, k, v, ks, ke, scale=128 ** -0.5,
                                      config=tpu.TpuConfig(128, 128), interpret=True)
  o, vjp = jax.vjp(ker, q, k, v)
  grads = vjp(do)
  with jax.default_matmul_precision("highest"):
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    grads_ref = vjp_ref(do)
  assert _rel(o, o_ref) < 1e-4
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert _rel(g, gr) < 1e-4, name


_TPU_AOT = r"""
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tfjax.ops.kernels import tpu
from tfjax.ops.mask import key_ranges
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
mesh = Mesh(np.array(topo.devices), ("data",))
B, L, H, D = 4, 8192, 8, 128
def local(q, k, v, do, seg, img):
  ks, ke = key_ranges(seg, img)
  o, vjp = jax.vjp(lambda q, k, v: tpu.attention(q, k, v, ks, ke, scale=D ** -0.5), q, k, v)
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
  from tfjax.ops.kernels import gpu
  rng = np.random.default_rng(13)
  seg, img = map(jnp.asarray, random_layout(rng, 1, 128, pad_max=10))
  q, k, v, do = _inputs(rng, 1, 128, 2, 2, 64, jnp.float32)
  cfg = gpu.GpuConfig(fwd=(64, 128, 4, 3), dkv=(128, 64, 4, 3), dq=(64, 32, 4, 3),
                      skip_full_mask=False)
  ker = lambda q, k, v: dispatch.attention(q, k, v, seg, img, impl="pallas", config=cfg)
  o, vjp = jax.vjp(ker, q, k, v)
  grads = vjp(do)
  with jax.default_matmul_precision("highest"):
    mask = transfusion_mask(seg, img)
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    grads_ref = vjp_ref(do)
  assert _rel(o, o_ref) < 1e-4
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert _rel(g, gr) < 1e-4, name


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
]


@pytest.mark.parametrize("d,hq,hkv,seq,mcfg", MOSAIC_CASES[:2] + MOSAIC_CASES[-4:])
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
  assert _rel(o, o_ref) < TOL[jnp.bfloat16]
  for name, g, gr in zip("qkv", grads, grads_ref):
    assert g.dtype == jnp.bfloat16, name
    assert _rel(g, gr) < TOL[jnp.bfloat16], f"d{name}: {_rel(g, gr)}"
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o, np.float32)[pad] == 0)
  assert np.all(np.asarray(grads[0], np.float32)[pad] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,seq,mcfg", MOSAIC_CASES)
def test_mosaic_forward_matches_reference(d, hq, hkv, seq, mcfg):
  """Mosaic GPU forward (+ Triton backward) against the float32 XLA reference."""
  import dataclasses
  from tfjax.ops.kernels import gpu
  if not dispatch._gpu_is_hopper():
    pytest.skip("the Mosaic GPU forward needs a Hopper GPU")
  rng = np.random.default_rng(seq + d + hq + mcfg[1])
  seg, img = random_layout(rng, 2, seq)
  seg[1, -90:] = 0  # a padding tail longer than a block
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = _inputs(rng, 2, seq, hq, hkv, d, jnp.bfloat16)
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
    # dq from the dk/dv kernel's dS^T tiles, packed in dk/dv order (1) and in
    # dq order (2): the head-dim-128 default's kernels (GQA), and three
    # consumers each at 64 past the end
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 2, 0, 240, 2, 0, 0, 1, 0, 2, 3, 1)),
    (64, 2, 2, 320, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 3, 3, 1)),
    # buffers of 30% and 60% of the dq lists' padded tiles, this layout
    # listing 53%: the cond takes the recomputing fallback, then the packed tiles
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 2, 1, 30)),
    (64, 2, 2, 384, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 2, 2, 2, 60)),
    (128, 4, 2, 384, (64, 64, 2, 64, 64, 3, 0, 240, 2, 0, 0, 1, 0, 2, 3, 2)),
    (64, 2, 2, 320, (64, 64, 2, 64, 64, 2, 0, 232, 1, 0, 0, 1, 0, 3, 3, 2)),
]


@pytest.mark.parametrize("d,hq,hkv,seq,bcfg",
                         [MOSAIC_BWD_CASES[i] for i in (0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                                         16, 17)])
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
  import dataclasses
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
  import dataclasses
  from tfjax.ops.kernels import gpu
  if not dispatch._gpu_is_hopper():
    pytest.skip("the Mosaic GPU kernels need a Hopper GPU")
  rng = np.random.default_rng(seq + d + hq + 1)
  seg, img = random_layout(rng, 2, seq)
  seg[1, -90:] = 0
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  q, k, v, do = _inputs(rng, 2, seq, hq, hkv, d, jnp.bfloat16)
  cfg = dataclasses.replace(gpu.GpuConfig.for_head_dim(d), mosaic_fwd=(64, 128, 2, 1),
                            mosaic_bwd=bcfg)
  _check_bf16_kernel_against_reference(cfg, seg, img, q, k, v, do)


def test_mosaic_backward_config_choice(monkeypatch):
  """Two kernels at both head dims, three consumer warpgroups at 64 (the H100
  measurements), dq from stored dS^T at 128 (H200), TFJAX_MOSAIC_BWD overrides it, and the sequence multiple
  follows the kernels that run."""
  from tfjax.ops.kernels import gpu, gpu_mosaic, gpu_mosaic_bwd
  monkeypatch.delenv("TFJAX_MOSAIC_BWD", raising=False)
  c64 = gpu_mosaic_bwd.MosaicBwdConfig(*dispatch.mosaic_backward_config(64))
  c128 = gpu_mosaic_bwd.MosaicBwdConfig(*dispatch.mosaic_backward_config(128))
  assert c64.fuse_dq == c128.fuse_dq == 0 and c64.dq_delta == 1 and c64.dq_from_ds == 0
  # At 128, dq from the stored dS^T tiles, with the recomputing fallback (M35).
  assert c128.dq_from_ds == 1 and 0 < c128.ds_capacity < 100 and c128.stages_dq == 3
  assert (c64.consumers_dkv, c64.consumers_dq) == (3, 3)
  assert (c128.consumers_dkv, c128.consumers_dq) == (2, 3) and c128.sdp_group == 2
  assert c128.consumer_regs == 240
  assert c64.skip_empty == c128.skip_empty == 1
  assert gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(64)).consumers == 3
  assert gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(128)).consumers == 2
  assert gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(128, 4096)).consumers == 2
  long_128 = gpu_mosaic.MosaicFwdConfig(*gpu.GpuConfig.mosaic_default(128, 8192))
  assert (long_128.consumers, long_128.block_k) == (3, 64)
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
    gpu_mosaic.warpgroup_registers(2, 248)
  assert gpu_mosaic.warpgroup_registers(2, 240) == (240, 24)
  monkeypatch.setenv("TFJAX_MOSAIC_BWD", "64,64,2,64,64,2,0")
  assert gpu_mosaic_bwd.MosaicBwdConfig(*dispatch.mosaic_backward_config(64)).fuse_dq == 0
  monkeypatch.setenv("TFJAX_MOSAIC_BWD", "0")
  assert dispatch.mosaic_backward_config(64) is None
