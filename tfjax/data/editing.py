"""Image editing data: (input image, instruction, output image) examples.

The built-in **shapes editing** set derives each example from a shapes scene
(`tfjax.data.shapes`) by one of four edits, keeping the target scene as
structured metadata so a pixel checker can verify a generated output:

  recolor  "make the circle blue"            one object changes colour
  move     "move the red square to the left" one object moves MOVE_DISTANCE
  add      "add a small green triangle"      one object appears
  remove   "remove the yellow circle"        one object disappears

An example is a dict

  {"id": str, "input": uint8 [H, W, 3], "output": uint8 [H, W, 3],
   "instruction": str, "meta": {"edit": {...}, "source_scene": scene,
                                "target_scene": scene}}

with `edit` = {"type", "object" (index into the source scene's objects for
recolor/move/remove, into the target's for add), and "from"/"to"
(recolor) or "direction" (move)}.

Splits are disjoint in scenes: a train example's source and target scenes
both belong to the shapes train split (`shapes.split_of`), a validation/test
example's source belongs to that split and its target is not a train scene.
So no held-out scene, input or output, is ever seen when fine-tuning.

The **folder format** holds users' own editing data:

  DIR/{split}.jsonl   one example per line: {"input": "images/a.png",
                      "output": "images/a_edited.png", "instruction": "...",
                      "id": optional, "meta": optional (as above)}
  DIR/images/...      image files, paths relative to DIR

The **document layout** of an example (packing.py conventions) is

  BOS BOI <input patches> EOI <instruction> BOI <output patches> EOI EOS

where the input image is clean (no noise, no diffusion loss: it is the
condition) and the output image is diffused as any caption-first image.
"""
from __future__ import annotations

import copy
import io
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from tfjax.data import packing, shapes
from tfjax.files import utf8_lines

EDIT_TYPES = ("recolor", "move", "add", "remove")
MOVE_DISTANCE = 0.25          # fraction of the image side an object moves
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MAX_OBJECTS = 4               # an add never makes a scene larger than this
JSONL_KEYS = ("input", "output", "instruction")
MAX_EDIT_TRIES = 20           # edits tried on one source scene before drawing another

Scene = dict[str, Any]


# ------------------------------------------------------------------- edits --
def referring_expression(index: int, objects: Sequence[dict[str, Any]],
                         rng: np.random.Generator) -> str | None:
  """A phrase naming exactly object `index` ("the circle", "the red circle").

  None when the object's colour and shape do not single it out.
  """
  o = objects[index]
  same_shape = [p for p in objects if p["shape"] == o["shape"]]
  same_both = [p for p in same_shape if p["color"] == o["color"]]
  if len(same_both) > 1:
    return None
  if len(same_shape) == 1 and rng.random() < 0.5:
    return f"the {o['shape']}"
  return f"the {o['color']} {o['shape']}"


def _fits(obj: dict[str, Any], others: Sequence[dict[str, Any]]) -> bool:
  """Inside the image (with a margin) and clear of every other object."""
  r = shapes.SIZES[obj["size"]]
  inside = all(r + 0.01 <= obj[k] <= 1 - r - 0.01 for k in ("x", "y"))
  return inside and all(
      np.hypot(obj["x"] - p["x"], obj["y"] - p["y"]) > r + shapes.SIZES[p["size"]] + shapes._GAP
      for p in others)


def _referable(objs: Sequence[dict[str, Any]], rng: np.random.Generator
               ) -> Iterator[tuple[int, str]]:
  """(index, referring expression) of the objects a phrase can single out, in random order.

  Lazy: rng is drawn in the order of the loop written out in place (callers draw
  between objects, and stop at the first that works), so the generated set is unchanged.
  """
  for i in rng.permutation(len(objs)):
    ref = referring_expression(int(i), objs, rng)
    if ref is not None:
      yield int(i), ref


def _edit_recolor(scene: Scene, rng: np.random.Generator,
                  options: shapes.SceneOptions):
  objs = scene["objects"]
  for i, ref in _referable(objs, rng):
    old = objs[i]["color"]
    new = str(rng.choice([c for c in shapes.COLORS if c != old]))
    target = copy.deepcopy(scene)
    target["objects"][i]["color"] = new
    edit = {"type": "recolor", "object": int(i), "from": old, "to": new}
    return f"make {ref} {new}", target, edit
  return None


