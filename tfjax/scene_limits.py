"""What configs may ask of shapes scenes: max_objects and object_sizes.

The same two keys sit in the `data` section (pretraining scenes) and in the
`editing` section (edit scenes). tfjax.config checks them at start-up and
tfjax.data.shapes.SceneOptions checks them when scenes are built; both ask
`scene_limits_error` here, so the allowed values and the messages live in one
place. It imports nothing of tfjax: tfjax.config sits below tfjax.data.
"""
from __future__ import annotations

from typing import Any, Sequence

SIZE_NAMES = ("small", "medium", "large")  # tfjax.data.shapes.SIZES gives each its radius
MAX_OBJECTS = 4  # captions spell counts as words, "one" to "four"
DEFAULT_MAX_OBJECTS = 3


def parse_sizes(text: str) -> tuple[str, ...]:
  """'small, large' -> ('small', 'large'): the config holds size classes as one string."""
  return tuple(s.strip() for s in str(text).split(",") if s.strip())


def read_scene_limits(section: Any) -> tuple[int, tuple[str, ...]]:
  """(max_objects, sizes) of a config section; older configs lack the keys: the defaults."""
  return (int(section.get("max_objects", DEFAULT_MAX_OBJECTS)),
          parse_sizes(section.get("object_sizes", ",".join(SIZE_NAMES))))


def scene_limits_error(max_objects: int, sizes: Sequence[str], section: str) -> str | None:
  """Why the values are impossible, naming `section`'s config key; None when they are fine."""
  if not 1 <= max_objects <= MAX_OBJECTS:
    return f"config key {section}.max_objects: must be in 1..{MAX_OBJECTS}, got {max_objects}"
  unknown = [s for s in sizes if s not in SIZE_NAMES]
  if unknown or not sizes:
    return (f"config key {section}.object_sizes: must be a comma list of "
            f"{', '.join(SIZE_NAMES)}; got {','.join(sizes)!r}")
  return None
