"""`train.init_from=hf_llama:DIR`: a Hugging Face Llama checkpoint as a run's start.

DIR is a directory as `save_pretrained` writes it (tfjax.model.hf_llama): its
weights replace the text side of a fresh init, and its sentencepiece model is
the run's tokenizer. Exports and other runs' checkpoints are read by
tfjax.checkpoints.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from tfjax.checkpoints import flatten, place
from tfjax.data.tokenizer import Tokenizer
from tfjax.model import hf_llama


def resolve_hf_llama(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any], int] | None:
  """For `train.init_from=hf_llama:DIR`: checks config.model against DIR/config.json
  and points an empty data.tokenizer at DIR/tokenizer.model (in place).

  Returns (DIR, the HF config, the tokenizer's id offset), or None for
  another init_from. Raises ConfigError naming the tfjax and HF keys of a
  mismatch; FileNotFoundError naming data.tokenizer when there is no
  sentencepiece model.
  """
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
  flat = flatten(params)
  reader = hf_llama.TensorReader(path)
  for key, value in hf_llama.converted(config.model, hf, offset, list(flat), reader):
    like = flat[key]
    if value.shape != tuple(like.shape):
      raise ValueError(f"config key train.init_from: {path} gives parameter {key} shape "
                       f"{value.shape}, the configured model needs {tuple(like.shape)}")
    flat[key] = place(value, like)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(flat.values()))
