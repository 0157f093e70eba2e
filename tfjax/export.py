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
import safetensors.flax

from tfjax import checkpoints
from tfjax.config import validate
from tfjax.data.tokenizer import Tokenizer
from tfjax.files import write_atomic
from tfjax.generate.mixed import Generator
from tfjax.model import count_params
from tfjax.paths import Paths
import tfjax.vae

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")


def _cast(params: Any, dtype: str) -> Any:
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), params)


def export(workdir: str, out: str, dtype: str = "bfloat16", step: int | None = None,
           use_ema: bool = True) -> str:
  """Writes an export of a training run's checkpoint into `out`; returns `out`."""
  check_export_out(out)
  config = checkpoints.workdir_config(workdir, step)
  params, info = checkpoints.restore_params(workdir, step, use_ema, config)
  params = _cast(params, dtype)
  tmp = f"{os.path.abspath(out)}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    flat = checkpoints.flatten(params)
    write_atomic(os.path.join(tmp, checkpoints.EXPORT_PARAMS),
                 lambda p: safetensors.flax.save_file(flat, p))
    with open(os.path.join(tmp, checkpoints.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))  # absolute paths: the data stays behind
    tok = checkpoints.tokenizer_dir(config, workdir)
    if tok is not None:
      Tokenizer.load(tok).save(os.path.join(tmp, "tokenizer"))
    else:
      log.warning("%s: no tokenizer found (looked in %s): the export cannot read or write text",
                  workdir, Paths.of(config, workdir).tokenizer)
    vae = checkpoints.vae_dir(config, workdir)
    if vae is not None:
      shutil.copytree(vae, os.path.join(tmp, "vae"))
    meta = {"format": checkpoints.EXPORT_FORMAT, "version": 1, "source": os.path.abspath(workdir),
            "step": info["step"], "ema": info["ema"], "dtype": dtype,
            "tokenizer": tok is not None, "vae": vae is not None,
            "param_counts": count_params(params)}
    with open(os.path.join(tmp, checkpoints.EXPORT_META), "w") as f:
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
  if os.path.isdir(out) and os.listdir(out) and not checkpoints.is_export(out):
    raise FileExistsError(f"--out={out} is a non-empty directory that is not a tfjax export "
                          f"(no {checkpoints.EXPORT_META}); give a new directory (an export is "
                          "replaced, anything else is left alone)")


def load_pretrained(path: str, dtype: str | None = None, step: int | None = None):
  """A `Generator` from an export directory or a training workdir.

  Args:
    path: an export (see module docstring) or a workdir with checkpoints/.
    dtype: cast the parameters ("bfloat16" | "float32"); None keeps them.
    step: a workdir's checkpoint step (default: the latest).
  """
  if checkpoints.is_export(path):
    config, flat, _ = checkpoints.read_export(path)
    params = checkpoints.unflatten(flat)
    tok_path, vae_path = os.path.join(path, "tokenizer"), os.path.join(path, "vae")
  elif checkpoints.is_workdir(path):
    config = checkpoints.workdir_config(path, step)
    params, _ = checkpoints.restore_params(path, step, True, config)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok_path, vae_path = checkpoints.tokenizer_dir(config, path), checkpoints.vae_dir(config, path)
  else:
    raise FileNotFoundError(f"{path}: neither an export ({checkpoints.EXPORT_META}) nor a "
                            f"training workdir ({checkpoints.CHECKPOINTS_DIR}/)")
  validate(config)
  checkpoints.check_params(checkpoints.flatten(params),
                           checkpoints.flatten(checkpoints.abstract_params(config)), path)
  if dtype is not None:
    params = _cast(params, dtype)
  tokenizer = Tokenizer.load(tok_path) if tok_path and os.path.exists(tok_path) else None
  vae = tfjax.vae.load(vae_path) if vae_path and os.path.isdir(vae_path) else None
  return Generator(config, params, tokenizer=tokenizer, vae=vae)
