"""Config files (and other loose Python files) read by path outside config_flags."""
from __future__ import annotations

import importlib.util
import os
import types

import ml_collections


def load_config_file(spec: str, root: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of "PATH[:ARG]", as `--config=PATH[:ARG]` reads it (config_flags
  passes the text after the first ':'); a relative PATH missing here is tried under `root`."""
  path, *arg = spec.split(":", 1)
  if root and not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(root, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  return load_module(path, "tfjax_config_file_").get_config(*arg)


def load_module(path: str, prefix: str = "") -> types.ModuleType:
  """The Python file at `path` as a fresh module named prefix + its file stem; for
  files outside any package (configs, tests/, tools/, benchmarks/), so no sys.path edit."""
  name = prefix + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise FileNotFoundError(f"{path} is not a Python file that can be loaded")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
