"""The main job's samples: text->image on held-out captions and image->text on
held-out images, scored, into WORKDIR/samples/; and the sample grids drawn
while training (train.sample_every)."""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

import tfjax.vae
from tfjax import checkpoints
from tfjax.data import sources
from tfjax.data.latents import decode_image
from tfjax.data.tokenizer import Tokenizer
from tfjax.eval.cider import cider_d
from tfjax.eval.shapes_checker import accuracy, score
from tfjax.generate.mixed import Generator
from tfjax.jobs.runner import Job

SAMPLES_FILE = "samples.json"


def tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The run's tokenizer (data.tokenizer, else DATA_DIR/tokenizer)."""
  return Tokenizer.load(sources.tokenizer_path(config, config.data.dir))


def held_out(config: ml_collections.ConfigDict, n: int, split: str = "validation"
             ) -> list[dict[str, Any]]:
  """The first n records of split: {"image" uint8 [S, S, 3], "caption", "scene" or None}."""
  src = sources.image_source(config, config.data.dir, split, limit=n)
  out = []
  for i in range(min(n, len(src))):
    rec = src[i]
    cap = rec["caption"]
    scene = rec.get("scene", "")
    out.append({"image": decode_image(rec["image"]),
                "caption": cap.decode() if isinstance(cap, bytes) else str(cap),
                "scene": json.loads(scene) if scene else None})
  return out


def caption_mentions(caption: str, scene: dict[str, Any] | None) -> bool | None:
  """Does a generated caption name every object's colour and shape? (None: no scene)."""
  if not scene:
    return None
  words = caption.lower().replace(",", " ").replace(".", " ").split()
  return all(o["color"] in words and o["shape"] in words for o in scene["objects"])


def current(job: Job) -> bool:
  """Samples exist and were made from the newest checkpoint (not an older one)."""
  path = os.path.join(job.workdir, "samples", SAMPLES_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("step") == checkpoints.latest_step(job.workdir)


def stage(job: Job) -> dict[str, Any]:
  """The samples stage: job.num_samples held-out examples each way, scored."""
  return write_samples(job.config, job.workdir, job.vae(), num=job.num_samples)


def write_samples(config: ml_collections.ConfigDict, workdir: str, vae: Any,
                  num: int = 32) -> dict[str, Any]:
  """Text->image on held-out captions and image->text on held-out images, scored."""
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  params, info = checkpoints.restore_params(workdir, config=config)
  gen = Generator(config, params, tokenizer(config), vae)
  held = held_out(config, num)
  rng = jax.random.key(config.train.seed + 7)
  t0 = time.time()
  latents = gen.text_to_image([h["caption"] for h in held], jax.random.fold_in(rng, 0))
  images = gen.decode_latents(latents)
  t_images = time.time() - t0
  t0 = time.time()
  captions = gen.image_to_text([h["image"] for h in held], jax.random.fold_in(rng, 1))
  t_captions = time.time() - t0
  result: dict[str, Any] = {"step": info["step"], "num": len(held),
                            "image_seconds": t_images,
                            "caption_seconds": t_captions}
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(out_dir, f"t2i_{i:03d}.png"))
  result["t2i"] = [{"caption": h["caption"], "file": f"samples/t2i_{i:03d}.png"}
                   for i, h in enumerate(held)]
  result["i2t"] = [{"reference": h["caption"], "generated": c,
                    "mentions": caption_mentions(c, h["scene"])} for h, c in zip(held, captions)]
  scenes = [h["scene"] for h in held]
  if all(s is not None for s in scenes):
    result["t2i_scores"] = accuracy(images, scenes)
    for r, im, s in zip(result["t2i"], images, scenes):
      r["verdict"] = score(im, s)
    ok = [r["mentions"] for r in result["i2t"]]
    result["i2t_mentions_accuracy"] = float(np.mean(ok))
  result["i2t_cider_d"] = cider_d(captions, [[h["caption"]] for h in held])[0]
  np.save(os.path.join(out_dir, "t2i_images.npy"), images)
  with open(os.path.join(out_dir, SAMPLES_FILE), "w") as f:
    json.dump(result, f, indent=2, default=float)
  return result


def make_sample_fn(config: ml_collections.ConfigDict, workdir: str, vae_dir: str,
                   num: int = 8) -> Any:
  """A `sample_fn(state, step)` for the loop: images for fixed held-out captions,
  saved as one PNG row per call to DIR/samples/step_NNNNNNN.png (and the
  captions to prompts.txt). None when train.sample_every is 0 or on several
  hosts (the weights would have to be gathered onto one)."""
  if not config.train.sample_every or jax.process_count() > 1:
    return None
  prompts = [h["caption"] for h in held_out(config, num)]
  tok = tokenizer(config)
  vae = tfjax.vae.load(vae_dir)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")

  def sample(state: Any, step: int) -> None:
    params = jax.device_get(checkpoints.ema_or_params(state, config))
    gen = Generator(config, params, tok, vae)
    images = gen.decode_latents(gen.text_to_image(prompts, jax.random.key(step)))
    Image.fromarray(np.concatenate(list(images), axis=1)).save(
        os.path.join(out_dir, f"step_{step:07d}.png"))
  return sample
