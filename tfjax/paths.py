"""Where a run's files are, computed when a command starts: a `Paths` value.

The config holds paths as the user wrote them; nothing resolved is written
back into what a workdir stores. The rules:
  * In a stored config (WORKDIR/config.json, a checkpoint's config, an
    export's config.json) a relative path is relative to the directory holding
    it, so a workdir can be moved or copied; a path outside it is stored
    absolute, which says explicitly that the data lives elsewhere.
  * On the command line, data.dir (default "data") is relative to the workdir;
    the other path keys (data.tokenizer, data.latents, data.tfds_dir,
    vae.path, editing.dir, editing.latents, chameleon.tokens) are relative to
    the current directory, like any path typed in a shell.
`Paths.of(config, base)` gives every location as an absolute path;
`Paths.resolved_config` hands the library's `(config, data_dir)` functions a
copy whose path keys are absolute, and `Paths.portable_config` is the copy a
workdir stores.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

# Config keys holding a file or directory ("" = the default under data.dir).
PATH_KEYS = ("data.dir", "data.tokenizer", "data.latents", "data.tfds_dir", "vae.path",
             "editing.dir", "editing.latents", "chameleon.tokens")


def _get(config: ml_collections.ConfigDict, key: str) -> str | None:
  section, leaf = key.split(".")
  if section not in config or leaf not in config[section]:
    return None
  return config[section][leaf]


def _map(config: ml_collections.ConfigDict, fn) -> ml_collections.ConfigDict:
  """A copy of config with fn(key, value) applied to every non-empty path key."""
  out = config.copy_and_resolve_references()
  for key in PATH_KEYS:
    value = _get(out, key)
    if value:
      section, leaf = key.split(".")
      out[section][leaf] = fn(key, str(value))
  return out


def _inside(path: str, base: str) -> bool:
  return os.path.commonpath([os.path.abspath(path), os.path.abspath(base)]) == \
      os.path.abspath(base)


@dataclasses.dataclass(frozen=True)
class Paths:
  """Absolute locations of one run (workdir) or export directory (base)."""
  base: str
  data: str
  tokenizer: str
  latents: str
  tfds: str
  vae: str            # vae.path, or BASE/vae
  checkpoints: str
  config: ml_collections.ConfigDict = dataclasses.field(repr=False, compare=False)

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, base: str) -> "Paths":
    """Paths of a stored config: relative values are relative to `base`."""
    base = os.path.abspath(base)
    resolved = _map(config, lambda _, v: os.path.normpath(os.path.join(base, v)))
    d = resolved.data
    data = d.dir
    return cls(base=base, data=data,
               tokenizer=d.tokenizer or os.path.join(data, "tokenizer"),
               latents=d.latents or os.path.join(data, "latents"),
               tfds=d.tfds_dir or os.path.join(data, "tfds"),
               vae=resolved.vae.path or os.path.join(base, "vae"),
               checkpoints=os.path.join(base, "checkpoints"), config=resolved)

  @classmethod
  def from_command_line(cls, config: ml_collections.ConfigDict, workdir: str) -> "Paths":
    """Paths of a config given on the command line (module docstring's rules)."""
    return cls.of(_map(config, lambda key, v: v if key == "data.dir" else os.path.abspath(v)),
                  workdir)

  def resolved_config(self) -> ml_collections.ConfigDict:
    """A copy of the config with every path key absolute (for in-process use only;
    never stored: see portable_config)."""
    return self.config.copy_and_resolve_references()

  def portable_config(self, base: str | None = None) -> ml_collections.ConfigDict:
    """The copy to store in `base` (default this run's): paths inside it
    relative, paths elsewhere absolute."""
    base = os.path.abspath(base or self.base)
    return _map(self.config, lambda _, v: os.path.relpath(v, base) if _inside(v, base) else v)
