"""Orbax checkpointing: async saves, last-K plus best retention, safe restore.

A checkpoint step directory holds three items:
  state   the TrainState (params, optimizer state, step, run key, EMA), saved
          sharded and restorable onto any mesh (the restore target carries the
          new shardings);
  data    the Grain iterator state of every process (one JSON file each);
  config  the resolved config as JSON.
A checkpoint that fails to restore is reported, moved aside into
`<dir>/../checkpoints_damaged/`, and the previous one is used; when there is
none, `DamagedCheckpoints` stops the run naming the damaged step and the
choices (never a silent start from step 0).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import grain.checkpoint  # registers grain's CheckpointSave/Restore with Orbax
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from tfjax.errors import UserError, short_error

log = logging.getLogger(__name__)
DAMAGED_DIR = "checkpoints_damaged"


class DamagedCheckpoints(UserError):
  """Every checkpoint of a run failed to restore (moved aside) and none is left."""


class _IteratorSnapshot:
  """The iterator's state captured at save time.

  Saving is asynchronous and the real iterator keeps moving, so the state is
  read once, when `save` is called, and handed to Grain's handler frozen.
  Restore goes the other way: Grain's handler fills a snapshot, which the
  caller applies to its live iterator.
  """

  def __init__(self, state: bytes | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


def _iterator_state_bytes(iterator: Any) -> bytes:
  state = iterator.get_state()
  return state if isinstance(state, bytes) else json.dumps(state).encode()


def _apply_iterator_state(iterator: Any, state: bytes) -> None:
  """Grain DataLoader iterators take bytes; dataset iterators take the dict."""
  try:
    iterator.set_state(json.loads(state.decode()))
  except (ValueError, TypeError, AttributeError, KeyError):
    iterator.set_state(state)


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """Saves and restores training runs in `directory` (usually WORKDIR/checkpoints)."""

  def __init__(self, directory: str, train: ml_collections.ConfigDict, *, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = str(train.best_metric)
    policies = [ocp_policies.LatestN(n=max(int(train.keep_checkpoints), 1))]
    best_fn = None
    if self.best_metric:
      metric = self.best_metric
      best_fn = lambda m: m[metric]  # noqa: E731
      # reverse=True sorts descending, so the kept tail is the lowest loss.
      policies.append(ocp_policies.BestN(get_metric_fn=best_fn, reverse=True, n=1,
                                         keep_checkpoints_without_metrics=False))
    self._options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode="min", create=True)
    self.manager = self._open()
    self.damaged_dir = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data", "config"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, iterator: Any = None,
           config: ml_collections.ConfigDict | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (and the iterator position) at `step`.

    `metrics` (e.g. {"val_loss": ...}) rank the checkpoint for best-keeping;
    saves without the best metric are kept only while among the last K.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None and hasattr(iterator, "get_state"):
      items["data"] = grain.checkpoint.CheckpointSave(
          _IteratorSnapshot(_iterator_state_bytes(iterator)))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config_json(config))
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    if step in self.manager.all_steps():
      return False  # already saved (e.g. a final save right after a periodic one)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                             force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _restore_step(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    snapshot = _IteratorSnapshot()
    if iterator is not None and has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(snapshot)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if iterator is not None and has_data:
      _apply_iterator_state(iterator, snapshot.state)
    elif iterator is not None:
      log.warning("checkpoint %d has no data-iterator state; the data restarts from "
                  "its beginning", step)
    return restored["state"]

  def _quarantine(self, step: int) -> None:
    """Moves a damaged step out of the manager's directory so it is not
    retried and its step number can be saved again."""
    if jax.process_index() == 0:
      dest = os.path.join(self.damaged_dir, f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
      log.warning("moved damaged checkpoint %d to %s", step, dest)
    self.manager.close()
    self.manager = self._open()

  def restore(self, abstract_state: Any, iterator: Any = None,
              step: int | None = None) -> tuple[int, Any] | None:
    """(step, state) from the newest readable checkpoint, or None if there is none.

    Args:
      abstract_state: the target structure: ShapeDtypeStructs whose `sharding`
        says where each restored array goes (any mesh, any device count).
      iterator: the data iterator, set to the saved position in place.
      step: a specific step instead of the newest.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for s in steps:
      try:
        return s, self._restore_step(s, abstract_state, iterator)
      except Exception as e:  # noqa: BLE001 - any failure means unreadable; try older
        if step is not None:
          raise
        log.warning("checkpoint step %d in %s could not be restored (%s)%s", s,
                    self.directory, short_error(e),
                    "; falling back to the previous checkpoint" if s != steps[-1] else "")
        self._quarantine(s)
        damaged.append(s)
    if damaged:
      raise DamagedCheckpoints(
          f"checkpoint step{'s' if len(damaged) > 1 else ''} "
          f"{', '.join(map(str, damaged))} in {self.directory} could not be restored (moved to "
          f"{self.damaged_dir}/) and there is no older checkpoint to fall back to: put back "
          f"an older copy of the checkpoints, or pass --config.train.restart=true to start "
          f"over from step 0")
    return None

  def damaged_steps(self) -> list[str]:
    """What earlier restores moved aside (STEP-TIME names), oldest first."""
    if not os.path.isdir(self.damaged_dir):
      return []
    return sorted(os.listdir(self.damaged_dir))

  def saved_config(self, step: int | None = None) -> dict[str, Any] | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self.directory, str(step), "config", "metadata")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)