def _edit_move(scene: Scene, rng: np.random.Generator,
               options: shapes.SceneOptions):
  objs = scene["objects"]
  for i, ref in _referable(objs, rng):
    others = [o for j, o in enumerate(objs) if j != i]
    for direction in rng.permutation(list(DIRECTIONS)):
      dx, dy = DIRECTIONS[str(direction)]
      moved = dict(objs[i], x=round(objs[i]["x"] + dx * MOVE_DISTANCE, 3),
                   y=round(objs[i]["y"] + dy * MOVE_DISTANCE, 3))
      if not _fits(moved, others):
        continue
      target = copy.deepcopy(scene)
      target["objects"][i] = moved
      where = {"left": "to the left", "right": "to the right"}.get(str(direction), direction)
      edit = {"type": "move", "object": int(i), "direction": str(direction)}
      return f"move {ref} {where}", target, edit
  return None


def _edit_add(scene: Scene, rng: np.random.Generator,
              options: shapes.SceneOptions):
  objs = scene["objects"]
  if len(objs) >= min(MAX_OBJECTS, options.max_objects):
    return None
  for _ in range(50):
    size = str(rng.choice(list(options.sizes)))
    r = shapes.SIZES[size]
    x, y = (float(v) for v in np.round(rng.uniform(r + 0.01, 1 - r - 0.01, size=2), 3))
    new = dict(shape=str(rng.choice(shapes.SHAPES)), color=str(rng.choice(list(shapes.COLORS))),
               size=size, x=x, y=y)
    if not _fits(new, objs):
      continue
    target = copy.deepcopy(scene)
    target["objects"].append(new)
    words = ([size] if rng.random() < 0.5 else []) + [new["color"], new["shape"]]
    edit = {"type": "add", "object": len(objs)}
    return "add a " + " ".join(words), target, edit
  return None


def _edit_remove(scene: Scene, rng: np.random.Generator,
                 options: shapes.SceneOptions):
  objs = scene["objects"]
  if len(objs) < 2:  # an empty result scene is never seen in pretraining
    return None
  for i, ref in _referable(objs, rng):
    target = copy.deepcopy(scene)
    del target["objects"][i]
    return f"remove {ref}", target, {"type": "remove", "object": int(i)}
  return None


_EDITORS = {"recolor": _edit_recolor, "move": _edit_move, "add": _edit_add,
            "remove": _edit_remove}


def make_edit(scene: Scene, kind: str, rng: np.random.Generator,
              options: shapes.SceneOptions = shapes.SceneOptions()
              ) -> tuple[str, Scene, dict[str, Any]] | None:
  """(instruction, target scene, edit metadata), or None if `kind` cannot apply.

  An add keeps the result within `options` (object count and size classes).
  """
  if kind not in _EDITORS:
    raise ValueError(f"unknown edit type {kind!r}; known: {EDIT_TYPES}")
  return _EDITORS[kind](scene, rng, options)


def _split_ok(split: str, source: Scene, target: Scene) -> bool:
  if split == "train":
    return shapes.split_of(source) == "train" and shapes.split_of(target) == "train"
  return shapes.split_of(source) == split and shapes.split_of(target) != "train"


def generate_split(split: str, num: int, image_size: int, seed: int = 0,
                   with_images: bool = True,
                   options: shapes.SceneOptions = shapes.SceneOptions()) -> list[dict[str, Any]]:
  """`num` shapes editing examples of `split`, edit types in equal turns.

  Source and target scenes stay within `options` (config keys
  editing.max_objects and editing.object_sizes).

  Deterministic in (split, num, seed); example i of a larger `num` equals
  example i of a smaller one.
  """
  if split not in shapes.SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {shapes.SPLITS}")
  rng = np.random.default_rng([seed, 200 + shapes.SPLITS.index(split)])
  out = []
  while len(out) < num:
    kind = EDIT_TYPES[len(out) % len(EDIT_TYPES)]
    scene = options.random_scene(rng)
    # Cheap test first: most scenes are rejected for the held-out splits.
    if shapes.split_of(scene) != split:
      continue
    # Several tries per accepted source: a held-out target is rare (~10%).
    for _ in range(MAX_EDIT_TRIES):
      made = make_edit(scene, kind, rng, options)
      if made is None or _split_ok(split, scene, made[1]):
        break
    if made is None or not _split_ok(split, scene, made[1]):
      continue
    instruction, target, edit = made
    ex = {"id": f"edit-{split}-{len(out):06d}", "instruction": instruction,
          "meta": {"edit": edit, "source_scene": scene, "target_scene": target}}
    if with_images:
      ex["input"] = shapes.render(scene, image_size)
      ex["output"] = shapes.render(target, image_size)
    out.append(ex)
  return out


