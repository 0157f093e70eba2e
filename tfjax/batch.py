"""The Batch: the one structure a training step receives.

Every array is `[batch, seq]` unless noted. A packed sequence holds several
documents; each document is text with zero or more images, every image being a
contiguous run of `patches_per_image` patch positions wrapped by BOI/EOI text
tokens.

  tokens          int32 [batch, seq]   text ids; patch positions hold PAD.
  segment_ids     int32 [batch, seq]   document id per position, 0 = padding.
  image_ids       int32 [batch, seq]   0 = not a patch; a positive id per image
                                       (distinct within the sequence).
  positions       int32 [batch, seq]   position inside the document (RoPE);
                                       restarts at 0 per document.
  text_targets    int32 [batch, seq]   the next token to predict at each position.
  text_loss_mask  bool  [batch, seq]   True where the prediction of
                                       `text_targets` is scored: never where the
                                       input is BOI or a patch, never on padding.
  image_latents   float32 [batch, max_images, h, w, c]   clean VAE latents,
                                       already scaled to about unit variance.
  image_starts    int32 [batch, max_images]  sequence index of each image's first
                                       patch (patches run left-to-right,
                                       top-to-bottom from there).
  image_valid     bool  [batch, max_images]  False for unused slots.
  image_before_caption bool [batch, max_images]  the image precedes its caption
                                       (its noise is limited, see diffusion/).
  image_clean     bool  [batch, max_images]  the image enters un-noised and
                                       carries no diffusion loss (e.g. the input
                                       image of an editing example).

Image slots are ordered by position within each row, and an image's id equals
`slot index + 1` within its row, so a patch position's slot is
`image_ids - 1`.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BATCH_FIELDS = ("tokens", "segment_ids", "image_ids", "positions", "text_targets",
                "text_loss_mask", "image_latents", "image_starts", "image_valid",
                "image_before_caption", "image_clean")


@flax.struct.dataclass
class Batch:
  tokens: Any
  segment_ids: Any
  image_ids: Any
  positions: Any
  text_targets: Any
  text_loss_mask: Any
  image_latents: Any
  image_starts: Any
  image_valid: Any
  image_before_caption: Any
  image_clean: Any

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.tokens.shape)

  @property
  def max_images(self) -> int:
    return self.image_starts.shape[1]

  def to_dict(self) -> dict[str, Any]:
    return {f: getattr(self, f) for f in BATCH_FIELDS}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Batch":
    missing = [f for f in BATCH_FIELDS if f not in d]
    if missing:
      raise KeyError(f"batch is missing fields {missing}")
    return cls(**{f: d[f] for f in BATCH_FIELDS})


def empty_batch(batch_size: int, seq_len: int, max_images: int,
                latent_shape: tuple[int, int, int], pad_id: int = 0) -> dict[str, np.ndarray]:
  """An all-padding batch as numpy arrays: the template packers fill in."""
  h, w, c = latent_shape
  return dict(
      tokens=np.full((batch_size, seq_len), pad_id, np.int32),
      segment_ids=np.zeros((batch_size, seq_len), np.int32),
      image_ids=np.zeros((batch_size, seq_len), np.int32),
      positions=np.zeros((batch_size, seq_len), np.int32),
      text_targets=np.full((batch_size, seq_len), pad_id, np.int32),
      text_loss_mask=np.zeros((batch_size, seq_len), bool),
      image_latents=np.zeros((batch_size, max_images, h, w, c), np.float32),
      image_starts=np.zeros((batch_size, max_images), np.int32),
      image_valid=np.zeros((batch_size, max_images), bool),
      image_before_caption=np.zeros((batch_size, max_images), bool),
      image_clean=np.zeros((batch_size, max_images), bool),
  )


def batch_spec(batch_size: int, seq_len: int, max_images: int,
               latent_shape: tuple[int, int, int]) -> Batch:
  """Shape/dtype structure of a Batch (for ahead-of-time compilation)."""
  arrays = empty_batch(batch_size, seq_len, max_images, latent_shape)
  return Batch.from_dict({k: jax.ShapeDtypeStruct(v.shape, jnp.dtype(v.dtype))
                          for k, v in arrays.items()})

