"""The attention kernels' shard_map splits q/k/v as config.mesh.rules split the
model's q (8 fake CPU devices, a 2x2x2 data x fsdp x tensor mesh)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from kernel_layouts import random_layout

from tfjax.config import default_config
from tfjax.ops.attention import attention_plan
from tfjax.ops.kernels import api
from tfjax.ops.kernels.reference import xla_attention
from tfjax.ops.mask import transfusion_mask
from tfjax.train import mesh as mesh_lib

B, L, H, D = 4, 64, 4, 64


def _mesh_config(rules=None):
  c = default_config().mesh
  c.data, c.fsdp, c.tensor = 2, 2, 2
  if rules is not None:
    c.rules = rules
  return c


def _inputs():
  rng = np.random.default_rng(0)
  seg, img = map(jnp.asarray, random_layout(rng, B, L))
  q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
  return q, seg, img


def _shard_map_specs(fn, *args):
  """(in_specs, out_specs) of every shard_map in fn's jaxpr, in order."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [(e.params["in_specs"], e.params["out_specs"])
          for e in jaxpr.eqns if e.primitive.name == "shard_map"]


def test_default_rules_split_batch_over_data_fsdp_and_heads_over_tensor():
  assert api.rule_axes() == (("data", "fsdp"), ("tensor",))  # no rules active
  config = _mesh_config()
  q, seg, img = _inputs()
  with mesh_lib.activate(mesh_lib.make_mesh(config), config):
    assert api.rule_axes() == (("data", "fsdp"), ("tensor",))
    [(in_specs, out_specs)] = _shard_map_specs(
        lambda q, s, i: api.attention(q, q, q, s, i, impl="pallas"), q, seg, img)
  qkv = P(("data", "fsdp"), None, "tensor", None)
  assert in_specs == (qkv, qkv, qkv, P(("data", "fsdp"), None), P(("data", "fsdp"), None))
  assert out_specs == (qkv,)


def test_custom_rules_move_the_kernels_split():
  """Batch over (data, tensor), heads over fsdp: the plan and the kernel's
  shard_map follow, and the values are the reference's."""
  rules = tuple((name, {"batch": ("data", "tensor"), "heads": "fsdp",
                        "kv_heads": "fsdp"}.get(name, axes))
                for name, axes in default_config().mesh.rules)
  config = _mesh_config(rules)
  q, seg, img = _inputs()

  def loss(q, s, i):
    plan = attention_plan(s, i, head_dim=D, dtype=q.dtype, impl="pallas")
    return jnp.sum(api.attention(q, q, q, s, i, impl="pallas", plan=plan) ** 2)

  with mesh_lib.activate(mesh_lib.make_mesh(config), config):
    assert api.rule_axes() == (("data", "tensor"), ("fsdp",))
    (plan_in, plan_out), (attn_in, attn_out) = _shard_map_specs(loss, q, seg, img)
    value = jax.jit(loss)(q, seg, img)
  batch, qkv = P(("data", "tensor"), None), P(("data", "tensor"), None, "fsdp", None)
  assert plan_in == (batch, batch)
  assert set(jax.tree.leaves(plan_out, is_leaf=lambda x: isinstance(x, P))) == {
      P(("data", "tensor"))}
  assert attn_in[:3] == (qkv,) * 3 and attn_out == (qkv,)
  want = jnp.sum(xla_attention(q, q, q, transfusion_mask(seg, img), D ** -0.5) ** 2)
  assert abs(float(value) - float(want)) / float(want) < 1e-5


def test_rules_splitting_the_sequence_are_refused():
  rules = tuple((name, "tensor" if name == "seq" else axes)
                for name, axes in default_config().mesh.rules if name != "heads")
  config = _mesh_config(rules)
  q, seg, img = _inputs()
  with mesh_lib.activate(mesh_lib.make_mesh(config), config):
    with pytest.raises(ValueError, match="config key mesh.rules: 'seq'"):
      jax.make_jaxpr(lambda q, s, i: api.attention(q, q, q, s, i, impl="pallas"))(q, seg, img)


def test_batch_sharding_follows_the_batch_rule():
  """The trainer's input batches are split as the rules place "batch"."""
  config = _mesh_config()
  mesh = mesh_lib.make_mesh(config)
  assert mesh_lib.batch_sharding(mesh, config).spec == P(("data", "fsdp"))
  config.rules = tuple((n, ("data", "tensor") if n == "batch" else a) for n, a in config.rules)
  assert mesh_lib.batch_sharding(mesh, config).spec == P(("data", "tensor"))
