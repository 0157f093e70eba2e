"""Checkpoints: exact resume after a kill, SIGTERM, resharding, damaged fallback."""
import os
import signal

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from tfjax.config import ConfigError, validate
from tfjax.model import init_params
from tfjax.train import mesh as mesh_lib
from tfjax.train.checkpoint import Checkpointer
from tfjax.train.checks import validate_train
from tfjax.train.loop import train
from tfjax.train.metrics import read_jsonl
from tfjax.train.optimizer import make_optimizer
from tfjax.train.state import create_train_state, state_shardings


def tiny_config(num_steps=12):
  c = get_config()
  c.model.dim = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.vocab_size = 64
  c.model.time_embed_dim = 32
  c.data.seq_len = 48
  c.data.batch_size = 4
  c.data.max_images_per_seq = 2
  c.train.synthetic_data = True
  c.train.num_steps = num_steps
  c.train.warmup_steps = 3
  c.train.log_every = 1
  c.train.checkpoint_every = 5
  c.train.eval_every = 0
  c.train.ema_decay = 0.99
  c.train.best_metric = ""
  return c


def one_device():
  return jax.devices()[:1]


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


class Killed(Exception):
  pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run."""
  d = str(tmp_path_factory.mktemp("reference"))
  train(tiny_config(), d, devices=one_device())
  return losses(d)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """Killed at step 7 (last checkpoint: 5), resumed, then SIGTERM at step 11."""
  d = str(tmp_path_factory.mktemp("interrupted"))

  def kill_at_7(step, _):
    if step == 7:
      raise Killed()
  with pytest.raises(Killed):
    train(tiny_config(), d, devices=one_device(), on_step=kill_at_7)

  def term_at_11(step, _):
    if step == 11:
      os.kill(os.getpid(), signal.SIGTERM)
  result = train(tiny_config(), d, devices=one_device(), on_step=term_at_11)
  return d, result


def test_kill_and_resume_reproduces_next_five_losses(reference, interrupted):
  d, _ = interrupted
  resumed = losses(d)
  assert len(reference) == 12
  for step in range(6, 11):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_sigterm_leaves_restorable_checkpoint(interrupted):
  d, result = interrupted
  assert result.preempted and result.step == 11
  c = tiny_config()
  mesh = mesh_lib.make_mesh(c.mesh, one_device())
  abstract, _ = state_shardings(c, mesh, make_optimizer(c.train), init_params)
  ckpt = Checkpointer(os.path.join(d, "checkpoints"), c.train)
  assert ckpt.latest_step() == 11
  step, state = ckpt.restore(abstract)
  ckpt.close()
  assert step == 11 and int(state.step) == 11
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(result.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_damaged_latest_falls_back(interrupted, tmp_path):
  import shutil
  src, _ = interrupted
  d = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(src, "checkpoints"), d)
  c = tiny_config()
  ckpt = Checkpointer(d, c.train)
  steps = ckpt.all_steps()
  assert steps[-1] == 11 and len(steps) >= 2
  for root, _, files in os.walk(os.path.join(d, "11", "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  mesh = mesh_lib.make_mesh(c.mesh, one_device())
  abstract, _ = state_shardings(c, mesh, make_optimizer(c.train), init_params)
  step, state = ckpt.restore(abstract)
  assert step == steps[-2] and int(state.step) == steps[-2]
  assert 11 not in ckpt.all_steps()
  assert os.listdir(os.path.join(str(tmp_path), "checkpoints_damaged"))
  ckpt.close()


def test_reshard_restore_8_to_1_to_8(tmp_path):
  c = tiny_config()
  tx = make_optimizer(c.train)
  c8 = tiny_config()
  c8.mesh.data, c8.mesh.fsdp, c8.mesh.tensor = 2, 2, 2
  mesh8 = mesh_lib.make_mesh(c8.mesh)
  state8 = create_train_state(c8, mesh8, tx, init_params)
  ck = Checkpointer(str(tmp_path / "a"), c8.train)
  ck.save(1, state8, force=True)
  ck.close()
  mesh1 = mesh_lib.make_mesh(c.mesh, one_device())
  abstract1, _ = state_shardings(c, mesh1, tx, init_params)
  ck = Checkpointer(str(tmp_path / "a"), c.train)
  _, state1 = ck.restore(abstract1)
  ck.close()
  leaf1 = state1.params["transformer"]["layers"]["mlp"]["w_up"]
  assert len(leaf1.sharding.device_set) == 1
  ck = Checkpointer(str(tmp_path / "b"), c.train)
  ck.save(1, state1, force=True)
  ck.close()
  abstract8, _ = state_shardings(c8, mesh8, tx, init_params)
  ck = Checkpointer(str(tmp_path / "b"), c8.train)
  _, back = ck.restore(abstract8)
  ck.close()
  leaf8 = back.params["transformer"]["layers"]["mlp"]["w_up"]
  assert len(leaf8.sharding.device_set) == 8
  assert leaf8.sharding == state8.params["transformer"]["layers"]["mlp"]["w_up"].sharding
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state8)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("key,change", [
    ("mesh.tensor", lambda c: setattr(c.mesh, "tensor", 3)),
    ("mesh.data", lambda c: (setattr(c.mesh, "data", 3), setattr(c.mesh, "fsdp", 1))),
    ("train.grad_accum_steps", lambda c: setattr(c.train, "grad_accum_steps", 3)),
    ("train.learning_rate", lambda c: setattr(c.train, "learning_rate", 0.0)),
    ("train.log_every", lambda c: setattr(c.train, "log_every", 0)),
    ("mesh.rules", lambda c: setattr(c.mesh, "rules", (("embed", "model"),))),
    ("model.num_kv_heads", lambda c: setattr(c.model, "num_kv_heads", 3)),
    ("data.batch_size", lambda c: (setattr(c.mesh, "data", 8),)),
])
def test_config_errors_name_the_key(key, change):
  c = tiny_config()
  change(c)
  with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
    validate(c)
    validate_train(c, 8)
