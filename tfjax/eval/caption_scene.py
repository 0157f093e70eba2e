"""Reading a shapes caption back into claims, and checking them against a scene.

A generated caption is scene-accurate when every object it names exists (by
colour and shape, with the right number of each), it names every object of
the scene, and each size, relation ("above", "to the left of"), region ("in
the top left") and background it states is true. The grammar is the one
`tfjax.data.shapes.caption` writes; anything it cannot read is not accurate.
"""
from __future__ import annotations

import collections
import re
from typing import Any

from tfjax.data import shapes

_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
_RELATIONS = ("to the left of", "to the right of", "above", "below")


def _color_re() -> str:
  return "|".join(sorted(shapes.COLORS, key=len, reverse=True))


def _shape_re() -> str:
  return "|".join(shapes.SHAPES)


def parse(caption: str) -> dict[str, Any]:
  """Claims of a caption: {"objects": [(size|None, color, shape)], "relation":
  (i, rel, j) | None, "region": str | None, "background": str | None}."""
  text = " ".join(re.findall(r"[a-z]+|:|,", caption.lower()))
  colors, shape_names = _color_re(), _shape_re()
  claims: dict[str, Any] = {"objects": [], "relation": None, "region": None,
                            "background": None}
  m = re.search(r"on a (\w+) background", text)
  if m:
    claims["background"] = m.group(1)
  m = re.search(r"in the ((?:top|middle|bottom) (?:left|center|right)|center)", text)
  if m:
    claims["region"] = m.group(1)
  # "two triangles : red and blue"
  m = re.match(rf"(one|two|three|four) ({shape_names})s : (.*)$", text)
  if m:
    listed = re.findall(rf"\b({colors})\b", m.group(3))
    claims["objects"] = [(None, c, m.group(2)) for c in listed]
    claims["count"] = _NUMBERS[m.group(1)]
    return claims
  # "three red circles"
  m = re.match(rf"(one|two|three|four) ({colors}) ({shape_names})s?$", text)
  if m:
    claims["objects"] = [(None, m.group(2), m.group(3))] * _NUMBERS[m.group(1)]
    return claims
  m = re.match(r"(one|two|three|four) shapes : ", text)
  if m:
    claims["count"] = _NUMBERS[m.group(1)]
  phrase = rf"(?:a|one) (?:(small|medium|large) )?({colors}) ({shape_names})\b"
  found = list(re.finditer(phrase, text))
  claims["objects"] = [(f.group(1), f.group(2), f.group(3)) for f in found]
  if len(found) == 2:
    between = text[found[0].end():found[1].start()].strip()
    if between in _RELATIONS:
      claims["relation"] = (0, between, 1)
  return claims


def _matches(claim: tuple, obj: dict[str, Any]) -> bool:
  size, color, shape = claim
  return obj["color"] == color and obj["shape"] == shape and size in (None, obj["size"])


def _assign(claims: list[tuple], objects: list[dict[str, Any]]) -> list[int] | None:
  """Scene object index for each claim (sized claims first), or None."""
  order = sorted(range(len(claims)), key=lambda i: claims[i][0] is None)
  used: set[int] = set()
  out = [-1] * len(claims)
  for i in order:
    j = next((j for j, o in enumerate(objects) if j not in used and _matches(claims[i], o)), None)
    if j is None:
      return None
    used.add(j)
    out[i] = j
  return out


def _holds(relation: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
  return {"above": a["y"] < b["y"], "below": a["y"] > b["y"],
          "to the left of": a["x"] < b["x"], "to the right of": a["x"] > b["x"]}[relation]


def scene_accurate(caption: str, scene: dict[str, Any]) -> bool:
  """True when the caption names exactly the scene's objects and says nothing false."""
  claims = parse(caption)
  objects = scene["objects"]
  named = claims["objects"]
  if not named or len(named) != len(objects):
    return False
  if claims.get("count") not in (None, len(objects)):
    return False
  if collections.Counter((c, s) for _, c, s in named) != collections.Counter(
      (o["color"], o["shape"]) for o in objects):
    return False
  assignment = _assign(named, objects)
  if assignment is None:
    return False
  if claims["relation"] is not None:
    i, rel, j = claims["relation"]
    if not _holds(rel, objects[assignment[i]], objects[assignment[j]]):
      return False
  if claims["region"] is not None and (
      len(objects) != 1 or shapes._region(objects[0]) != claims["region"]):
    return False
  if claims["background"] is not None and claims["background"] != shapes.background_name(scene):
    return False
  return True
