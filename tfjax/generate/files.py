"""Generation to files: what `tfjax-generate` does, callable without flags.

Writes OUT/sample{i}_image{j}.png (or _latents.npy when the model has no VAE)
and OUT/generation.json (prompt, generated text, image files, sampler settings).
OUT must be new, empty, or an earlier output (marked by MARKER_FILE), whose
samples are then removed first: no stale image sits beside the new ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
from PIL import Image

from tfjax.config.validation import is_editing
from tfjax.export import load_pretrained
from tfjax.generate.diffusion import DiffusionParams
from tfjax.generate.sampling import SamplingParams

MARKER_FILE = ".tfjax-generate"
RECORD_FILE = "generation.json"
_OUTPUT_NAME = re.compile(r"sample\d+_image\d+(\.png|_latents\.npy)$")


def check_counts(num: int, **counts) -> None:
  """Refuses counts a user can mistype: num (--num_images) and the given
  optional settings (None = the model's default)."""
  if num < 1:
    raise ValueError(f"--num_images={num}: must be at least 1")
  for flag, (value, low) in counts.items():
    if value is not None and value < low:
      raise ValueError(f"--{flag}={value}: must be at least {low}")


def check_out(out: str) -> None:
  """`out` is new, empty, or an earlier generation's (which may be replaced)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out={out} is a file: give a directory")
  names = os.listdir(out) if os.path.isdir(out) else []
  if names and MARKER_FILE not in names and RECORD_FILE not in names:
    raise FileExistsError(f"--out={out} is not empty and holds no earlier tfjax-generate "
                          f"output ({MARKER_FILE}): give a new or empty directory")


def prepare_out(out: str) -> None:
  """Makes `out` ready for a new generation: created if new; if it holds an
  earlier generation, that one's files are removed; anything else stops."""
  check_out(out)
  if os.path.isdir(out):
    for name in os.listdir(out):
      if name == RECORD_FILE or _OUTPUT_NAME.match(name):
        os.remove(os.path.join(out, name))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, MARKER_FILE), "w") as f:
    f.write("written by tfjax-generate: its next run here replaces the samples\n")


def read_image(path: str, size: int):
  """uint8 [size, size, 3] from an image file (centre-cropped, resized)."""
  try:
    im = Image.open(path).convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the image ({e})") from e
  side = min(im.size)
  left, top = (im.width - side) // 2, (im.height - side) // 2
  im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
  return np.asarray(im, np.uint8)


def prompt_items(prompt: str, images: list) -> list:
  """Prompt text with images at "<image>" marks, or all images first."""
  if "<image>" not in prompt:
    return list(images) + ([prompt] if prompt else [])
  parts = prompt.split("<image>")
  if len(parts) - 1 != len(images):
    raise ValueError(f"the prompt has {len(parts) - 1} <image> marks but {len(images)} images "
                     "were given")
  items = []
  for i, text in enumerate(parts):
    if text:
      items.append(text)
    if i < len(images):
      items.append(images[i])
  return items


