"""The `editing` suite: does an edited image show the target scene?

Objects are read from pixels by the shapes checker (`shapes_checker.detect`)
and compared with the example's structured metadata (tfjax/data/editing.py):

  edited     the instruction took effect:
               recolor  the object, in its new colour, is where it was, and
                        no object of its old colour and shape is left there
               move     the object is within MOVE_TOLERANCE of its new place
                        (so it moved the right way by most of the distance)
               add      an object of the asked colour and shape appeared
                        (anywhere: the instruction names no place)
               remove   no object of its colour and shape is left where it was
  unchanged  every other object is still there: same colour and shape,
             within POSITION_TOLERANCE of its place, same size class; and
             nothing else appeared (as many objects as the target scene)
  correct    edited and unchanged

`accuracy` reports these per edit type; `evaluate` generates the edits with
a `tfjax.generate.mixed.Generator` and scores them.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from PIL import Image

from tfjax.data import editing as editing_data
from tfjax.data import shapes
from tfjax.eval.shapes_checker import Detection, detect
from tfjax.generate.mixed import Latents

CATEGORIES = ("edited", "unchanged", "correct")
# An object that should stay put may drift this much (fraction of the side):
# well under the smallest gap between two objects' centres (2 * 0.1 + gap).
POSITION_TOLERANCE = 0.08
# A moved object must land this close to its new centre: half the move, so a
# model that leaves it in place, or moves it the wrong way, fails.
MOVE_TOLERANCE = editing_data.MOVE_DISTANCE / 2


def _dist(det: Detection, obj: dict[str, Any]) -> float:
  return float(np.hypot(det.x - obj["x"], det.y - obj["y"]))


def _take(dets: list[Detection], obj: dict[str, Any], tolerance: float,
          same_size: bool = False) -> Detection | None:
  """Removes and returns the nearest detection of obj's shape and colour within tolerance."""
  best, best_d = None, tolerance
  for i, det in enumerate(dets):
    if det.shape != obj["shape"] or det.color != obj["color"]:
      continue
    if same_size and det.size != obj["size"]:
      continue
    d = _dist(det, obj)
    if d <= best_d:
      best, best_d = i, d
  return None if best is None else dets.pop(best)


def check(image: np.ndarray, meta: dict[str, Any]) -> dict[str, bool]:
  """Verdicts {edited, unchanged, correct} for one output image.

  Args:
    image: uint8 [H, W, 3] (or float in [0, 255]) the edited image.
    meta: {"edit", "source_scene", "target_scene"} as made by
      `tfjax.data.editing.generate_split`.
  """
  edit, source, target = meta["edit"], meta["source_scene"], meta["target_scene"]
  kind = edit["type"]
  if kind not in editing_data.EDIT_TYPES:
    raise ValueError(f"unknown edit type {kind!r} in example metadata")
  dets = list(detect(image))
  n_detected = len(dets)
  # The edited object's index in the target scene (None: removed).
  target_idx = {"add": edit["object"], "remove": None}.get(kind, edit["object"])
  others = [o for i, o in enumerate(target["objects"]) if i != target_idx]
  # The others claim their detections first: they have known places.
  unchanged = all(_take(dets, o, POSITION_TOLERANCE, same_size=True) is not None
                  for o in others)
  unchanged = unchanged and n_detected == len(target["objects"])
  if kind == "recolor":
    new = target["objects"][target_idx]
    old = dict(new, color=edit["from"])
    edited = (_take(dets, new, POSITION_TOLERANCE) is not None
              and _take(dets, old, POSITION_TOLERANCE) is None)
  elif kind == "move":
    edited = _take(dets, target["objects"][target_idx], MOVE_TOLERANCE) is not None
  elif kind == "add":
    edited = _take(dets, target["objects"][target_idx], np.inf) is not None
  else:  # remove
    gone = source["objects"][edit["object"]]
    edited = _take(dets, gone, POSITION_TOLERANCE) is None
  return {"edited": bool(edited), "unchanged": bool(unchanged),
          "correct": bool(edited and unchanged)}


