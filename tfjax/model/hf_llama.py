"""Read a Hugging Face Llama checkpoint as Transfusion transformer weights.

`train.init_from=hf_llama:DIR` names a directory as `save_pretrained` writes
it: `config.json`, `model.safetensors` (or shards listed by
`model.safetensors.index.json`) and a sentencepiece `tokenizer.model`.
Reading needs neither torch nor transformers.

Layouts. HF linear weights are [out, in]; tfjax's are [in, ...]. HF's q/k
projections are stored permuted for `rotate_half`, which rotates the pair
(x[i], x[i + d/2]) by frequency i: the pairing of `tfjax.model.layers.apply_rope`,
with the same frequencies, so q/k need no permutation (the parity test checks).
Token ids: tfjax's vocabulary puts its special ids (PAD BOS EOS BOI EOI) in
front of the sentencepiece ids (`tfjax.data.tokenizer`), so HF row i becomes
row i + offset; BOS/EOS take HF's <s>/</s> rows, and the rows HF has no
counterpart for (PAD, BOI, EOI, any padding) the mean of HF's rows.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Callable, Iterator

import ml_collections
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy for safetensors' reader
import numpy as np
from safetensors import safe_open

from tfjax.config import BOS_ID, ConfigError, EOS_ID, mlp_dim

PREFIX = "hf_llama:"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"

# Per-layer tfjax parameter -> (HF tensor under model.layers.{i}., conversion).
# `conv(w, c)` gets the HF tensor and the tfjax model config.
_LAYER: dict[str, tuple[str, Callable[[np.ndarray, Any], np.ndarray]]] = {
    "attention/wq": ("self_attn.q_proj.weight", lambda w, c: _heads_in(w, c.num_heads)),
    "attention/wk": ("self_attn.k_proj.weight", lambda w, c: _heads_in(w, c.num_kv_heads)),
    "attention/wv": ("self_attn.v_proj.weight", lambda w, c: _heads_in(w, c.num_kv_heads)),
    "attention/wo": ("self_attn.o_proj.weight",
                     lambda w, c: w.T.reshape(c.num_heads, -1, w.shape[0])),
    "attention_norm/scale": ("input_layernorm.weight", lambda w, c: w),
    "mlp_norm/scale": ("post_attention_layernorm.weight", lambda w, c: w),
    "mlp/w_gate": ("mlp.gate_proj.weight", lambda w, c: w.T),
    "mlp/w_up": ("mlp.up_proj.weight", lambda w, c: w.T),
    "mlp/wo": ("mlp.down_proj.weight", lambda w, c: w.T),
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size")
# HF tensors that carry nothing to load (old checkpoints saved RoPE's table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_dir(init_from: str) -> str | None:
  """DIR of `hf_llama:DIR`, else None (another kind of init_from)."""
  if not init_from.startswith(PREFIX):
    return None
  path = init_from[len(PREFIX):]
  if not path:
    raise ConfigError(f"config key train.init_from: {init_from!r} names no directory "
                      f"(hf_llama:DIR)")
  return path


def tokenizer_file(init_from: str) -> str | None:
  """The sentencepiece model of an `hf_llama:DIR` init_from, else None."""
  path = checkpoint_dir(init_from)
  return None if path is None else os.path.join(path, TOKENIZER_FILE)


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"config key train.init_from: {path} has no {CONFIG_FILE} "
                            f"(expected a Hugging Face Llama directory)")
  with open(file) as f:
    return json.load(f)


def _rope(hf: dict[str, Any]) -> tuple[float, Any]:
  """(theta, scaling) from either layout: transformers 5's `rope_parameters`
  or the older top-level `rope_theta` / `rope_scaling`."""
  params = hf.get("rope_parameters") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", "default")
  scaling = hf.get("rope_scaling") or (None if kind == "default" else params)
  return float(theta), scaling


def expected_model(hf: dict[str, Any], offset: int) -> dict[str, Any]:
  """The tfjax `model.*` values an HF config implies, with the HF key each comes from."""
  heads = int(hf["num_attention_heads"])
  return {
      "dim": (int(hf["hidden_size"]), "hidden_size"),
      "num_layers": (int(hf["num_hidden_layers"]), "num_hidden_layers"),
      "num_heads": (heads, "num_attention_heads"),
      "num_kv_heads": (int(hf.get("num_key_value_heads") or heads), "num_key_value_heads"),
      "mlp_dim": (int(hf["intermediate_size"]), "intermediate_size"),
      "vocab_size": (int(hf["vocab_size"]) + offset, "vocab_size"),
      "norm_eps": (float(hf.get("rms_norm_eps", 1e-6)), "rms_norm_eps"),
      "rope_theta": (_rope(hf)[0], "rope_parameters.rope_theta" if "rope_parameters" in hf
                     else "rope_theta"),
      "tie_embeddings": (bool(hf.get("tie_word_embeddings", False)), "tie_word_embeddings"),
  }


def check_config(model: ml_collections.ConfigDict, hf: dict[str, Any], source: str,
                 offset: int) -> None:
  """Raises ConfigError naming the tfjax key and the HF key of the first mismatch.

  model.vocab_size may exceed HF's vocab_size + offset (extra rows start as
  the mean row); everything else must equal the checkpoint's architecture.
  """
  where = f"{source}/{CONFIG_FILE}"

  def refuse(hf_key: str, why: str) -> ConfigError:
    return ConfigError(f"config key train.init_from: {where} key {hf_key!r} {why}")

  for key in _REQUIRED:
    if key not in hf:
      raise refuse(key, "is missing")
  if hf.get("model_type", "llama") != "llama":
    raise refuse("model_type", f"is {hf.get('model_type')!r}; only 'llama' can be loaded")
  for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf.get(key, want) != want:
      raise refuse(key, f"is {hf.get(key)!r}; tfjax's Llama block needs {want!r}")
  scaling = _rope(hf)[1]
  if scaling:
    raise refuse("rope_scaling", f"is {scaling!r}; only plain RoPE (rope_type 'default') "
                 f"is implemented")
  head_dim = hf.get("head_dim")
  heads = int(hf["num_attention_heads"])
  if head_dim is not None and int(head_dim) * heads != int(hf["hidden_size"]):
    raise refuse("head_dim", f"= {head_dim} with {heads} heads is not hidden_size="
                 f"{hf['hidden_size']}; tfjax's head_dim is model.dim / model.num_heads")
  for name, want in (("norm_placement", "pre"), ("qk_norm", False)):
    if model.get(name, want) != want:
      raise ConfigError(f"config key model.{name}={model.get(name)!r}: a Llama checkpoint "
                        f"({where}) needs {want!r}")
  for key, (value, hf_key) in expected_model(hf, offset).items():
    have = mlp_dim(model) if key == "mlp_dim" else model[key]
    if key == "vocab_size":
      if have < value:
        raise ConfigError(f"config key model.{key}={have} is below {where} key {hf_key!r}="
                          f"{value - offset} + {offset} special ids: set "
                          f"--config.model.{key}={value}")
    elif not (math.isclose(float(have), value, rel_tol=1e-6) if isinstance(value, float)
              else have == value):
      raise ConfigError(f"config key model.{key}={have} does not match {where} key "
                        f"{hf_key!r}={value}: set --config.model.{key}={value}")


def tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> the .safetensors file holding it (index, else every file)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  out = {}
  for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
    with safe_open(file, framework="numpy") as f:
      out.update({name: file for name in f.keys()})
  if not out:
    raise FileNotFoundError(f"config key train.init_from: {path} has no *.safetensors "
                            f"weights (nor {INDEX_FILE})")
  return out


class TensorReader:
  """Reads HF tensors one at a time (memory-mapped files), remembering which were read."""

  def __init__(self, path: str):
    self.path = path
    self.files = tensor_files(path)
    self.read: set[str] = set()
    self._open: dict[str, Any] = {}

  def has(self, name: str) -> bool:
    return name in self.files

  def __call__(self, name: str) -> np.ndarray:
    """float32 copy of tensor `name`."""
    if name not in self.files:
      raise ValueError(f"config key train.init_from: {self.path} has no tensor {name!r}")
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safe_open(file, framework="numpy")
    self.read.add(name)
    return self._open[file].get_tensor(name).astype(np.float32)

  def skip(self, name: str) -> None:
    """Counts `name` as read without reading it (a redundant copy)."""
    self.read.add(name)

  def unread(self) -> list[str]:
    return sorted(n for n in self.files
                  if n not in self.read and not n.endswith(_IGNORED_SUFFIXES))


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """HF [heads * head_dim, dim] -> tfjax [dim, heads, head_dim]."""
  return w.T.reshape(w.shape[1], heads, -1)


def vocab_rows(hf_rows: np.ndarray, vocab_size: int, offset: int, bos: int, eos: int
               ) -> np.ndarray:
  """HF per-token rows [V, dim] -> tfjax rows [vocab_size, dim] (module docstring)."""
  out = np.empty((vocab_size, hf_rows.shape[1]), np.float32)
  out[:] = hf_rows.mean(axis=0)
  out[offset:offset + hf_rows.shape[0]] = hf_rows
  out[BOS_ID], out[EOS_ID] = hf_rows[bos], hf_rows[eos]
  return out


def _token_id(hf: dict[str, Any], key: str, default: int) -> int:
  """A special token id of config.json (Llama 3 lists several EOS ids: the first)."""
  value = hf.get(key)
  if isinstance(value, list):
    value = value[0] if value else None
  return default if value is None else int(value)


def _hf_name(read: TensorReader, name: str) -> str:
  """LlamaForCausalLM saves `model.X`; a bare LlamaModel saves `X`."""
  return name if read.has(name) or not read.has(name[len("model."):]) else name[len("model."):]


def converted(model: ml_collections.ConfigDict, hf: dict[str, Any], offset: int,
              param_names: list[str], read: TensorReader) -> Iterator[tuple[str, np.ndarray]]:
  """(tfjax parameter path, float32 value) for every text-side parameter.

  Yields one parameter at a time (a scanned stack is built layer by layer),
  so at most one tfjax parameter is in host memory. Image-side parameters
  (patch encoder/decoder, timestep embedding) are not yielded: they keep
  their fresh init. Raises ValueError naming train.init_from when a tensor is
  missing or has another shape, or when the checkpoint holds tensors nothing
  read.
  """
  bos, eos = _token_id(hf, "bos_token_id", 1), _token_id(hf, "eos_token_id", 2)

  def layer(i: int, local: str) -> np.ndarray:
    hf_key, conv = _LAYER[local]
    name = _hf_name(read, f"model.layers.{i}.{hf_key}")
    w = read(name)
    try:
      return conv(w, model)
    except ValueError as e:  # a reshape that does not fit: config.json and weights disagree
      raise ValueError(f"config key train.init_from: {read.path} tensor {name} has shape "
                       f"{w.shape}, which does not fit the configured model's {local}") from e

  for name in param_names:
    if name == "embedding":
      rows = read(_hf_name(read, "model.embed_tokens.weight"))
      yield name, vocab_rows(rows, model.vocab_size, offset, bos, eos)
    elif name == "output":
      yield name, vocab_rows(read("lm_head.weight"), model.vocab_size, offset, bos, eos).T
    elif name == "final_norm/scale":
      yield name, read(_hf_name(read, "model.norm.weight"))
    elif name.startswith("transformer/layers/"):  # scanned: [layers, ...]
      local = name[len("transformer/layers/"):]
      first = layer(0, local)
      stack = np.empty((model.num_layers,) + first.shape, np.float32)
      stack[0] = first
      for i in range(1, model.num_layers):
        stack[i] = layer(i, local)
      yield name, stack
    elif name.startswith("transformer/layer_"):
      index, local = name[len("transformer/layer_"):].split("/", 1)
      yield name, layer(int(index), local)
  if model.tie_embeddings and read.has("lm_head.weight"):
    read.skip("lm_head.weight")  # a tied copy of the embeddings some exports write out
  unread = read.unread()
  if unread:
    raise ValueError(f"config key train.init_from: {read.path} holds tensors tfjax has no place "
                     f"for: {unread[:5]} ({len(unread)} in all)")
