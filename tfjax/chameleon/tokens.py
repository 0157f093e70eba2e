"""The VQ token cache: the latent-cache format (tfjax/data/latents.py) holding codes.

The data pipeline packs documents from a latent cache whose records hold
`[h, w, c]` float arrays with `c = model.latent_channels`. A Chameleon run
points `data.latents` at a cache whose records hold VQ code ids in channel 0
(exact in float32 for codebooks below 2**24) and zeros in the others, with
scale 1 and shift 0, so the unchanged pipeline lays out BOI, one position per
code, EOI, and `batches.to_chameleon_batch` turns those positions into tokens.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from tfjax.config import ConfigError, EOI_ID
from tfjax.data import latents as latents_lib
from tfjax.data import sources

TOKENS_DIR = "vq_tokens"


def image_token_offset(config: ml_collections.ConfigDict) -> int:
  """Token id of VQ code 0: chameleon.text_vocab_size, else data.vocab_size."""
  return int(config.chameleon.text_vocab_size or config.data.vocab_size)


def token_dir(config: ml_collections.ConfigDict, data_dir: str | None = None) -> str:
  """Where the VQ token cache lives: chameleon.tokens, else DATA_DIR/vq_tokens."""
  return config.chameleon.tokens or os.path.join(data_dir or config.data.dir, TOKENS_DIR)


def check_vocab(config: ml_collections.ConfigDict, codebook_size: int,
                tokenizer_vocab: int | None = None) -> None:
  """Raises naming the key when text ids and image ids would collide or overflow."""
  offset = image_token_offset(config)
  if offset <= EOI_ID:
    raise ConfigError(f"config key chameleon.text_vocab_size: image tokens would start at "
                      f"{offset}, inside the special tokens")
  if tokenizer_vocab is not None and tokenizer_vocab > offset:
    raise ConfigError(f"config key chameleon.text_vocab_size: the tokenizer has "
                      f"{tokenizer_vocab} ids but image tokens start at {offset}")
  if offset + codebook_size > config.model.vocab_size:
    raise ConfigError(f"config key model.vocab_size={config.model.vocab_size} must be at least "
                      f"text vocabulary {offset} + VQ codebook {codebook_size} = "
                      f"{offset + codebook_size}")


class VQTokenEncoder:
  """Adapts a VQ-VAE to the latent cache's `Encoder` protocol.

  `encode` returns code ids as float32 `[b, h, w, channels]` (codes in channel
  0); `scale`/`shift` are the identity so readers get the ids back unchanged.
  """

  def __init__(self, vq: Any, channels: int):
    if getattr(vq, "kind", None) != "vq":
      raise ValueError("config key vae.kind: the Chameleon baseline needs a VQ-VAE ('vq')")
    if channels < 1:
      raise ValueError("config key model.latent_channels must be >= 1")
    self.vq, self.channels = vq, channels
    self.scale, self.shift = 1.0, 0.0
    if vq.codebook_size >= 2 ** 24:
      raise ValueError(f"config key vae.codebook_size={vq.codebook_size}: codes above 2**24 "
                       "are not exact in float32")

  def __repr__(self) -> str:
    return f"VQTokenEncoder(codebook_size={self.vq.codebook_size})"

  def encode(self, images: np.ndarray) -> np.ndarray:
    """float32 [b, H, W, 3] in [-1, 1] -> float32 [b, h, w, channels] (code in channel 0)."""
    ids = np.asarray(self.vq.encode_tokens(images), np.int32)
    out = np.zeros(ids.shape + (self.channels,), np.float32)
    out[..., 0] = ids
    return out


def codes_from_latents(latents: np.ndarray, codebook_size: int | None = None,
                       source: str = "the VQ token cache") -> np.ndarray:
  """int32 [..., h, w] code ids from token-cache latents [..., h, w, c].

  Raises ValueError naming `source` when a value is not a valid code id.
  """
  x = np.asarray(latents)[..., 0]
  ids = np.rint(x).astype(np.int64)
  bad = (np.abs(x - ids) > 1e-3) | (ids < 0)
  if codebook_size is not None:
    bad |= ids >= codebook_size
  if bad.any():
    raise ValueError(f"{source}: values {np.unique(x[bad])[:5]} are not VQ code ids "
                     f"(is data.latents a VQ token cache? rebuild it with the Chameleon "
                     f"'tokens' stage)")
  return ids.astype(np.int32)


def build_token_cache(config: ml_collections.ConfigDict, vq: Any, data_dir: str | None = None,
                      splits: tuple[str, ...] = ("train", "validation"),
                      batch_size: int = 64) -> dict[str, Any]:
  """Encodes the image-text source with the VQ-VAE into `token_dir(config)`.

  A split already present in the cache is kept (delete the directory to
  re-encode after changing the VQ-VAE). Returns {split: metadata entry}.
  """
  root = sources.data_root(config, data_dir)
  out = token_dir(config, root)
  encoder = VQTokenEncoder(vq, int(config.model.latent_channels))
  return latents_lib.encode_missing_splits(out, splits, lambda split: latents_lib.build_latent_cache(
      encoder, sources.image_source(config, root, split), out, split=split, batch_size=batch_size))
