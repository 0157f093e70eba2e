"""CLIP score with user-supplied encoders: 100 * mean cosine(image, caption).

The encoders live in a directory (nothing is downloaded):
  image_encoder.jax_export  float32 [b, H, W, 3] in [0, 255] -> [b, d]
  text_encoder.jax_export   int32 [b, L] token ids -> [b, d]
  tokenizer.model           the sentencepiece model whose ids the text encoder
                            takes (as SigLIP ships); ids are right-padded with 0
(see `extractor.py` for how to write the `.jax_export` files). Without the
directory the suite reports "skipped".
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
import sentencepiece as spm

from tfjax.data import shapes
from tfjax.eval import extractor

FILES = ("image_encoder.jax_export", "text_encoder.jax_export", "tokenizer.model")


def cosine_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
  """100 * mean over pairs of max(cos, 0) (negative similarity counts as 0)."""
  a = image_features / np.linalg.norm(image_features, axis=-1, keepdims=True)
  b = text_features / np.linalg.norm(text_features, axis=-1, keepdims=True)
  return float(100.0 * np.mean(np.maximum(np.sum(a * b, -1), 0.0)))


def clip_score(path: str, images: np.ndarray, captions: Sequence[str]) -> float:
  missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise FileNotFoundError(f"{path}: missing {missing} (the CLIP directory needs {FILES})")
  image_fn, image_shape = extractor.load(os.path.join(path, FILES[0]))
  text_fn, text_shape = extractor.load(os.path.join(path, FILES[1]))
  sp = spm.SentencePieceProcessor(model_file=os.path.join(path, FILES[2]))
  max_len = text_shape[0]
  ids = np.zeros((len(captions), max_len), np.int32)
  for i, c in enumerate(captions):
    toks = sp.encode(c)[:max_len]
    ids[i, :len(toks)] = toks
  return cosine_score(image_fn(extractor.resize_images(images, image_shape)), text_fn(ids))


def maybe_clip_score(gen: Any, path: str | None, num_samples: int, *, seed: int = 0,
                     batch_size: int = 8) -> dict[str, Any]:
  """CLIP score of text-to-image samples against their captions, or a skip notice."""
  if not path:
    return {"status": "skipped", "reason": "no CLIP encoders given (--clip=DIR)"}
  _, _, captions = shapes.generate_split("test", num_samples, int(gen.config.data.image_size),
                                         seed=seed,
                                         options=shapes.SceneOptions.from_config(gen.config.data))
  images, rng = [], jax.random.key(seed + 2)
  for i in range(0, num_samples, batch_size):
    rng, key = jax.random.split(rng)
    images.append(gen.decode_latents(gen.text_to_image(captions[i:i + batch_size], key)))
  value = clip_score(path, np.concatenate(images), captions)
  return {"status": "ok", "value": value, "num_images": num_samples}
