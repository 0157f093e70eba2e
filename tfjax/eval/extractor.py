"""User-supplied feature extractors, loaded from `jax.export` files.

No weights are downloaded. A user who has, say, Inception-v3 or CLIP weights
wraps the feature function in JAX and serialises it once:

  exported = jax.export.export(jax.jit(features))(
      jax.ShapeDtypeStruct((batch, 299, 299, 3), jnp.float32))
  open("inception.jax_export", "wb").write(exported.serialize())

The file holds the computation and its weights, so it runs here on any
backend it was exported for (`platforms=` at export time) without the model's
code. Inputs are padded to the exported batch size.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def load(path: str) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[int, ...]]:
  """(batched feature function, input shape of one example) from a serialized file."""
  try:
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001 - any parse failure means the wrong file
    raise ValueError(f"{path}: not a jax.export serialized function ({type(e).__name__}: {e})")
  aval = exported.in_avals[0]
  batch, example = aval.shape[0], tuple(aval.shape[1:])

  def run(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, aval.dtype)
    outs = []
    for i in range(0, len(x), batch):
      chunk = x[i:i + batch]
      pad = batch - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      outs.append(np.asarray(exported.call(jnp.asarray(chunk)))[:batch - pad])
    return np.concatenate(outs).astype(np.float64)

  return run, example


def resize_images(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """uint8/float [n, H, W, 3] -> float32 [n, h, w, 3] in [0, 255] (bilinear)."""
  h, w = shape[:2]
  x = jnp.asarray(images, jnp.float32)
  if x.shape[1:3] != (h, w):
    x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear")
  return np.asarray(x)
