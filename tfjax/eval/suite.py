"""The evaluation suite: shapes accuracy, captioning, perplexity (+ FID / CLIP).

  shapes      captions of held-out (test split) scenes -> images -> pixel
              checker against each scene, per category (GenEval-style)
  captioning  held-out images -> captions -> CIDEr-D against five reference
              captions per scene, and exact-scene accuracy of the caption
  perplexity  held-out text: the shapes test corpus, or the configured text
              source's validation batches
  editing     shapes edits (input image + instruction -> image), scored by
              `tfjax.eval.editing` (only when asked for: not part of "all")
  fid, clip   only with user-supplied feature extractors; else "skipped"

Headline keys of the result: shapes_accuracy, caption_cider,
caption_scene_accuracy, perplexity (None when that part did not run).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from tfjax import config as config_lib
from tfjax.batch import Batch, empty_batch
from tfjax.config import patches_per_image
from tfjax.data import shapes
from tfjax.data.packing import make_document, split_text
from tfjax.data.pipeline import make_eval_iterator
from tfjax.eval import caption_scene, cider, clip_score, editing, fid, shapes_checker
from tfjax.eval import perplexity as perplexity_lib
from tfjax.export import load_pretrained
from tfjax.generate.sampling import SamplingParams

SUITES = ("shapes", "captioning", "perplexity", "editing", "all")  # all: not editing
HEADLINE = ("shapes_accuracy", "caption_cider", "caption_scene_accuracy", "perplexity")
NUM_REFERENCES = 5


def _batches(n: int, size: int):
  for i in range(0, n, size):
    yield slice(i, min(n, i + size))


def _scene_options(gen: Any) -> shapes.SceneOptions:
  """The scenes the model was trained on (data.max_objects, data.object_sizes)."""
  return shapes.SceneOptions.from_config(gen.config.data)


def shapes_eval(gen: Any, num_samples: int, *, seed: int = 0, batch_size: int = 8,
                out_dir: str | None = None) -> dict[str, Any]:
  """Text-to-image on held-out captions, scored by the pixel checker."""
  size = int(gen.config.data.image_size)
  _, scenes, captions = shapes.generate_split("test", num_samples, size, seed=seed,
                                              options=_scene_options(gen))
  images = []
  rng = jax.random.key(seed)
  for sl in _batches(num_samples, batch_size):
    rng, key = jax.random.split(rng)
    latents = gen.text_to_image(captions[sl], key)
    images.append(gen.decode_latents(latents))
  images = np.concatenate(images)
  result = shapes_checker.accuracy(images, scenes)
  if out_dir:
    _save_grid(images[:16], os.path.join(out_dir, "shapes_samples.png"))
  return {"shapes_accuracy": result["accuracy"], "per_category": result["per_category"],
          "num_images": result["num_images"],
          "examples": [{"caption": c, "verdicts": shapes_checker.score(im, s)}
                       for c, im, s in zip(captions[:4], images[:4], scenes[:4])]}


def captioning_eval(gen: Any, num_samples: int, *, seed: int = 0,
                    batch_size: int = 8) -> dict[str, Any]:
  """Image-to-text on held-out images: CIDEr-D and exact-scene accuracy."""
  size = int(gen.config.data.image_size)
  images, scenes, _ = shapes.generate_split("test", num_samples, size, seed=seed,
                                            options=_scene_options(gen))
  ref_rng = np.random.default_rng([seed, 7])
  references = [sorted({shapes.caption(s, ref_rng) for _ in range(NUM_REFERENCES * 3)})
                [:NUM_REFERENCES] for s in scenes]
  greedy = SamplingParams(temperature=0.0)
  outputs: list[str] = []
  rng = jax.random.key(seed)
  for sl in _batches(num_samples, batch_size):
    rng, key = jax.random.split(rng)
    outputs += gen.image_to_text(list(images[sl]), key, sampling=greedy)
  score, _ = cider.cider_d(outputs, references)
  accurate = [caption_scene.scene_accurate(c, s) for c, s in zip(outputs, scenes)]
  return {"caption_cider": score, "caption_scene_accuracy": float(np.mean(accurate)),
          "num_images": num_samples,
          "examples": [{"generated": o, "references": r[:2]}
                       for o, r in zip(outputs[:4], references[:4])]}


def shapes_text_batches(gen: Any, num_docs: int, seed: int = 0):
  """Held-out shapes text, one document per row (BOS ... EOS), as Batches."""
  if gen.tokenizer is None:
    raise ValueError("perplexity needs the model's tokenizer (none found with the model)")
  c = gen.config
  seq_len, bsz = int(c.data.seq_len), int(c.data.batch_size)
  latent = (c.model.latent_size, c.model.latent_size, c.model.latent_channels)
  docs = []
  for text in shapes.text_corpus("test", num_docs, seed=seed, options=_scene_options(gen)):
    for chunk in split_text(gen.tokenizer.encode(text), seq_len):
      docs.append(make_document([("text", chunk)], patches_per_image(c.model)))
  for start in range(0, len(docs), bsz):
    b = empty_batch(bsz, seq_len, 1, latent)
    for row, doc in enumerate(docs[start:start + bsz]):
      n = len(doc["tokens"])
      b["tokens"][row, :n] = doc["tokens"]
      b["segment_ids"][row, :n] = 1
      b["positions"][row, :n] = np.arange(n)
      b["text_targets"][row, :n - 1] = doc["tokens"][1:]
      b["text_loss_mask"][row, :n - 1] = doc["scored"][:n - 1]
    yield Batch.from_dict(b)


def perplexity_eval(gen: Any, num_samples: int, *, seed: int = 0) -> dict[str, Any]:
  c = gen.config
  if c.data.text_source == "shapes_text":
    batches, source = shapes_text_batches(gen, num_samples, seed), "shapes_text/test"
  else:
    n = max(1, num_samples // int(c.data.batch_size))
    batches = (Batch.from_dict(b) for b in make_eval_iterator(c, c.data.dir, num_batches=n))
    source = f"{c.data.text_source}/validation"
  result = perplexity_lib.perplexity(gen.model, gen.params, batches)
  return {"perplexity": result["perplexity"], "nll_per_token": result["nll_per_token"],
          "num_tokens": result["num_tokens"], "source": source}


def run(gen: Any, suite: str = "all", num_samples: int = 64, *, seed: int = 0,
        batch_size: int = 8, out_dir: str | None = None, inception: str | None = None,
        clip: str | None = None) -> dict[str, Any]:
  """Runs one part of the suite (or all) and returns the results dict."""
  if suite not in SUITES:
    raise ValueError(f"--suite must be one of {SUITES}, got {suite!r}")
  parts = ("shapes", "captioning", "perplexity") if suite == "all" else (suite,)
  results: dict[str, Any] = {k: None for k in HEADLINE}
  results.update(suite=suite, num_samples=num_samples, seed=seed, details={}, seconds={})
  for part in parts:
    t = time.time()
    if part == "shapes":
      d = shapes_eval(gen, num_samples, seed=seed, batch_size=batch_size, out_dir=out_dir)
    elif part == "captioning":
      d = captioning_eval(gen, num_samples, seed=seed, batch_size=batch_size)
    elif part == "editing":  # tfjax/eval/editing.py: per edit type, from pixels
      d = editing.suite(gen, num_samples, seed=seed, batch_size=batch_size, out_dir=out_dir)
      results["editing_accuracy"] = d["editing_accuracy"]
    else:
      d = perplexity_eval(gen, num_samples, seed=seed)
    for k in HEADLINE:
      if k in d:
        results[k] = d[k]
    results["details"][part] = d
    results["seconds"][part] = round(time.time() - t, 2)
  results["fid"] = fid.maybe_fid(gen, inception, num_samples, seed=seed)
  results["clip_score"] = clip_score.maybe_clip_score(gen, clip, num_samples, seed=seed)
  return results


def apply_overrides(config: Any, overrides: Sequence[str]) -> None:
  """tfjax-eval --override: KEY=VALUE pairs set on a loaded model's config, in
  place (`tfjax.config.apply_overrides`). `model.*` keys are refused: the
  weights fix the architecture. Evaluating a model on other held-out data or
  sampling settings (e.g. editing.max_objects=2, diffusion.cfg_scale=3) needs
  no retraining."""
  for item in overrides:
    if item.startswith("model."):
      raise ValueError(f"--override {item.split('=', 1)[0]}: model keys are fixed by the weights")
  config_lib.apply_overrides(config, overrides, where="--override")


def evaluate_to_files(model_dir: str, suite: str, num_samples: int, json_path: str, seed: int = 0,
             batch_size: int = 8, inception: str | None = None, clip: str | None = None,
             overrides: Sequence[str] = ()) -> dict:
  """What `tfjax-eval` does: load the model, run, write JSON and a Markdown table."""
  gen = load_pretrained(model_dir)
  apply_overrides(gen.config, overrides)
  out_dir = os.path.dirname(os.path.abspath(json_path))
  results = run(gen, suite, num_samples, seed=seed, batch_size=batch_size,
                          out_dir=out_dir, inception=inception, clip=clip)
  results["model"] = os.path.abspath(model_dir)
  results["overrides"] = list(overrides)
  os.makedirs(out_dir, exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2, default=str)
  table = markdown_table(results)
  with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
    f.write(table)
  return results


def markdown_table(results: dict[str, Any]) -> str:
  """The headline numbers (and per-category shapes accuracy) as Markdown."""
  def fmt(v):
    if v is None:
      return "not run"
    if isinstance(v, dict):
      return v.get("status", "") if "value" not in v else fmt(v["value"])
    return f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| metric | value |", "|---|---|"]
  for k in HEADLINE:
    lines.append(f"| {k} | {fmt(results.get(k))} |")
  per_cat = results.get("details", {}).get("shapes", {}).get("per_category", {})
  for cat, v in per_cat.items():
    lines.append(f"| shapes/{cat} | {fmt(v)} |")
  if "editing_accuracy" in results:
    lines.append(f"| editing_accuracy | {fmt(results['editing_accuracy'])} |")
  lines.append(f"| fid | {fmt(results.get('fid'))} |")
  lines.append(f"| clip_score | {fmt(results.get('clip_score'))} |")
  return "\n".join(lines) + "\n"


def _save_grid(images: np.ndarray, path: str) -> None:
  if not len(images):
    return
  n = len(images)
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  h, w = images.shape[1:3]
  grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im[..., :3]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(grid).save(path)
