"""A pixel checker for shapes scenes: a GenEval-style score without a detector.

An image is read back into objects by colour: every pixel is assigned to the
nearest shapes colour (or to none when it is far from all of them and close to
the background), each colour's pixels are split into connected components, and
a component large enough to be an object is classified as circle, square or
triangle by how it tapers towards the top and how far it reaches along the
diagonals (measures that survive a VAE decode's blur and rounded corners),
with its size class from its area and its centre from its centroid.

The detected objects are then compared with the scene, per category:
  presence  every scene object has a detection of its shape and colour
  count     as many detections as scene objects
  color     the multiset of detected colours equals the scene's
  shape     the multiset of detected shapes equals the scene's
  position  for every pair of scene objects, their matched detections lie in
            the same order along the axis the scene separates them most
            (only scenes with two or more objects)
  size      each matched detection has the scene object's size class
An image is `correct` when presence, count and position (where it applies)
all hold: the question a caption like "a red circle above a blue square" asks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from tfjax.data import shapes

CATEGORIES = ("presence", "count", "color", "shape", "position", "size", "correct")

# A pixel farther than this (RGB Euclidean) from its nearest shapes colour is
# not an object pixel (shapes colours are > 140 apart).
_COLOR_RADIUS = 100.0
# Smallest object a scene holds is a small triangle: (3 sqrt(3) / 4) r^2 with
# r = 0.1 * side, about 1.3% of the image. Components under a third of that
# are speckle.
_MIN_AREA_FRACTION = 0.0043
_NAMES = tuple(shapes.COLORS)
_RGB = np.asarray([shapes.COLORS[n] for n in _NAMES], np.float32)


@dataclasses.dataclass(frozen=True)
class Detection:
  shape: str
  color: str
  size: str
  x: float  # centre, fraction of the image width
  y: float  # centre, fraction of the image height (grows down)
  area: int


# Shape thresholds (see _fit_shape), midway between the shapes' values as
# measured on ground truth and on VAE reconstructions of it.
_TAPER = 0.7
_SQUARENESS = 1.18
# Area of each shape as a multiple of its circumradius squared.
_AREA_PER_R2 = {"circle": np.pi, "square": 2.0, "triangle": 3.0 * np.sqrt(3.0) / 4.0}


def _fit_shape(component: np.ndarray) -> tuple[str, float, float, float]:
  """(shape, circumradius, cx, cy) in pixels of one object's pixel mask.

  Two measurements that survive the blur and rounded corners of a VAE decode:
    taper     pixels in the top third of the box / pixels in the bottom third:
              an upward triangle is about 0.2, circles and squares about 1;
    diagonal  extent along the diagonals / extent along the axes: an
              axis-aligned square is sqrt(2) = 1.41, a circle 1.0 (a
              triangle, already caught, about 1.07).
  The radius comes from the area given the shape; for all three shapes the
  centroid is the circumcentre, the scene's (x, y).
  """
  ys, xs = np.nonzero(component)
  area = float(len(xs))
  cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
  height = ys.max() - ys.min() + 1
  top = np.count_nonzero(ys < ys.min() + height / 3)
  bottom = np.count_nonzero(ys > ys.max() - height / 3)
  axis_extent = (xs.max() - xs.min() + ys.max() - ys.min()) / 2 + 1
  s, d = xs + ys, xs - ys
  diag_extent = (s.max() - s.min() + d.max() - d.min()) / 2 / np.sqrt(2) + np.sqrt(2)
  if top < _TAPER * max(bottom, 1):
    shape = "triangle"
  elif diag_extent >= _SQUARENESS * axis_extent:
    shape = "square"
  else:
    shape = "circle"
  return shape, float(np.sqrt(area / _AREA_PER_R2[shape])), cx, cy


def _nearest_size(radius_fraction: float) -> str:
  return min(shapes.SIZES, key=lambda s: abs(shapes.SIZES[s] - radius_fraction))


def background_color(image: np.ndarray) -> np.ndarray:
  """float32[3]: the median colour of the image's one-pixel border."""
  px = image.astype(np.float32)[..., :3]
  border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
  return np.median(border, axis=0)


