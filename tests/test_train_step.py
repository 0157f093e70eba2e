"""The train step: sharded over 2x2x2 fake devices it equals the single-device step."""
import jax
import numpy as np
import pytest

from configs.tiny import get_config
from tfjax.batch import Batch, batch_spec
from tfjax.model import init_params
from tfjax.train import mesh as mesh_lib
from tfjax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from tfjax.train.state import create_train_state, state_shardings
from tfjax.train.step import jit_train_step, make_loss_fn
from tfjax.train.synthetic import synthetic_batch


def tiny_config():
  c = get_config()
  c.model.dim = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.vocab_size = 64
  c.model.time_embed_dim = 32
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.data.max_images_per_seq = 2
  c.train.num_steps = 10
  c.train.warmup_steps = 2
  c.train.ema_decay = 0.9
  return c


def run_steps(config, devices, n=2):
  """(losses, final params as numpy) after n steps on a mesh over `devices`."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  tx = make_optimizer(config.train)
  _, shardings = state_shardings(config, mesh, tx, init_params)
  state = create_train_state(config, mesh, tx, init_params)
  spec = batch_spec(config.data.batch_size, config.data.seq_len,
                    config.data.max_images_per_seq, (8, 8, 8))
  step = jit_train_step(make_loss_fn(config), tx, config.train, mesh, shardings, spec,
                        config.mesh)
  losses = []
  for i in range(n):
    local = synthetic_batch(config, i)
    sharding = mesh_lib.batch_sharding(mesh, config.mesh)
    batch = Batch.from_dict(mesh_lib.global_batch(local, sharding))
    with mesh_lib.activate(mesh, config.mesh):
      state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), metrics, state


@pytest.fixture(scope="module")
def single():
  c = tiny_config()
  return run_steps(c, jax.devices()[:1])


def test_eight_devices_present():
  assert len(jax.devices()) == 8


def test_sharded_step_matches_single_device(single):
  c = tiny_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  losses, params, _, state = run_steps(c, jax.devices())
  # The params really are spread over the mesh (not silently replicated).
  wq = state.params["transformer"]["layers"]["attention"]["wq"]
  assert len({s.device for s in wq.addressable_shards}) == 8
  assert wq.sharding.spec != jax.sharding.PartitionSpec()
  np.testing.assert_allclose(losses, single[0], rtol=1e-5)
  flat_a = jax.tree_util.tree_leaves(params)
  flat_b = jax.tree_util.tree_leaves(single[1])
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_metrics_reported(single):
  metrics = single[2]
  for k in ("loss", "loss_lm", "loss_diffusion", "grad_norm", "lr", "num_text_tokens",
            "num_images"):
    assert np.isfinite(float(metrics[k])), k
  assert float(metrics["lr"]) > 0


def test_grad_accumulation_scan_matches_full_batch():
  """With a loss that is a mean over rows and no randomness, accumulating over
  micro-batches gives the full-batch gradient; counts add up."""
  import jax.numpy as jnp
  from tfjax.train.step import loss_and_grad
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal((8,)), jnp.float32)}
  params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.1)}

  def loss_fn(p, b, key):
    del key
    err = b["x"] @ p["w"] + p["b"] - b["y"]
    return jnp.mean(err ** 2), {"loss_lm": jnp.mean(err ** 2), "num_text_tokens": 1.0 * len(err)}
  key = jax.random.key(0)
  l1, m1, g1 = loss_and_grad(params, batch, key, loss_fn=loss_fn, accum_steps=1)
  l4, m4, g4 = loss_and_grad(params, batch, key, loss_fn=loss_fn, accum_steps=4)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  np.testing.assert_allclose(m4["num_text_tokens"], 8.0)
  for a, b in zip(jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_and_decay_mask():
  c = tiny_config().train
  c.num_steps, c.warmup_steps, c.learning_rate, c.end_learning_rate = 100, 10, 1e-3, 1e-5
  sched = learning_rate_schedule(c)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-4)
  params = {"layers": {"attention_norm": {"scale": np.ones((2, 4))},
                       "mlp": {"w_up": np.ones((2, 4, 8))}}, "bias": np.ones(3)}
  mask = decay_mask(params)
  assert mask["layers"]["mlp"]["w_up"] and not mask["layers"]["attention_norm"]["scale"]
  assert not mask["bias"]
