"""Config errors and "section.key=value" overrides outside config_flags."""
from __future__ import annotations

import ast
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config that cannot work; the message names the key to change."""


class UnknownConfigKey(ConfigError, KeyError):
  """An override names a key the config does not have."""


def _parse_value(text: str, old: Any) -> Any:
  """The override's value as a Python literal, typed like the key's current value."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  if isinstance(old, str) and not isinstance(value, str):
    return text  # a string key keeps "123" as "123"
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    where: str = "overrides") -> ml_collections.ConfigDict:
  """Applies "section.key=value" strings (values as Python literals) in place.

  For overrides that do not come through config_flags' --config.KEY=VALUE:
  sweep files (tfjax.jobs.sweep) and tfjax-eval --override.
  """
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"{where}: {item!r} is not KEY=VALUE (section.key=value)")
    key, text = item.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = config
    for p in parents:
      if p not in node:
        raise UnknownConfigKey(f"{where}: config key {key!r} does not exist (no section {p!r})")
      node = node[p]
    if leaf not in node:
      raise UnknownConfigKey(f"{where}: config key {key!r} does not exist")
    node[leaf] = _parse_value(text.strip(), node[leaf])
  return config