def color_labels(image: np.ndarray) -> np.ndarray:
  """int[h, w]: index into the shapes colours of each pixel, -1 for none.

  The background colour competes with the object colours, so a blurred edge
  pixel goes to whichever side it is nearer: object extents stay unbiased
  after a VAE decode, which is what the shape fit needs.
  """
  px = image.astype(np.float32)[..., :3]
  palette = np.concatenate([_RGB, background_color(image)[None]])
  dist = np.linalg.norm(px[:, :, None, :] - palette[None, None], axis=-1)  # [h, w, colours + 1]
  nearest = np.argmin(dist, axis=-1)
  ok = (nearest < len(_RGB)) & (np.min(dist, axis=-1) <= _COLOR_RADIUS)
  return np.where(ok, nearest, -1)


def detect(image: np.ndarray) -> list[Detection]:
  """Objects found in `image` (uint8 or float in [0, 255], `[h, w, 3]`)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] < 3:
    raise ValueError(f"expected an [h, w, 3] image, got shape {image.shape}")
  h, w = image.shape[:2]
  labels = color_labels(image)
  min_area = max(4, int(_MIN_AREA_FRACTION * h * w))
  found = []
  for ci, name in enumerate(_NAMES):
    components, n = ndimage.label(labels == ci)
    if n == 0:
      continue
    areas = np.bincount(components.ravel(), minlength=n + 1)
    for k in range(1, n + 1):
      if areas[k] < min_area:
        continue
      shape, r, cx, cy = _fit_shape(ndimage.binary_fill_holes(components == k))
      found.append(Detection(shape=shape, color=name, size=_nearest_size(r / max(h, w)),
                             x=cx / w, y=cy / h, area=int(areas[k])))
  return found


def _match(scene_objects: Sequence[dict[str, Any]],
           detections: Sequence[Detection]) -> list[Detection | None]:
  """Each scene object's detection of the same shape and colour, nearest first."""
  used: set[int] = set()
  out: list[Detection | None] = []
  for obj in scene_objects:
    best, best_d = None, np.inf
    for i, det in enumerate(detections):
      if i in used or det.shape != obj["shape"] or det.color != obj["color"]:
        continue
      d = np.hypot(det.x - obj["x"], det.y - obj["y"])
      if d < best_d:
        best, best_d = i, d
    if best is not None:
      used.add(best)
    out.append(None if best is None else detections[best])
  return out


def _same_order(a: dict[str, Any], b: dict[str, Any], da: Detection, db: Detection) -> bool:
  dx, dy = a["x"] - b["x"], a["y"] - b["y"]
  if abs(dy) >= abs(dx):
    return np.sign(da.y - db.y) == np.sign(dy)
  return np.sign(da.x - db.x) == np.sign(dx)


def score(image: np.ndarray, scene: dict[str, Any]) -> dict[str, bool | None]:
  """Per-category verdicts for one image against its scene (None = not applicable)."""
  objs = scene["objects"]
  dets = detect(image)
  matches = _match(objs, dets)
  presence = all(m is not None for m in matches)
  result: dict[str, bool | None] = {
      "presence": presence,
      "count": len(dets) == len(objs),
      "color": sorted(d.color for d in dets) == sorted(o["color"] for o in objs),
      "shape": sorted(d.shape for d in dets) == sorted(o["shape"] for o in objs),
      "size": presence and all(m.size == o["size"] for m, o in zip(matches, objs)),
      "position": None,
  }
  if len(objs) >= 2:
    result["position"] = presence and all(
        _same_order(objs[i], objs[j], matches[i], matches[j])
        for i in range(len(objs)) for j in range(i + 1, len(objs)))
  result["correct"] = bool(result["presence"] and result["count"]
                           and result["position"] in (None, True))
  return result


def accuracy(images: Iterable[np.ndarray], scenes: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Fraction correct per category over a set of images and their scenes.

  Returns:
    {"accuracy": fraction correct, "per_category": {category: fraction over
    the images where it applies}, "counts": {category: images it applies to},
    "num_images": n}.
  """
  totals = {c: 0 for c in CATEGORIES}
  hits = {c: 0 for c in CATEGORIES}
  n = 0
  for image, scene in zip(images, scenes):
    n += 1
    for cat, verdict in score(image, scene).items():
      if verdict is None:
        continue
      totals[cat] += 1
      hits[cat] += int(bool(verdict))
  per_cat = {c: (hits[c] / totals[c] if totals[c] else None) for c in CATEGORIES}
  return {"accuracy": per_cat["correct"] if n else 0.0, "per_category": per_cat,
          "counts": totals, "num_images": n}
