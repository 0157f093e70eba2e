"""Reading a trained model back: the on-disk layouts, saved configs, parameters.

Two directories hold a trained model:
  a training workdir  WORKDIR/config.json and WORKDIR/checkpoints/STEP/ with the
                      Orbax items state, data, config (tfjax/train/checkpoint.py
                      writes them while training);
  an export           DIR/tfjax_export.json (format, source, step, dtype, EMA used),
                      config.json, params.safetensors ('/'-joined parameter paths),
                      tokenizer/, vae/ (tfjax/export.py writes it).
Every reader of either (the newest step, the saved config, the parameters with
the EMA when the run kept one) is here, so the main job, the sweeps,
`train.init_from`, tfjax-export and `load_pretrained` read them alike.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.flax

from tfjax.config import default_config
from tfjax.errors import disk_full, is_damaged_data, short_error
from tfjax.model import abstract_params as boxed_abstract_params
from tfjax.paths import Paths

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"     # WORKDIR/checkpoints/STEP/
STATE_ITEM = "state"                # STEP/state: the TrainState
CONFIG_ITEM = "config"              # STEP/config/metadata: the config as JSON
CONFIG_FILE = "config.json"         # WORKDIR/config.json and DIR/config.json
EXPORT_FORMAT = "tfjax-export"
EXPORT_META = "tfjax_export.json"
EXPORT_PARAMS = "params.safetensors"


# ---- parameter trees <-> '/'-joined names -----------------------------------
def flatten(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} in the tree's flattening order (the export's key names)."""
  return {"/".join(str(getattr(p, "key", p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """The nested dict of `flatten`'s names."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Unboxed ShapeDtypeStructs of config.model's parameters."""
  return nn.unbox(boxed_abstract_params(config.model))


def check_params(have: dict[str, Any], want: dict[str, Any], where: str) -> None:
  """Every parameter in `want` (flat names -> shapes) is in `have` with its shape.

  Raises ValueError starting with `where` (a path, or the config key that named it).
  """
  missing = sorted(set(want) - set(have))
  if missing:
    raise ValueError(f"{where}: parameters {missing[:5]} of the configured model are missing "
                     f"(check the model section matches the saved {CONFIG_FILE})")
  for key, spec in want.items():
    if tuple(have[key].shape) != tuple(spec.shape):
      raise ValueError(f"{where}: parameter {key} has shape {tuple(have[key].shape)}, the "
                       f"configured model needs {tuple(spec.shape)}")


def place(value: np.ndarray, like: Any) -> Any:
  """`value` in `like`'s dtype and sharding; each process reads only its shards' slices."""
  sharding = getattr(like, "sharding", None)
  if sharding is None:
    return value.astype(like.dtype)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index].astype(like.dtype))


# ---- configs ----------------------------------------------------------------
def config_from_json(d: dict[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from saved JSON, typed by `default_config()`.

  JSON turns tuples into lists; keys the schema holds as tuples get them back.
  Keys the schema does not know are kept as saved (newer configs load).
  """
  def merge(node: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    for key, value in values.items():
      if key in node and isinstance(node[key], ml_collections.ConfigDict):
        if not isinstance(value, dict):
          raise ValueError(f"saved config key {key}: expected a section, got {value!r}")
        merge(node[key], value)
        continue
      if key in node and isinstance(node[key], tuple) and isinstance(value, list):
        value = _deep_tuple(value)
      with node.unlocked():
        if key in node and node[key] is not None and value is not None and not isinstance(
            value, type(node[key])) and isinstance(node[key], (int, float)) and isinstance(
                value, (int, float)):
          value = type(node[key])(value)  # 1 saved for 1.0
        node[key] = value

  config = default_config()
  merge(config, d)
  return config


def _deep_tuple(value: Any) -> Any:
  return tuple(_deep_tuple(v) for v in value) if isinstance(value, list) else value


def read_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return config_from_json(json.load(f))


# ---- training workdirs ------------------------------------------------------
def checkpoint_dir(path: str) -> str:
  """WORKDIR/checkpoints of a training workdir, or `path` itself when it holds
  checkpoint steps; FileNotFoundError when it is neither."""
  ckpt = os.path.join(path, CHECKPOINTS_DIR)
  if os.path.isdir(ckpt):
    return ckpt
  if steps(path):
    return path
  raise FileNotFoundError(f"{path}: no {CHECKPOINTS_DIR}/ directory (is it a training "
                          "workdir?)")


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def steps(ckpt_dir: str) -> list[int]:
  """The finished steps in a checkpoints directory (STEP/state exists), oldest first."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir)
                if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, STATE_ITEM)))


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step of a workdir; None when it has none."""
  found = steps(os.path.join(workdir, CHECKPOINTS_DIR))
  return found[-1] if found else None


def _step_dir(workdir: str, step: int | None) -> tuple[str, int]:
  ckpt = checkpoint_dir(workdir)
  if step is None:
    found = steps(ckpt)
    if not found:
      raise FileNotFoundError(f"{ckpt}: no finished checkpoint step (expected STEP/{STATE_ITEM}/)")
    step = found[-1]
  return ckpt, step


def workdir_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run saved (the checkpoint's own copy, else WORKDIR/config.json),
  its relative paths resolved against `workdir` (tfjax.paths): a moved or
  copied workdir reads its own data, tokenizer and VAE."""
  ckpt, step = _step_dir(workdir, step)
  for path in (os.path.join(ckpt, str(step), CONFIG_ITEM, "metadata"),
               os.path.join(workdir, CONFIG_FILE)):
    if os.path.exists(path):
      return _own_data(Paths.of(read_config(path), workdir).resolved_config(), workdir)
  raise FileNotFoundError(f"{workdir}: no saved config ({CHECKPOINTS_DIR}/{step}/{CONFIG_ITEM} "
                          f"or {CONFIG_FILE})")


def _own_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Workdirs written before paths were stored relative hold an absolute
  data.dir; when that no longer exists (the workdir was moved) but the
  workdir has its own data/, that is used, with a warning."""
  own = os.path.join(os.path.abspath(workdir), "data")
  if not os.path.exists(config.data.dir) and os.path.isdir(own):
    log.warning("%s: the saved config's data.dir is %s; using this workdir's own %s",
                workdir, config.data.dir, own)
    config.data.dir = own
  return config


def ema_or_params(state: Any, config: ml_collections.ConfigDict) -> Any:
  """A TrainState's EMA parameters when the run keeps them, else its parameters."""
  return state.ema if config.train.ema_decay > 0 and state.ema else state.params


def _has_ema(state_dir: str) -> bool:
  meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(meta, "item_metadata", None)
  tree = getattr(tree, "tree", tree) if tree is not None else getattr(meta, "tree", meta)
  ema = tree.get("ema") if hasattr(tree, "get") else None
  return bool(ema)


def restore_params(workdir: str, step: int | None = None, use_ema: bool = True,
                   config: ml_collections.ConfigDict | None = None,
                   like: Any = None) -> tuple[Any, dict[str, Any]]:
  """Parameters of a training checkpoint, read alone (no optimizer state).

  Only the `params` (or, when use_ema and the run kept one, `ema`) subtree of
  the saved TrainState is read, whatever mesh wrote it.

  Args:
    workdir: a training workdir (WORKDIR/checkpoints/STEP/state) or its
      checkpoints directory.
    step: the checkpoint step (default: the newest finished one).
    config: the model's config (default: the one the run saved).
    like: ShapeDtypeStructs with shardings to restore onto (default: numpy
      arrays on the host).
  Returns:
    (params tree, info {"step", "ema"}).
  """
  ckpt, step = _step_dir(workdir, step)
  config = config or workdir_config(workdir, step)
  state_dir = os.path.join(ckpt, str(step), STATE_ITEM)
  key = "params"
  try:
    key = "ema" if use_ema and _has_ema(state_dir) else "params"
    if like is None:
      target = {key: abstract_params(config)}
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
      target = {key: like}
      restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                               partial_restore=True))
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore: sorted into damage and mismatch
    if disk_full(e) is not None:
      raise
    if is_damaged_data(e) or not isinstance(e, (ValueError, KeyError)):
      others = [str(s) for s in steps(ckpt) if s != step]
      raise ValueError(f"checkpoint step {step} in {ckpt} cannot be read; it looks damaged "
                       f"({short_error(e)}); " + (
                           f"other steps here: {', '.join(others)} (tfjax-export --step=N)"
                           if others else "no other step here: restore an older copy")) from e
    raise ValueError(f"{state_dir}: cannot read the '{key}' parameters for the saved config "
                     f"({short_error(e)})") from e
  return restored[key], {"step": step, "ema": key == "ema"}


