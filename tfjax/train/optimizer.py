"""AdamW with the paper's schedule: linear warm-up, cosine decay, clipping.

Transfusion trains with AdamW (b1=0.9, b2=0.95, eps=1e-8), peak learning rate
3e-4 warmed up over 4000 steps and decayed by a cosine to 1.5e-5, weight decay
0.1 and gradient clipping at norm 1.0; every one of these is a `train.*` key.
Norm scales and biases are not decayed.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from tfjax.config import ConfigError

# Leaves whose path contains one of these names are excluded from weight decay.
_NO_DECAY_NAMES = ("bias", "scale", "norm")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to train.learning_rate, cosine to train.end_learning_rate."""
  if train.learning_rate <= 0:
    raise ConfigError(f"config key train.learning_rate: must be > 0, got {train.learning_rate}")
  total = max(int(train.num_steps), 1)
  warmup = min(int(train.warmup_steps), total)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=train.end_learning_rate)


def _path_names(path: tuple[Any, ...]) -> list[str]:
  names = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    names.append(str(name).lower())
  return names


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: matrices and embeddings, not norms/biases.

  With scanned layers a norm scale is 2-D ([layers, dim]), so the rule is by
  name, not rank.
  """
  def decays(path, leaf):
    names = _path_names(path)
    if any(n in part for part in names for n in _NO_DECAY_NAMES):
      return False
    return getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The full update: clip -> AdamW(schedule) with the weight decay mask.

  Gradient accumulation is done inside the train step (a scan over
  micro-batches), so this optimizer always sees the accumulated gradient.
  """
  if train.grad_clip < 0:
    raise ConfigError(f"config key train.grad_clip: must be >= 0 (0 disables), got {train.grad_clip}")
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(
      learning_rate=learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
      weight_decay=train.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
