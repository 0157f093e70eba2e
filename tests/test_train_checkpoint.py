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


def test_every_checkpoint_damaged_stops_unless_restart(interrupted, tmp_path):
  """No silent start from step 0; train.restart starts over and keeps the history."""
  import shutil
  from tfjax.train.checkpoint import DamagedCheckpoints
  from tfjax.train.metrics import read_history
  src, _ = interrupted
  d = str(tmp_path / "run")
  shutil.copytree(src, d)
  steps = sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit())
  for s in steps:
    for root, _, files in os.walk(os.path.join(d, "checkpoints", str(s), "state")):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  before = read_history(os.path.join(d, "metrics.jsonl"))
  with pytest.raises(DamagedCheckpoints, match=rf"steps? .*{steps[-1]}.*train\.restart=true"):
    train(tiny_config(), d, devices=one_device())
  with pytest.raises(DamagedCheckpoints, match="checkpoints_damaged"):  # and on the next run
    train(tiny_config(), d, devices=one_device())
  assert read_history(os.path.join(d, "metrics.jsonl")) == before

  def stop_at_2(step, _):
    if step == 2:
      raise Killed()
  c = tiny_config()
  c.train.restart = True
  with pytest.raises(Killed):
    train(c, d, devices=one_device(), on_step=stop_at_2)
  history = read_history(os.path.join(d, "metrics.jsonl"))
  assert history[:len(before)] == before  # nothing cut
  assert {"step": 0, "event": "restart"}.items() <= history[len(before)].items()
  assert [r["step"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))] == [1, 2]


def test_stored_config_is_relative_to_the_workdir(interrupted):
  import json
  d, _ = interrupted
  assert json.load(open(os.path.join(d, "config.json")))["data"]["dir"] == "data"
  ckpt = Checkpointer(os.path.join(d, "checkpoints"), tiny_config().train)
  assert ckpt.saved_config()["data"]["dir"] == "data"
  ckpt.close()


def test_sigterm_ends_the_main_job_before_later_stages(tmp_path, monkeypatch):
  """SIGTERM in the train stage: saved, then Preempted; samples and report never run."""
  from tfjax.jobs import transfusion
  from tfjax.train import loop
  from tfjax.train.preemption import Preempted
  real_train = loop.train

  def term_at_3(step, _):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(loop, "train", lambda config, workdir, **kw: real_train(
      config, workdir, **{**kw, "devices": one_device(), "on_step": term_at_3}))
  c = tiny_config()
  c.train.sample_every = 0
  d = str(tmp_path / "run")
  with pytest.raises(Preempted, match="step 3"):
    transfusion.run(c, d, stages=("train", "samples", "report"))
  assert os.path.isdir(os.path.join(d, "checkpoints", "3"))
  assert not os.path.exists(os.path.join(d, "report.md"))
  assert not os.path.exists(os.path.join(d, "samples"))


def test_signal_outside_training_stops_at_once():
  from tfjax.train.preemption import Preempted, StopSignals
  with pytest.raises(Preempted, match="SIGINT"):
    with StopSignals(defer=False):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(10 ** 7):  # the handler raises at the next bytecode
        pass
  with StopSignals(defer=True) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
  assert stop.requested and stop.signum == signal.SIGTERM


def test_deferred_metrics_are_logged_at_their_own_steps(tmp_path):
  """Log steps' metrics are fetched one step late (the device never waits for
  them) yet land under their own step, with the window's throughput, and the
  last step is always logged."""
  c = tiny_config(num_steps=9)
  c.train.log_every = 4
  c.train.checkpoint_every = 0
  result = train(c, str(tmp_path), devices=one_device())
  records = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
  assert [r["step"] for r in records] == [4, 8, 9]
  assert all(r["tokens_per_s"] > 0 and r["step_time"] > 0 for r in records)
  assert result.last_metrics["step"] == 9
