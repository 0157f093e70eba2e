"""One evaluation for every family: the project's suite (tfjax/eval/suite.py).

Transfusion runs are scored through `tfjax.generate.mixed.Generator`,
Chameleon runs through `tfjax.chameleon.generate.ChameleonGenerator`, which
offers the same calls (`text_to_image` -> latents or codes, `decode_latents`,
`image_to_text`), so both see the same held-out captions, images, reference
captions and text, and the same scorers:

  shapes_accuracy         text->image, shapes pixel checker
  caption_cider           image->text (greedy), CIDEr-D against 5 references
  caption_scene_accuracy  the generated caption describes the scene exactly
  perplexity              held-out shapes text (same tokenizer for every family)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections

from tfjax.chameleon.generate import ChameleonGenerator
from tfjax.eval import suite
from tfjax.generate.mixed import Generator

log = logging.getLogger(__name__)

METRICS = ("shapes_accuracy", "caption_cider", "caption_scene_accuracy", "perplexity")
VARIANTS_FILE = "variants.json"


def make_generator(config: ml_collections.ConfigDict, params: Any, tokenizer: Any,
                   vae: Any) -> Any:
  """The family's generator: Chameleon when chameleon.enabled, else Transfusion."""
  if config.chameleon.enabled:
    return ChameleonGenerator(config, params, tokenizer, vae)
  return Generator(config, params, tokenizer, vae)


def evaluate(generator: Any, out_dir: str, num_samples: int = 32, seed: int = 0,
             batch_size: int = 16) -> dict[str, Any]:
  """Runs the suite ("all"); writes out_dir/eval.json and sample grids; returns the dict."""
  os.makedirs(out_dir, exist_ok=True)
  result = suite.run(generator, "all", num_samples, seed=seed, batch_size=batch_size,
                     out_dir=out_dir)
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2, default=str)
  log.info("eval %s: %s", out_dir, {k: result.get(k) for k in METRICS})
  return result


def evaluate_variants(config: ml_collections.ConfigDict, make: Any, out_dir: str,
                      variants: dict[str, Any], num_samples: int, seed: int = 0,
                      batch_size: int = 16) -> dict[str, Any]:
  """Text-to-image again with the same weights under each variant's config
  overrides (`{name: ("diffusion.cfg_scale=3", ...)}`: sampling settings), so
  two samplers are compared on one model. `make(config)` builds the generator.
  Writes out_dir/variants.json and each variant's grid to out_dir/NAME/."""
  out = {}
  for name, overrides in variants.items():
    cfg = config.copy_and_resolve_references()
    suite.apply_overrides(cfg, list(overrides))
    d = suite.shapes_eval(make(cfg), num_samples, seed=seed, batch_size=batch_size,
                          out_dir=os.path.join(out_dir, name))
    out[name] = {"overrides": list(overrides), "shapes_accuracy": d["shapes_accuracy"],
                 "per_category": d["per_category"]}
  path = os.path.join(out_dir, VARIANTS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(out, f, indent=2)
  os.replace(path + ".tmp", path)
  log.info("eval variants %s: %s", out_dir, {k: v["shapes_accuracy"] for k, v in out.items()})
  return out
