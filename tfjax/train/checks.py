"""Start-up checks of the train and mesh sections, naming the key to fix.

Complements `tfjax.config.validate` (which checks the model and data) with
what only the trainer knows: the device count and the optimizer's needs.
"""
from __future__ import annotations

import ml_collections

from tfjax.config import ConfigError
from tfjax.train.mesh import mesh_shape, rules


def _require(cond: bool, key: str, why: str) -> None:
  if not cond:
    raise ConfigError(f"config key {key}: {why}")


def apply_device_microbatch(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Sets train.grad_accum_steps from train.device_microbatch (rows per device
  per forward/backward), so one global batch fits any number of devices."""
  t = config.train
  rows = int(t.get("device_microbatch", 0))
  if rows <= 0:
    return
  shape = mesh_shape(config.mesh, num_devices)
  per_step = rows * shape[0] * shape[1]
  _require(config.data.batch_size % per_step == 0, "train.device_microbatch",
           f"data.batch_size={config.data.batch_size} is not a multiple of {rows} rows x "
           f"{shape[0] * shape[1]} data-parallel devices")
  t.grad_accum_steps = max(1, config.data.batch_size // per_step)


def validate_train(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks config.train and config.mesh for `num_devices`; returns the mesh shape."""
  t = config.train
  _require(t.num_steps >= 0, "train.num_steps", f"must be >= 0, got {t.num_steps}")
  _require(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
  _require(t.end_learning_rate >= 0, "train.end_learning_rate", "must be >= 0")
  _require(t.log_every > 0, "train.log_every", f"must be > 0, got {t.log_every}")
  for key in ("checkpoint_every", "eval_every", "sample_every"):
    _require(t[key] >= 0, f"train.{key}", f"must be >= 0 (0 = never), got {t[key]}")
  _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
  _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
  _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
  _require(0.0 <= t.weight_decay, "train.weight_decay", "must be >= 0")
  _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
  _require(t.eval_batches >= 1 or not t.eval_every, "train.eval_batches", "must be >= 1")
  rules(config.mesh)
  shape = mesh_shape(config.mesh, num_devices)
  dp = shape[0] * shape[1]
  micro = config.data.batch_size // max(int(t.grad_accum_steps), 1)
  _require(config.data.batch_size % dp == 0, "data.batch_size",
           f"{config.data.batch_size} is not divisible by the data-parallel size {dp} "
           "(mesh.data * mesh.fsdp)")
  _require(micro % dp == 0, "train.grad_accum_steps",
           f"micro-batches of {micro} rows do not divide over the data-parallel size {dp}")
  m = config.model
  _require(m.num_kv_heads % shape[2] == 0 or m.num_heads % shape[2] == 0, "mesh.tensor",
           f"{shape[2]}-way tensor parallelism does not divide model.num_heads={m.num_heads}")
  return shape
