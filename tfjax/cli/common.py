"""What every command shares: config loading and validation, quiet start-up."""
from __future__ import annotations

import os

import ml_collections


def quiet_jax_startup() -> None:
  """Keep an installed libtpu from probing for TPU hardware on CPU machines."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def load_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validate a config parsed by config_flags (the command line already applied)."""
  from tfjax.config import validate
  if config is None:
    raise SystemExit("--config=configs/NAME.py is required")
  return validate(config)


def run(main_fn, module_name: str) -> None:
  """absl's app.run, with `--help` listing the flags of the command's module.

  absl's --help shows the flags of the module named by sys.argv[0]; a console
  script's argv[0] is the wrapper, so the command's own flags are registered
  for it too.
  """
  import sys

  from absl import app, flags
  by_module = flags.FLAGS.flags_by_module_dict()
  for flag in by_module.get(module_name, []):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None:  # usage text = the command's docstring
    main_module.__doc__ = sys.modules[module_name].__doc__
  quiet_jax_startup()
  app.run(main_fn)