def accuracy(images: Iterable[np.ndarray], metas: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Fractions per category, overall and per edit type.

  Returns:
    {"accuracy": fraction correct, "per_category": {category: fraction},
     "per_type": {edit type: {category: fraction, "num": n}}, "num_examples": n}.
  """
  hits: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  counts: collections.Counter = collections.Counter()
  for image, meta in zip(images, metas):
    kind = meta["edit"]["type"]
    counts[kind] += 1
    for cat, ok in check(image, meta).items():
      hits[kind][cat] += int(ok)
  n = sum(counts.values())
  per_type = {k: {**{c: hits[k][c] / counts[k] for c in CATEGORIES}, "num": counts[k]}
              for k in editing_data.EDIT_TYPES if counts[k]}
  per_cat = {c: (sum(hits[k][c] for k in counts) / n if n else 0.0) for c in CATEGORIES}
  return {"accuracy": per_cat["correct"], "per_category": per_cat, "per_type": per_type,
          "num_examples": n}


def suite_examples(config: Any, num: int | None = None, split: str = "test",
                   seed: int | None = None) -> list[dict[str, Any]]:
  """The shapes editing examples the suite scores (deterministic in seed)."""
  n = int(num or config.editing.num_eval)
  seed = config.editing.seed if seed is None else seed
  options = shapes.SceneOptions.from_config(config.editing, "editing")
  return editing_data.generate_split(split, n, int(config.data.image_size), seed,
                                     options=options)


def generate_edits(generator: Any, examples: Sequence[dict[str, Any]], rng: jax.Array,
                   batch_size: int = 32, **generate_kw) -> np.ndarray:
  """Edited images uint8 [n, H, W, 3]: the clean input and the instruction, then one image.

  With diffusion.strength < 1 each output starts from its input image, noised
  to that fraction of the schedule (SDEdit).
  """
  out = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    # Each input is encoded once: the prompt's image, and where the sampler
    # starts when the strength is below 1 (ignored at 1).
    z = generator.encode_images(np.stack([ex["input"] for ex in chunk]))
    outs = generator.generate([[Latents(zi), ex["instruction"]] for zi, ex in zip(z, chunk)],
                              rng=jax.random.fold_in(rng, start), mode="image",
                              init_latents=z, **generate_kw)
    out.append(generator.decode_latents(np.stack([o.images[0] for o in outs])))
  return np.concatenate(out)


def pixel_error(images: np.ndarray, examples: Sequence[dict[str, Any]],
                expected: np.ndarray | None = None, inputs: np.ndarray | None = None
                ) -> dict[str, float]:
  """Mean absolute error to the expected output, in [0, 1], overall and per edit type.

  A graded companion of the pass/fail checker: it still moves when a blurry
  autoencoder keeps every image from passing. `expected` and `inputs` (the
  examples' images after an autoencoder round trip, uint8 [n, H, W, 3]) make
  the target what the model can at best produce; `copy_input` is the error of
  returning the input unchanged (the score of doing nothing).
  """
  f = lambda a: np.asarray(a, np.float32)[..., :3]
  if expected is None:
    expected = np.stack([ex["output"] for ex in examples])
  if inputs is None:
    inputs = np.stack([ex["input"] for ex in examples])
  err = np.mean(np.abs(f(images) - f(expected)), axis=(1, 2, 3)) / 255.0
  copy = np.mean(np.abs(f(inputs) - f(expected)), axis=(1, 2, 3)) / 255.0
  kinds = np.asarray([ex["meta"]["edit"]["type"] for ex in examples])
  out = {"all": float(err.mean()), "copy_input": float(copy.mean())}
  for k in editing_data.EDIT_TYPES:
    if (kinds == k).any():
      out[k] = float(err[kinds == k].mean())
      out[f"{k}_copy_input"] = float(copy[kinds == k].mean())
  return out


def _round_trip(generator: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([generator.decode_latents(generator.encode_images(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def evaluate(generator: Any, examples: Sequence[dict[str, Any]], rng: jax.Array,
             batch_size: int = 32, **generate_kw) -> dict[str, Any]:
  """Generates every example's edit and scores it; adds pixel error, seconds, images."""
  t0 = time.time()
  images = generate_edits(generator, examples, rng, batch_size, **generate_kw)
  result = accuracy(images, [ex["meta"] for ex in examples])
  result["pixel_error"] = pixel_error(images, examples)
  if getattr(generator, "vae", None) is not None:
    # What the autoencoder lets any model reach: the expected outputs after
    # an encode/decode round trip, scored the same way.
    expected = _round_trip(generator, np.stack([ex["output"] for ex in examples]), batch_size)
    inputs = _round_trip(generator, np.stack([ex["input"] for ex in examples]), batch_size)
    result["pixel_error_vs_autoencoded"] = pixel_error(images, examples, expected, inputs)
    ceiling = accuracy(expected, [ex["meta"] for ex in examples])
    result["autoencoder_ceiling"] = {k: ceiling[k] for k in ("accuracy", "per_category",
                                                             "per_type")}
  result["seconds"] = round(time.time() - t0, 1)
  result["images"] = images
  return result


def suite(gen: Any, num_samples: int, *, seed: int = 0, batch_size: int = 8,
          out_dir: str | None = None) -> dict[str, Any]:
  """`tfjax-eval --suite=editing`: the shapes editing test split, scored per edit type."""
  examples = suite_examples(gen.config, num_samples, seed=seed)
  result = evaluate(gen, examples, jax.random.key(seed), batch_size)
  images = result.pop("images")
  if out_dir:
    save_grid(examples[:8], images[:8], os.path.join(out_dir, "editing_samples.png"))
  result["editing_accuracy"] = result["accuracy"]
  result["examples"] = [{"instruction": ex["instruction"], "type": ex["meta"]["edit"]["type"],
                         "verdicts": check(im, ex["meta"])}
                        for ex, im in zip(examples[:8], images[:8])]
  return result


def save_grid(examples: Sequence[dict[str, Any]], images: np.ndarray, path: str) -> None:
  """Rows of input | expected | generated."""
  if not len(examples):
    return
  rows = [np.concatenate([ex["input"], ex["output"], im[..., :3]], axis=1)
          for ex, im in zip(examples, images)]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8)).save(path)


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A markdown table: one row per (label, edit type), columns the categories."""
  lines = ["| model | edit | n | edited | unchanged | correct |", "|---|---|---|---|---|---|"]
  for label, res in results.items():
    rows = list(res["per_type"].items()) + [("all", {**res["per_category"],
                                                     "num": res["num_examples"]})]
    for kind, r in rows:
      lines.append(f"| {label} | {kind} | {r['num']} | {r['edited']:.3f} | "
                   f"{r['unchanged']:.3f} | {r['correct']:.3f} |")
  return "\n".join(lines)