# ---- exports ----------------------------------------------------------------
def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_META))


def read_export(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
  """(config with paths resolved against `path`, flat parameters, metadata) of an export."""
  with open(os.path.join(path, EXPORT_META)) as f:
    meta = json.load(f)
  if meta.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{os.path.join(path, EXPORT_META)}: not a tfjax export "
                     f"(format {meta.get('format')!r})")
  config = Paths.of(read_config(os.path.join(path, CONFIG_FILE)), path).resolved_config()
  return config, read_export_params(path), meta


def read_export_params(path: str, where: str | None = None) -> dict[str, Any]:
  """An export's parameters by '/'-joined name (as saved: jax arrays, saved dtype)."""
  file = os.path.join(path, EXPORT_PARAMS)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{where or path}: export {path} has no {EXPORT_PARAMS}")
  return safetensors.flax.load_file(file)


def load_export_params(path: str, abstract: Any, where: str = "config key train.init_from"
                       ) -> Any:
  """The export's parameters laid out like `abstract`.

  Args:
    path: an export directory.
    abstract: ShapeDtypeStructs (with shardings) of the run's params.
    where: what named the export, for errors.
  Returns:
    A tree like `abstract` of arrays in its dtypes (an export saved in
    bfloat16 is cast back to the float32 master weights) and shardings.
  Raises:
    ValueError naming `where` when a parameter is missing or has another
    shape (the export's model differs from the configured one).
  """
  have = read_export_params(path, where)
  want = flatten(abstract)
  check_params(have, want, f"{where}: export {path}")
  treedef = jax.tree_util.tree_structure(abstract)
  return jax.tree_util.tree_unflatten(  # `want` keeps the flattening order
      treedef, [place(np.asarray(have[key]), spec) for key, spec in want.items()])


# ---- the assets beside the parameters ---------------------------------------
def tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where a run's tokenizer lives (data.tokenizer, else DATA_DIR/tokenizer;
  relative paths from `workdir`)."""
  for path in (Paths.of(config, workdir).tokenizer, os.path.join(workdir, "tokenizer")):
    if path and os.path.exists(path):
      return path
  return None


def vae_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """A run's VAE directory (vae.path, else WORKDIR/vae) when it exists."""
  path = Paths.of(config, workdir).vae
  return path if os.path.isdir(path) else None
