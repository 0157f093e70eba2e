"""Training run -> self-contained model directory, and back to a generator.

An export directory holds:
  tfjax_export.json   format, source workdir and step, dtype, EMA used, counts
  config.json         the resolved config the model was trained with
  params.safetensors  parameters only, keys are '/'-joined tree paths
  tokenizer/          tokenizer.model + tokenizer.json (tfjax.data.tokenizer)
  vae/                a copy of the VAE directory (tfjax.vae.load reads it)

`load_pretrained(path)` accepts an export or a training workdir (it then reads
the latest checkpoint's parameters, EMA when the run kept one) and returns a
`tfjax.generate.mixed.Generator` on the default device: no optimizer state is
read and no mesh is built.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfjax.config import default_config, validate
from tfjax.paths import Paths

log = logging.getLogger(__name__)

FORMAT = "tfjax-export"
META_FILE = "tfjax_export.json"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
DTYPES = ("bfloat16", "float32")


# ---- config ----------------------------------------------------------------
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


# ---- parameters ------------------------------------------------------------
def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _abstract_params(config: ml_collections.ConfigDict) -> Any:
  import flax.linen as nn
  from tfjax.model import abstract_params
  return nn.unbox(abstract_params(config.model))


def checkpoint_dir(workdir: str) -> str:
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory (is it a training workdir?)")
  return path


def latest_step(ckpt_dir: str) -> int:
  steps = sorted(int(d) for d in os.listdir(ckpt_dir)
                 if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint step (expected STEP/state/)")
  return steps[-1]


def workdir_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run saved (the checkpoint's own copy, else WORKDIR/config.json),
  its relative paths resolved against `workdir` (tfjax.paths): a moved or
  copied workdir reads its own data, tokenizer and VAE."""
  ckpt = checkpoint_dir(workdir)
  step = latest_step(ckpt) if step is None else step
  for path in (os.path.join(ckpt, str(step), "config", "metadata"),
               os.path.join(workdir, CONFIG_FILE)):
    if os.path.exists(path):
      return _own_data(Paths.of(read_config(path), workdir).resolved_config(), workdir)
  raise FileNotFoundError(f"{workdir}: no saved config (checkpoints/{step}/config or "
                          f"{CONFIG_FILE})")


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


def _has_ema(state_dir: str) -> bool:
  import orbax.checkpoint as ocp
  meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(meta, "item_metadata", None)
  tree = getattr(tree, "tree", tree) if tree is not None else getattr(meta, "tree", meta)
  ema = tree.get("ema") if hasattr(tree, "get") else None
  return bool(ema)


def restore_params(workdir: str, step: int | None = None, use_ema: bool = True,
                   config: ml_collections.ConfigDict | None = None) -> tuple[Any, dict]:
  """Parameters of a training checkpoint as numpy arrays, read alone.

  Only the `params` (or `ema`) subtree of the saved TrainState is read, onto
  the host, whatever mesh wrote it.

  Returns:
    (params tree, info {"step", "ema"}).
  """
  import orbax.checkpoint as ocp
  ckpt = checkpoint_dir(workdir)
  step = latest_step(ckpt) if step is None else step
  config = config or workdir_config(workdir, step)
  state_dir = os.path.join(ckpt, str(step), "state")
  key = "params"
  try:
    key = "ema" if use_ema and _has_ema(state_dir) else "params"
    target = {key: _abstract_params(config)}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          target)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                               partial_restore=True))
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore: sorted into damage and mismatch
    from tfjax.errors import disk_full, is_damaged_data, short_error
    if disk_full(e) is not None:
      raise
    if is_damaged_data(e) or not isinstance(e, (ValueError, KeyError)):
      others = [s for s in _steps(ckpt) if s != str(step)]
      raise ValueError(f"checkpoint step {step} in {ckpt} cannot be read; it looks damaged "
                       f"({short_error(e)}); " + (
                           f"other steps here: {', '.join(others)} (tfjax-export --step=N)"
                           if others else "no other step here: restore an older copy")) from e
    raise ValueError(f"{state_dir}: cannot read the '{key}' parameters for the saved config "
                     f"({short_error(e)})") from e
  return restored[key], {"step": step, "ema": key == "ema"}


def _steps(ckpt_dir: str) -> list[str]:
  return sorted((d for d in os.listdir(ckpt_dir) if d.isdigit()), key=int)


def _cast(params: Any, dtype: str) -> Any:
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), params)


