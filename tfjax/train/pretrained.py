"""`train.init_from`: parameters a fine-tuning run starts from.

An export directory (written by `tfjax.export.export`) holds `tfjax_export.json`
and `params.safetensors` with '/'-joined parameter paths. Training code must
not import the export module (it sits above training), so the few lines that
read the parameter file live here. Checkpoint directories are read by the
loop's own Orbax restore. `hf_llama:DIR` names a Hugging Face Llama
checkpoint (tfjax.model.hf_llama): its weights replace the text side of a
fresh init, and its sentencepiece model is the run's tokenizer.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from tfjax.model import hf_llama

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
  treedef = jax.tree_util.tree_structure(abstract_params)
  return jax.tree_util.tree_unflatten(  # `want` keeps the flattening order
      treedef, [_place(np.asarray(have[key]), spec) for key, spec in want.items()])


def _place(value: np.ndarray, like: Any) -> Any:
  """`value` in `like`'s dtype and sharding; each process reads only its shards' slices."""
  sharding = getattr(like, "sharding", None)
  if sharding is None:
    return value.astype(like.dtype)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index].astype(like.dtype))


def resolve_hf_llama(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any], int] | None:
  """For `train.init_from=hf_llama:DIR`: checks config.model against DIR/config.json
  and points an empty data.tokenizer at DIR/tokenizer.model (in place).

  Returns (DIR, the HF config, the tokenizer's id offset), or None for
  another init_from. Raises ConfigError naming the tfjax and HF keys of a
  mismatch; FileNotFoundError naming data.tokenizer when there is no
  sentencepiece model.
  """
  from tfjax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  path = hf_llama.checkpoint_dir(config.train.init_from)
  if path is None:
    return None
  hf = hf_llama.read_config(path)
  if not config.data.tokenizer:  # recorded, so the run's saved config names it
    config.data.tokenizer = hf_llama.tokenizer_file(config.train.init_from)
  tokenizer = Tokenizer.load(config.data.tokenizer)
  hf_llama.check_config(config.model, hf, path, tokenizer.offset)
  if tokenizer.sp_vocab_size > int(hf["vocab_size"]):
    raise ValueError(f"config key data.tokenizer: {config.data.tokenizer} has "
                     f"{tokenizer.sp_vocab_size} pieces but {path}/{hf_llama.CONFIG_FILE} "
                     f"vocab_size is {hf['vocab_size']}: not this checkpoint's tokenizer")
  return path, hf, tokenizer.offset


def load_hf_llama_params(config: ml_collections.ConfigDict, params: Any) -> Any:
  """`params` (a fresh init, with shardings) with every text-side leaf (embeddings,
  attention, MLP, norms, output head) read from the `hf_llama:DIR` checkpoint.

  The image side keeps its fresh init. Tensors are read one at a time and
  placed straight onto their leaf's sharding.
  """
  path, hf, offset = resolve_hf_llama(config)
  flat = _flat(params)
  reader = hf_llama.TensorReader(path)
  for key, value in hf_llama.converted(config.model, hf, offset, list(flat), reader):
    like = flat[key]
    if value.shape != tuple(like.shape):
      raise ValueError(f"config key train.init_from: {path} gives parameter {key} shape "
                       f"{value.shape}, the configured model needs {tuple(like.shape)}")
    flat[key] = _place(value, like)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(flat.values()))