def generate_to_dir(model_dir: str, prompt: str, image_paths: list[str], num: int, seed: int,
             out: str, mode: str = "", **overrides) -> dict:
  """Runs generation and writes OUT; returns what generation.json holds."""


  check_counts(num, **{"batch_size": (overrides.get("batch_size"), 1),
                       "steps": (overrides.get("steps"), 1),
                       "max_images": (overrides.get("max_images"), 1),
                       "max_text_tokens": (overrides.get("max_text_tokens"), 1),
                       "top_k": (overrides.get("top_k"), 0),
                       "temperature": (overrides.get("temperature"), 0)})
  top_p = overrides.get("top_p")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"--top_p={top_p}: must be in (0, 1]")
  for p in image_paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"--image={p}: no such file")
  init_path = overrides.get("init_image")
  if init_path and not os.path.isfile(init_path):
    raise FileNotFoundError(f"--init_image={init_path}: no such file")
  if not prompt and not image_paths:
    raise ValueError("nothing to generate from: give --prompt and/or --image")
  check_out(out)
  gen = load_pretrained(model_dir)
  c = gen.config
  images = [read_image(p, int(c.data.image_size)) for p in image_paths]
  # A model fine-tuned for editing (editing.source set) draws the edited
  # image after the input image and instruction; others caption the image.
  editing_model = is_editing(c)
  mode = mode or ("text" if images and not editing_model else "image")
  sampling = SamplingParams.from_config(c.sample)
  sampling = dataclasses.replace(sampling, **{k: v for k, v in dict(
      temperature=overrides.get("temperature"), top_k=overrides.get("top_k"),
      top_p=overrides.get("top_p")).items() if v is not None})
  dp = DiffusionParams.from_config(c)
  dp = dataclasses.replace(dp, **{k: v for k, v in dict(
      num_steps=overrides.get("steps"), sampler=overrides.get("sampler"),
      cfg_scale=overrides.get("cfg_scale"), strength=overrides.get("strength"),
      image_cfg_scale=overrides.get("image_cfg_scale")).items()
      if v is not None})
  if dp.image_guided and mode != "image":
    raise ValueError(f"--image_cfg_scale={dp.image_cfg_scale} guides a drawn image on the "
                     f"prompt's images: it needs --mode=image (got {mode!r})")
  init = None
  if dp.strength < 1.0:
    init_path = init_path or (image_paths[-1] if image_paths else None)
    if init_path is None:
      raise ValueError(f"--strength={dp.strength} < 1 starts from an image: give --init_image "
                       "or --image")
    if mode != "image":
      raise ValueError(f"--strength={dp.strength} < 1 draws one image from an init image: "
                       f"it needs --mode=image (got {mode!r})")
    init = gen.encode_images(read_image(init_path, int(c.data.image_size))[None])
  items = prompt_items(prompt, images)
  if not items:
    raise ValueError("nothing to generate from: give a prompt and/or images")
  if mode != "image" and gen.tokenizer is None:
    raise ValueError(f"{model_dir} has no tokenizer, which writing text (mode {mode!r}) needs")
  prepare_out(out)
  batch = max(1, int(overrides.get("batch_size") or 8))
  rng = jax.random.key(seed)
  samples = []
  for start in range(0, num, batch):
    rng, key = jax.random.split(rng)
    rows = min(batch, num - start)
    outs = gen.generate([items] * rows, rng=key, mode=mode, sampling=sampling,
                        diffusion_params=dp, max_text_tokens=overrides.get("max_text_tokens"),
                        max_images=int(overrides.get("max_images") or 1),
                        use_cache=overrides.get("prefix_cache", True),
                        long_prompt=overrides.get("long_prompt") or "error",
                        init_latents=None if init is None else np.repeat(init, rows, axis=0))
    for k, o in enumerate(outs):
      i = start + k
      files = []
      if o.images:
        pixels = gen.decode_latents(np.stack(o.images)) if gen.vae is not None else None
        for j, lat in enumerate(o.images):
          if pixels is not None:
            name = f"sample{i}_image{j}.png"
            Image.fromarray(pixels[j]).save(os.path.join(out, name))
          else:
            name = f"sample{i}_image{j}_latents.npy"
            np.save(os.path.join(out, name), lat)
          files.append(name)
      samples.append({"index": i, "text": o.text, "images": files, "tokens": o.tokens,
                      "segments": [s["type"] for s in o.segments]})
  record = {"model": os.path.abspath(model_dir), "prompt": prompt, "input_images": image_paths,
            "mode": mode, "seed": seed, "num_samples": num,
            "init_image": init_path if init is not None else None,
            "sampling": dataclasses.asdict(sampling), "diffusion": dataclasses.asdict(dp),
            "prefix_cache": overrides.get("prefix_cache", True), "samples": samples}
  with open(os.path.join(out, RECORD_FILE), "w") as f:
    json.dump(record, f, indent=2)
  return record
