"""`train.init_from` an export: parameters a fine-tuning run starts from.

An export directory (written by `tfjax.export.export`) holds `tfjax_export.json`
and `params.safetensors` with '/'-joined parameter paths. Training code must
not import the export module (it sits above training), so the few lines that
read the parameter file live here. Checkpoint directories are read by the
loop's own Orbax restore.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

EXPORT_META = "tfjax_export.json"
EXPORT_PARAMS = "params.safetensors"


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_META))


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(p, "key", p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_export_params(path: str, abstract_params: Any) -> Any:
  """The export's parameters laid out like `abstract_params`.

  Args:
    path: an export directory.
    abstract_params: ShapeDtypeStructs (with shardings) of the run's params.
  Returns:
    A tree like `abstract_params` of arrays in its dtypes (an export saved
    in bfloat16 is cast back to the float32 master weights) and shardings.
  Raises:
    ValueError naming train.init_from when a parameter is missing or has
    another shape (the export's model differs from config.model).
  """
  import safetensors.flax  # pylint: disable=g-import-not-at-top
  file = os.path.join(path, EXPORT_PARAMS)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"config key train.init_from: export {path} has no {EXPORT_PARAMS}")
  have = safetensors.flax.load_file(file)
  want = _flat(abstract_params)
  missing = sorted(set(want) - set(have))
  if missing:
    raise ValueError(f"config key train.init_from: export {path} lacks parameters {missing[:5]} "
                     f"of the configured model (check the model section matches the export's "
                     f"config.json)")
  for key, spec in want.items():
    if tuple(have[key].shape) != tuple(spec.shape):
      raise ValueError(f"config key train.init_from: export {path} parameter {key} has shape "
                       f"{tuple(have[key].shape)}, the configured model needs {tuple(spec.shape)}")
  leaves, treedef = jax.tree_util.tree_flatten(abstract_params)
  keys = list(want)  # same flattening order as `leaves`
  out = []
  for key, spec in zip(keys, leaves):
    value = np.asarray(have[key].astype(spec.dtype))
    sharding = getattr(spec, "sharding", None)
    out.append(jax.device_put(value, sharding) if sharding is not None else value)
  return jax.tree_util.tree_unflatten(treedef, out)
