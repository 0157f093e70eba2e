"""Sizes derived from the `model` section (not stored in the config)."""
from __future__ import annotations

import math

import ml_collections


def mlp_dim(model: ml_collections.ConfigDict) -> int:
  """Hidden width of the SwiGLU MLP: model.mlp_dim, or Llama's 8/3 * dim rounded up
  to a multiple of 256 (of 8 below dim 256)."""
  if model.mlp_dim:
    return model.mlp_dim
  hidden = int(2 * 4 * model.dim / 3)
  return 256 * math.ceil(hidden / 256) if model.dim >= 256 else 8 * math.ceil(hidden / 8)


def patches_per_image(model: ml_collections.ConfigDict) -> int:
  """Transformer positions one image's latent patches take (BOI/EOI not counted)."""
  return (model.latent_size // model.patch_size) ** 2
