"""Shapes: the built-in image-caption dataset, generated from a seed.

A scene is a JSON-serialisable dict

  {"objects": [{"shape": "circle", "color": "red", "size": "small",
                "x": 0.3, "y": 0.6}, ...],
   "background": [245, 245, 245]}

with x, y the object centre as fractions of the image side (y grows down).
Objects never overlap and are never smaller than `SIZES["small"]`, so a pixel
checker can read every object back from a rendered image: colours are far
apart in RGB and rendering has no anti-aliasing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np


SHAPES = ("circle", "square", "triangle")

# Saturated, mutually distant colours: any two colours, or a colour and a
# background, are more than 140 apart in RGB (checked by the tests).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (30, 170, 50),
    "blue": (20, 50, 240),
    "yellow": (245, 225, 40),
    "purple": (130, 0, 160),
    "cyan": (30, 210, 215),
}

# What configs may ask of scenes (`max_objects`, `object_sizes` in the `data` and
# `editing` sections): tfjax.config.validate and SceneOptions both ask
# scene_limits_error, so the allowed values and the messages live here alone.
SIZE_NAMES = ("small", "medium", "large")
MAX_OBJECTS = 4  # captions spell counts as words, "one" to "four"
DEFAULT_MAX_OBJECTS = 3

# Circumradius of an object as a fraction of the image side, per size class.
SIZES: dict[str, float] = dict(zip(SIZE_NAMES, (0.10, 0.15, 0.21)))

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "black": (15, 15, 15),
}

SPLITS = ("train", "validation", "test")
# Share of the scene hash space (out of 100) each split owns.
_SPLIT_BOUNDS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
_GAP = 0.02  # minimal empty gap between two objects, in image fractions

Scene = dict[str, Any]


def _shape_mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
  """bool[n, n]: pixels whose centres lie inside the shape (pixel units)."""
  c = np.arange(n, dtype=np.float32) + 0.5
  dx, dy = c[None, :] - cx, c[:, None] - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    half = r / np.sqrt(2.0)  # inscribed in the circle of radius r
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  if shape == "triangle":
    # Upward equilateral triangle inscribed in the circle of radius r.
    s3 = np.sqrt(3.0)
    below_top_edges = (s3 * dx - dy <= r) & (-s3 * dx - dy <= r)
    return below_top_edges & (dy <= r / 2)
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene, image_size: int) -> np.ndarray:
  """Draws a scene. Returns uint8[image_size, image_size, 3]."""
  img = np.empty((image_size, image_size, 3), np.uint8)
  img[:] = np.asarray(scene["background"], np.uint8)
  for obj in scene["objects"]:
    r = SIZES[obj["size"]] * image_size
    mask = _shape_mask(obj["shape"], obj["x"] * image_size, obj["y"] * image_size, r,
                       image_size)
    img[mask] = COLORS[obj["color"]]
  return img


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  """rng.choice(options) for a short sequence, with the same draw: choice turns
  the list into an array on every call, which was most of a data build."""
  return options[int(rng.integers(0, len(options)))]


def random_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3,
                 max_tries: int = 100, sizes: Sequence[str] = tuple(SIZES)) -> Scene:
  """A random scene of non-overlapping objects, entirely inside the image."""
  n = int(rng.integers(min_objects, max_objects + 1))
  sizes, colors = tuple(sizes), tuple(COLORS)
  objects: list[dict[str, Any]] = []
  tries = 0
  while len(objects) < n and tries < max_tries:
    tries += 1
    size = str(_pick(rng, sizes))
    r = SIZES[size]
    x, y = (float(v) for v in np.round(rng.uniform(r + 0.01, 1 - r - 0.01, size=2), 3))
    if all(np.hypot(x - o["x"], y - o["y"]) > r + SIZES[o["size"]] + _GAP for o in objects):
      objects.append(dict(shape=str(_pick(rng, SHAPES)), color=str(_pick(rng, colors)),
                          size=size, x=x, y=y))
  bg = str(_pick(rng, tuple(BACKGROUNDS)))
  return {"objects": objects, "background": list(BACKGROUNDS[bg])}


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


@dataclasses.dataclass(frozen=True)
class SceneOptions:
  """What scenes may hold: 1..max_objects objects of the given size classes.

  The defaults are the full dataset; the tiny main job narrows them
  (`data.max_objects`, `data.object_sizes`) so that a model trained for
  minutes on a CPU can learn it. Edit scenes take theirs from the `editing`
  section; `section` names it in errors (and takes no part in equality).
  """
  max_objects: int = DEFAULT_MAX_OBJECTS
  sizes: tuple[str, ...] = tuple(SIZES)
  section: str = dataclasses.field(default="data", compare=False, repr=False)

  def __post_init__(self):
    problem = scene_limits_error(self.max_objects, self.sizes, self.section)
    if problem:
      raise ValueError(problem)

  @classmethod
  def from_config(cls, config_section: Any, section: str = "data") -> "SceneOptions":
    """From the config section named `section` (`data` or `editing`)."""
    max_objects, sizes = read_scene_limits(config_section)
    return cls(max_objects=max_objects, sizes=sizes, section=section)

  def random_scene(self, rng: np.random.Generator) -> Scene:
    """A random scene within these options (see the module-level random_scene)."""
    return random_scene(rng, max_objects=self.max_objects, sizes=self.sizes)

  @property
  def is_default(self) -> bool:
    return self == SceneOptions()

  @property
  def name(self) -> str:
    """Suffix for dataset names; empty for the defaults (names built before stay valid)."""
    if self.is_default:
      return ""
    return f"_obj{self.max_objects}" + ("" if self.sizes == tuple(SIZES) else
                                        "_" + "-".join(self.sizes))


def background_name(scene: Scene) -> str:
  for name, rgb in BACKGROUNDS.items():
    if tuple(scene["background"]) == rgb:
      return name
  return "plain"


def canonical(scene: Scene) -> str:
  """Order- and jitter-insensitive key: objects sorted, positions on a 1/8 grid."""
  objs = sorted((o["shape"], o["color"], o["size"], int(o["x"] * 8), int(o["y"] * 8))
                for o in scene["objects"])
  return json.dumps({"o": objs, "b": list(scene["background"])})


def split_of(scene: Scene) -> str:
  """The split a scene belongs to, decided by a hash of its canonical form."""
  h = int(hashlib.sha1(canonical(scene).encode()).hexdigest()[:8], 16) % 100
  for split, (lo, hi) in _SPLIT_BOUNDS.items():
    if lo <= h < hi:
      return split
  raise AssertionError(h)


def _phrase(obj: dict[str, Any], rng: np.random.Generator, with_size: bool | None = None) -> str:
  if with_size is None:
    with_size = rng.random() < 0.5
  words = ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]
  return "a " + " ".join(words)


def _relation(a: dict[str, Any], b: dict[str, Any]) -> str:
  """Where a lies relative to b, along the axis of larger separation."""
  dx, dy = a["x"] - b["x"], a["y"] - b["y"]
  if abs(dy) >= abs(dx):
    return "above" if dy < 0 else "below"
  return "to the left of" if dx < 0 else "to the right of"


def _region(obj: dict[str, Any]) -> str:
  v = "top" if obj["y"] < 1 / 3 else "bottom" if obj["y"] > 2 / 3 else "middle"
  h = "left" if obj["x"] < 1 / 3 else "right" if obj["x"] > 2 / 3 else "center"
  if v == "middle" and h == "center":
    return "center"
  return f"{v} {h}" if v != "middle" else f"middle {h}"


def _plural(shape: str) -> str:
  return shape + "s"


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """A true description of the scene, from one of several templates."""
  objs = scene["objects"]
  if not objs:
    return f"an empty {background_name(scene)} background"
  if len(objs) == 1:
    o = objs[0]
    options = [
        lambda: f"a {o['color']} {o['shape']}",
        lambda: _phrase(o, rng, True),
        lambda: f"{_phrase(o, rng)} on a {background_name(scene)} background",
        lambda: f"{_phrase(o, rng)} in the {_region(o)}",
        lambda: f"one {o['color']} {o['shape']}",
    ]
    return options[int(rng.integers(len(options)))]()
  options = [lambda: _join([_phrase(o, rng) for o in objs])]
  same = {(o["color"], o["shape"]) for o in objs}
  if len(same) == 1:
    o = objs[0]
    options.append(lambda: f"{_NUMBERS[len(objs)]} {o['color']} {_plural(o['shape'])}")
  shapes = {o["shape"] for o in objs}
  if len(shapes) == 1:
    s = objs[0]["shape"]
    options.append(lambda: f"{_NUMBERS[len(objs)]} {_plural(s)}: "
                   + _join([o["color"] for o in objs]))
  options.append(lambda: f"{_NUMBERS[len(objs)]} shapes: " + _join([_phrase(o, rng) for o in objs]))
  if len(objs) == 2:
    a, b = objs
    options.append(lambda: f"{_phrase(a, rng)} {_relation(a, b)} {_phrase(b, rng)}")
    options.append(lambda: f"{_phrase(b, rng)} {_relation(b, a)} {_phrase(a, rng)}")
  return options[int(rng.integers(len(options)))]()


def generate_split(split: str, num: int, image_size: int, seed: int = 0,
                   options: SceneOptions = SceneOptions()
                   ) -> tuple[np.ndarray, list[Scene], list[str]]:
  """`num` scenes of one split, their images and captions.

  Scenes are drawn from one stream per (seed, split) and kept only when their
  canonical hash falls in the split, so splits never share a scene.

  options: what scenes may hold (objects per scene, size classes).

  Returns:
    (images uint8[num, image_size, image_size, 3], scenes, captions).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  scenes, captions = [], []
  while len(scenes) < num:
    scene = options.random_scene(rng)
    if split_of(scene) != split:
      continue
    images[len(scenes)] = render(scene, image_size)
    scenes.append(scene)
    captions.append(caption(scene, rng))
  return images, scenes, captions


