"""The stage runner (tfjax/jobs/runner.py) and the checkpoint-layout readers
(tfjax/checkpoints.py), with stand-in stages: no model is trained here."""
import json
import os
import signal

import numpy as np
import pytest

from configs.tiny import get_config
from tfjax import checkpoints
from tfjax.jobs import chameleon, runner, sweep, transfusion
from tfjax.train.preemption import Preempted


def _job(tmp_path, stages):
  return runner.Job(config=get_config(), workdir=str(tmp_path), stages=tuple(stages),
                    vae_dir=str(tmp_path / "vae"), vae_workdir=str(tmp_path))


def _chain(ran, done=()):
  def stage(name):
    return runner.Stage(name, lambda job: ran.append(name) or f"{name} out",
                        done=(lambda job: True) if name in done else None)
  return (stage("a"), runner.Barrier("between"), stage("b"), stage("c"), stage("d"))


def test_runs_chosen_stages_in_chain_order_skipping_done_ones(tmp_path):
  ran = []
  out = runner.run_stages(_chain(ran, done=("c",)), _job(tmp_path, ("d", "c", "a")))
  assert ran == ["a", "d"]  # the chain's order, not the order asked; c is done
  assert out["a"] == "a out" and "c" not in out and "b" not in out
  with open(tmp_path / runner.SECONDS_FILE) as f:
    assert sorted(json.load(f)) == ["a", "d"]
  ran.clear()  # a later run keeps the seconds of the stages it did not run
  out = runner.run_stages(_chain(ran), _job(tmp_path, ("b",)))
  assert ran == ["b"] and sorted(out["seconds"]) == ["a", "b", "d"]


def test_unknown_stage_is_refused_naming_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match=r"unknown stages \['vq'\].*'latents'"):
    runner.run_stages(transfusion.CHAIN, _job(tmp_path, ("data", "vq")))
  with pytest.raises(ValueError, match="unknown stages"):
    transfusion.run(get_config(), str(tmp_path), stages=("samples", "eval"))


def test_signal_in_a_stage_stops_the_job_before_the_next(tmp_path):
  ran = []
  chain = (runner.Stage("a", lambda job: os.kill(os.getpid(), signal.SIGTERM)),
           runner.Stage("b", lambda job: ran.append("b")))
  with pytest.raises(Preempted, match="SIGTERM"):
    runner.run_stages(chain, _job(tmp_path, ("a", "b")))
  assert not ran and not os.path.exists(tmp_path / runner.SECONDS_FILE)


def test_the_three_jobs_share_their_stages():
  assert transfusion.STAGES == ("data", "vae", "latents", "train", "samples", "report")
  assert chameleon.STAGES == ("data", "vq", "tokens", "train", "eval")
  by_name = {s.name: s.run for s in transfusion.CHAIN if isinstance(s, runner.Stage)}
  for chain in (chameleon.CHAIN, sweep.TRANSFUSION_CHAIN, sweep.CHAMELEON_CHAIN):
    for s in chain:
      if isinstance(s, runner.Stage) and s.name in by_name:
        assert s.run is by_name[s.name], s.name


def test_latest_step_counts_only_finished_steps(tmp_path):
  ckpt = tmp_path / checkpoints.CHECKPOINTS_DIR
  assert checkpoints.latest_step(str(tmp_path)) is None
  os.makedirs(ckpt / "5" / checkpoints.STATE_ITEM)
  os.makedirs(ckpt / "7")                    # no state/: not finished
  os.makedirs(ckpt / "9.orbax-checkpoint-tmp-1" / checkpoints.STATE_ITEM)
  assert checkpoints.latest_step(str(tmp_path)) == 5
  assert checkpoints.checkpoint_dir(str(tmp_path)) == str(ckpt)
  assert checkpoints.checkpoint_dir(str(ckpt)) == str(ckpt)  # a checkpoints dir itself
  with pytest.raises(FileNotFoundError, match="training workdir"):
    checkpoints.checkpoint_dir(str(tmp_path / "elsewhere"))


def test_flat_names_round_trip_and_mismatches_name_the_parameter():
  tree = {"a": {"b": np.zeros((2, 3)), "c": np.ones(4)}, "d": np.zeros(())}
  flat = checkpoints.flatten(tree)
  assert list(flat) == ["a/b", "a/c", "d"]
  assert checkpoints.flatten(checkpoints.unflatten(flat)).keys() == flat.keys()
  with pytest.raises(ValueError, match=r"here: parameter a/c has shape \(4,\).*\(5,\)"):
    checkpoints.check_params(flat, {**flat, "a/c": np.ones(5)}, "here")
  with pytest.raises(ValueError, match=r"here: parameters \['e'\]"):
    checkpoints.check_params(flat, {**flat, "e": np.ones(1)}, "here")