# ------------------------------------------------------------ folder format --
def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def write_folder(examples: Sequence[dict[str, Any]], root: str, split: str) -> str:
  """Writes examples in the folder format; returns the JSONL path."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  path = os.path.join(root, f"{split}.jsonl")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for ex in examples:
      line = {"id": ex["id"], "instruction": ex["instruction"]}
      for side in ("input", "output"):
        rel = os.path.join("images", f"{ex['id']}_{side}.png")
        with open(os.path.join(root, rel), "wb") as img:
          img.write(_png(ex[side]))
        line[side] = rel
      if "meta" in ex:
        line["meta"] = ex["meta"]
      f.write(json.dumps(line) + "\n")
  os.replace(tmp, path)  # a half-written split never looks complete
  return path


class FolderSource:
  """Random-access editing examples of one split of a folder-format directory.

  Items: {"id", "input": bytes, "output": bytes, "instruction", "meta": JSON
  str ("" when absent)}; images stay encoded (decoded by the cache builder).
  Raises naming the file and line of any malformed entry.
  """

  def __init__(self, root: str, split: str):
    self.root, self.path = root, os.path.join(root, f"{split}.jsonl")
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"editing folder {root} has no {split}.jsonl (config key "
                              f"editing.source)")
    self.lines = []
    for n, text in utf8_lines(self.path):
      if not text.strip():
        continue
      where = f"{self.path}:{n}"
      try:
        line = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
      missing = [k for k in JSONL_KEYS if not isinstance(line, dict) or k not in line]
      if missing:
        raise ValueError(f"{where}: missing keys {missing} (each line needs {JSONL_KEYS})")
      if not str(line["instruction"]).strip():
        raise ValueError(f"{where}: empty instruction")
      for side in ("input", "output"):
        if not os.path.exists(os.path.join(root, line[side])):
          raise FileNotFoundError(f"{where}: {side} image {line[side]} not found under {root}")
      line.setdefault("id", f"{split}-{n}")
      self.lines.append(line)

  def __len__(self) -> int:
    return len(self.lines)

  def __getitem__(self, i: int) -> dict[str, Any]:
    line = self.lines[i]
    out = {"id": str(line["id"]), "instruction": str(line["instruction"]),
           "meta": json.dumps(line["meta"]) if line.get("meta") else ""}
    for side in ("input", "output"):
      with open(os.path.join(self.root, line[side]), "rb") as f:
        out[side] = f.read()
    return out


# ------------------------------------------------------------------ layout --
def editing_document(instruction_ids: Sequence[int], input_latents: np.ndarray,
                     output_latents: np.ndarray, patches_per_image: int) -> packing.Doc:
  """BOS BOI input EOI instruction BOI output EOI EOS, the input image clean.

  `doc["clean"]` (bool per image, parallel to `doc["images"]`) becomes the
  Batch's `image_clean` when packed. The input precedes its "caption" (the
  instruction) but, being clean, is never noised, so that flag is inert.
  """
  doc = packing.make_document([("image", np.asarray(input_latents, np.float32), True),
                               ("text", list(instruction_ids)),
                               ("image", np.asarray(output_latents, np.float32), False)],
                              patches_per_image)
  doc["clean"] = [True, False]
  return doc


def document_length(num_instruction_tokens: int, patches_per_image: int) -> int:
  """Positions an editing document takes."""
  return 2 + 2 * packing.image_positions(patches_per_image) + num_instruction_tokens
