"""Config files read by name outside config_flags (sweeps, benchmarks, tests)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config_file(spec: str, root: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of "PATH[:ARG]", as `--config=PATH[:ARG]` reads it (config_flags
  passes the text after the first ':'); a relative PATH missing here is tried under `root`."""
  path, *arg = spec.split(":", 1)
  if root and not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(root, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = "tfjax_config_file_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)