# ---- tokenizer and VAE locations -------------------------------------------
def tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where a run's tokenizer lives (data.tokenizer, else DATA_DIR/tokenizer;
  relative paths from `workdir`)."""
  for path in (Paths.of(config, workdir).tokenizer, os.path.join(workdir, "tokenizer")):
    if path and os.path.exists(path):
      return path
  return None


def vae_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  path = Paths.of(config, workdir).vae
  return path if os.path.isdir(path) else None


# ---- export / load ---------------------------------------------------------
def export(workdir: str, out: str, dtype: str = "bfloat16", step: int | None = None,
           use_ema: bool = True) -> str:
  """Writes an export of a training run's checkpoint into `out`; returns `out`."""
  import safetensors.flax
  from tfjax.files import write_atomic
  from tfjax.model import count_params
  check_export_out(out)
  config = workdir_config(workdir, step)
  params, info = restore_params(workdir, step, use_ema, config)
  params = _cast(params, dtype)
  tmp = f"{os.path.abspath(out)}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    flat = _flat_jnp(params)
    write_atomic(os.path.join(tmp, PARAMS_FILE), lambda p: safetensors.flax.save_file(flat, p))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))  # absolute paths: the data stays behind
    tok = tokenizer_dir(config, workdir)
    if tok is not None:
      from tfjax.data.tokenizer import Tokenizer
      Tokenizer.load(tok).save(os.path.join(tmp, "tokenizer"))
    else:
      log.warning("%s: no tokenizer found (looked in %s): the export cannot read or write text",
                  workdir, Paths.of(config, workdir).tokenizer)
    vae = vae_dir(config, workdir)
    if vae is not None:
      shutil.copytree(vae, os.path.join(tmp, "vae"))
    meta = {"format": FORMAT, "version": 1, "source": os.path.abspath(workdir),
            "step": info["step"], "ema": info["ema"], "dtype": dtype,
            "tokenizer": tok is not None, "vae": vae is not None,
            "param_counts": count_params(params)}
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.rename(tmp, out)
  finally:
    if os.path.exists(tmp):  # a failed export leaves nothing half-written behind
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def check_export_out(out: str) -> None:
  """`out` may be replaced: it is absent, an empty directory, or an export."""
  if os.path.isfile(out):
    raise FileExistsError(f"--out={out} is a file: give a directory for the export")
  if os.path.isdir(out) and os.listdir(out) and not is_export(out):
    raise FileExistsError(f"--out={out} is a non-empty directory that is not a tfjax export "
                          f"(no {META_FILE}); give a new directory (an export is replaced, "
                          "anything else is left alone)")


def _flat_jnp(params: Any) -> dict[str, jax.Array]:
  return {"/".join(str(getattr(p, "key", p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META_FILE))


def load_pretrained(path: str, dtype: str | None = None, step: int | None = None):
  """A `Generator` from an export directory or a training workdir.

  Args:
    path: an export (see module docstring) or a workdir with checkpoints/.
    dtype: cast the parameters ("bfloat16" | "float32"); None keeps them.
    step: a workdir's checkpoint step (default: the latest).
  """
  from tfjax.generate.mixed import Generator
  if is_export(path):
    import safetensors.flax
    with open(os.path.join(path, META_FILE)) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{os.path.join(path, META_FILE)}: not a tfjax export "
                       f"(format {meta.get('format')!r})")
    config = Paths.of(read_config(os.path.join(path, CONFIG_FILE)), path).resolved_config()
    params = unflatten(safetensors.flax.load_file(os.path.join(path, PARAMS_FILE)))
    tok_path, vae_path = os.path.join(path, "tokenizer"), os.path.join(path, "vae")
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    config = workdir_config(path, step)
    params, _ = restore_params(path, step, True, config)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok_path, vae_path = tokenizer_dir(config, path), vae_dir(config, path)
  else:
    raise FileNotFoundError(f"{path}: neither an export ({META_FILE}) nor a training workdir "
                            "(checkpoints/)")
  validate(config)
  _check_params(params, config, path)
  if dtype is not None:
    params = _cast(params, dtype)
  tokenizer = vae = None
  if tok_path and os.path.exists(tok_path):
    from tfjax.data.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(tok_path)
  if vae_path and os.path.isdir(vae_path):
    import tfjax.vae
    vae = tfjax.vae.load(vae_path)
  return Generator(config, params, tokenizer=tokenizer, vae=vae)


def _check_params(params: Any, config: ml_collections.ConfigDict, path: str) -> None:
  """Every parameter the config's model needs is there with its shape."""
  want = _flat_jnp(_abstract_params(config))
  have = _flat_jnp(params)
  missing = sorted(set(want) - set(have))
  if missing:
    raise ValueError(f"{path}: parameters missing for the saved config: {missing[:5]}")
  for k, spec in want.items():
    if tuple(have[k].shape) != tuple(spec.shape):
      raise ValueError(f"{path}: parameter {k} has shape {tuple(have[k].shape)}, the config's "
                       f"model needs {tuple(spec.shape)}")
