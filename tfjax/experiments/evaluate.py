"""One evaluation for every family, so Transfusion and Chameleon runs compare.

  shapes_accuracy         text->image on held-out captions, scored by the
                          shapes pixel checker (tfjax/eval/shapes_checker.py)
  caption_cider           image->text on held-out images, CIDEr-D against the
                          reference caption (tfjax/eval/cider.py)
  caption_scene_accuracy  fraction of generated captions naming every object's
                          colour and shape
  perplexity              text perplexity on the held-out text-only split
                          (same tokenizer, same documents for every family)

A family plugs in through a generator with `text_to_image(captions, rng) ->
uint8 [b, H, W, 3]` and `image_to_text(images, rng) -> list[str]`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

METRICS = ("shapes_accuracy", "caption_cider", "caption_scene_accuracy", "perplexity")


def held_out(config: ml_collections.ConfigDict, num: int, split: str = "validation"
             ) -> list[dict[str, Any]]:
  """Up to `num` held-out {"image" uint8, "caption", "scene" dict|None} records."""
  from tfjax.data import sources
  from tfjax.data.latents import decode_image
  src = sources.image_source(config, config.data.dir, split)
  out = []
  for i in range(min(num, len(src))):
    rec = src[i]
    cap, scene = rec["caption"], rec.get("scene", "")
    scene = scene.decode() if isinstance(scene, bytes) else scene
    out.append({"image": decode_image(rec["image"]),
                "caption": cap.decode() if isinstance(cap, bytes) else str(cap),
                "scene": json.loads(scene) if scene else None})
  return out


def names_every_object(caption: str, scene: dict[str, Any] | None) -> bool | None:
  """Does a caption name each object's colour and shape? None without a scene."""
  if not scene:
    return None
  words = caption.lower().replace(",", " ").replace(".", " ").split()
  return all(o["color"] in words and o["shape"] in words for o in scene["objects"])


def text_perplexity(config: ml_collections.ConfigDict, params: Any,
                    max_batches: int = 8) -> dict[str, float]:
  """Perplexity on the text-only validation split (images off for every family)."""
  from tfjax.batch import Batch
  from tfjax.data import make_eval_iterator
  from tfjax.eval.perplexity import perplexity
  from tfjax.model import Transfusion
  text_cfg = config.copy_and_resolve_references()
  text_cfg.data.image_text_source = "none"
  it = make_eval_iterator(text_cfg, text_cfg.data.dir, process_index=0, process_count=1)
  batches = (Batch.from_dict({k: jax.numpy.asarray(v) for k, v in b.items()}) for b in it)
  return perplexity(Transfusion(config.model), params, batches, max_batches=max_batches)


def evaluate(config: ml_collections.ConfigDict, params: Any, generator: Any, out_dir: str,
             num_samples: int = 32, perplexity_batches: int = 8, seed: int = 0,
             batch: int = 16) -> dict[str, Any]:
  """Runs the four metrics; writes out_dir/eval.json and sample PNGs; returns the dict."""
  from PIL import Image
  from tfjax.eval.cider import cider_d
  from tfjax.eval.shapes_checker import accuracy
  os.makedirs(out_dir, exist_ok=True)
  held = held_out(config, num_samples)
  rng = jax.random.key(seed)
  result: dict[str, Any] = {"num_samples": len(held)}
  t0 = time.time()
  images, captions = [], []
  for i in range(0, len(held), batch):
    part = held[i:i + batch]
    images.append(generator.text_to_image([h["caption"] for h in part],
                                          jax.random.fold_in(rng, 2 * i)))
    captions += generator.image_to_text([h["image"] for h in part],
                                        jax.random.fold_in(rng, 2 * i + 1))
  images = np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
  result["sample_seconds"] = round(time.time() - t0, 2)
  scenes = [h["scene"] for h in held]
  if held and all(s is not None for s in scenes):
    scores = accuracy(images, scenes)
    result["shapes_accuracy"] = scores["accuracy"]
    result["shapes_per_category"] = scores["per_category"]
    result["caption_scene_accuracy"] = float(np.mean(
        [names_every_object(c, s) for c, s in zip(captions, scenes)]))
  if held:
    result["caption_cider"] = cider_d(captions, [[h["caption"]] for h in held])[0]
  result["captions"] = [{"reference": h["caption"], "generated": c}
                        for h, c in zip(held[:8], captions[:8])]
  if len(images):
    grid = np.concatenate([np.concatenate(list(images[r:r + 8]), axis=1)
                           for r in range(0, min(len(images), 32) - 7, 8)] or [images[0]], axis=0)
    Image.fromarray(grid).save(os.path.join(out_dir, "t2i_grid.png"))
  if perplexity_batches > 0:
    result.update({k: v for k, v in text_perplexity(config, params, perplexity_batches).items()
                   if k in ("perplexity", "nll_per_token", "num_tokens")})
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2, default=float)
  log.info("eval %s: %s", out_dir, {k: result.get(k) for k in METRICS})
  return result


class TransfusionSampler:
  """The Transfusion generator in the evaluation's two-call interface."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer: Any, vae: Any):
    from tfjax.generate.mixed import Generator
    self.gen = Generator(config, params, tokenizer, vae)

  def text_to_image(self, captions, rng) -> np.ndarray:
    return self.gen.decode_latents(self.gen.text_to_image(list(captions), rng))

  def image_to_text(self, images, rng) -> list[str]:
    return self.gen.image_to_text(list(images), rng)