_FACTS = [
    "a circle is round and has no corners.",
    "a square has four equal sides and four corners.",
    "a triangle has three sides and three corners.",
    "small shapes are smaller than medium shapes, and large shapes are the biggest.",
    "the shapes in these pictures never overlap.",
    "each picture shows one, two or three shapes on a plain background.",
]


def _scene_story(scene: Scene, rng: np.random.Generator) -> str:
  objs = scene["objects"]
  n = len(objs)
  lines = [f"this picture shows {_NUMBERS.get(n, str(n))} "
           f"shape{'s' if n != 1 else ''} on a {background_name(scene)} background."]
  for o in objs:
    lines.append(f"{_phrase(o, rng, True)} sits in the {_region(o)}.")
  for a, b in zip(objs, objs[1:]):
    lines.append(f"the {a['color']} {a['shape']} is {_relation(a, b)} "
                 f"the {b['color']} {b['shape']}.")
  if rng.random() < 0.3:
    lines.append(str(_pick(rng, _FACTS)))
  return " ".join(lines)


def text_corpus(split: str, num: int, seed: int = 0,
                options: SceneOptions = SceneOptions()) -> list[str]:
  """`num` text-only documents about shapes scenes (no images attached)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  rng = np.random.default_rng([seed, 100 + SPLITS.index(split)])
  docs = []
  while len(docs) < num:
    scene = options.random_scene(rng)
    if split_of(scene) != split:
      continue
    kind = rng.random()
    if kind < 0.6:
      docs.append(_scene_story(scene, rng))
    elif kind < 0.9:
      docs.append(caption(scene, rng) + ". " + _scene_story(scene, rng))
    else:
      docs.append(" ".join(rng.choice(_FACTS, size=2, replace=False)))
  return docs
