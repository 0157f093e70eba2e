"""The decoded sequence so far, kept on the host as plain arrays.

A `Context` mirrors what the KV cache holds, slot for slot: one row per
prompt, one document (segment id 1) per row, left-padded with segment id 0 so
rows of different lengths share one cache length. Positions (RoPE) count only
a row's real slots, so padding anywhere in a row (left padding, or the slots a
finished row leaves while others decode) changes nothing it attends to. The
full-recomputation paths (tests, the uncached benchmark) run the model on it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tfjax.config import PAD_ID


@dataclasses.dataclass
class Context:
  tokens: np.ndarray        # int32 [batch, len]
  segment_ids: np.ndarray   # int32 [batch, len], 0 = padding
  image_ids: np.ndarray     # int32 [batch, len]
  positions: np.ndarray     # int32 [batch, len]
  latents: np.ndarray       # float32 [batch, max_images, h, w, c], clean
  image_starts: np.ndarray  # int32 [batch, max_images]
  image_valid: np.ndarray   # bool [batch, max_images]
  patch_size: int = 1       # latent pixels per patch side (model.patch_size)

  @property
  def batch(self) -> int:
    return self.tokens.shape[0]

  @property
  def length(self) -> int:
    return self.tokens.shape[1]

  def next_position(self) -> np.ndarray:
    """int32[batch]: RoPE position of each row's next real slot."""
    return (self.segment_ids != 0).sum(axis=1).astype(np.int32)

  def num_images(self) -> np.ndarray:
    return self.image_valid.sum(axis=1).astype(np.int32)

  def append_tokens(self, tokens: np.ndarray, active: np.ndarray) -> None:
    """Appends `[batch, n]` token columns; inactive rows get padding slots."""
    tokens = np.asarray(tokens, np.int32).reshape(self.batch, -1)
    n = tokens.shape[1]
    active = np.asarray(active, bool)[:, None] & np.ones((1, n), bool)
    pos = self.next_position()[:, None] + np.cumsum(active, axis=1) - 1
    self.tokens = np.concatenate([self.tokens, np.where(active, tokens, PAD_ID)], 1)
    self.segment_ids = np.concatenate([self.segment_ids, active.astype(np.int32)], 1)
    self.image_ids = np.concatenate([self.image_ids, np.zeros_like(tokens)], 1)
    self.positions = np.concatenate([self.positions, np.where(active, pos, 0)], 1)

  def append_image(self, latents: np.ndarray, active: np.ndarray) -> None:
    """Appends one clean image's patch slots (`latents [batch, h, w, c]`)."""
    active = np.asarray(active, bool)
    n = num_patches(latents.shape[1:], self.patch_size)
    slot = self.num_images()
    start = self.length
    grow = max(0, int(slot.max(initial=0)) + 1 - self.latents.shape[1])
    if grow:
      b, _, h, w, c = self.latents.shape
      self.latents = np.concatenate([self.latents, np.zeros((b, grow, h, w, c), np.float32)], 1)
      self.image_starts = np.concatenate([self.image_starts, np.zeros((b, grow), np.int32)], 1)
      self.image_valid = np.concatenate([self.image_valid, np.zeros((b, grow), bool)], 1)
    rows = np.nonzero(active)[0]
    self.latents[rows, slot[rows]] = latents[rows]
    self.image_starts[rows, slot[rows]] = start
    self.image_valid[rows, slot[rows]] = True
    ids = np.where(active, slot + 1, 0)[:, None] * np.ones((1, n), np.int32)
    pos = self.next_position()[:, None] + np.arange(n, dtype=np.int32)[None]
    self.tokens = np.concatenate([self.tokens, np.full((self.batch, n), PAD_ID, np.int32)], 1)
    self.segment_ids = np.concatenate(
        [self.segment_ids, np.repeat(active[:, None].astype(np.int32), n, 1)], 1)
    self.image_ids = np.concatenate([self.image_ids, ids.astype(np.int32)], 1)
    self.positions = np.concatenate([self.positions, np.where(active[:, None], pos, 0)], 1)

  def model_inputs(self) -> dict[str, np.ndarray]:
    """Keyword arguments for `Transfusion.apply` (images at timestep 0)."""
    return dict(tokens=self.tokens, positions=self.positions, segment_ids=self.segment_ids,
                image_ids=self.image_ids, noisy_latents=self.latents,
                timesteps=np.zeros(self.image_valid.shape, np.float32),
                image_starts=self.image_starts, image_valid=self.image_valid)


def num_patches(latent_shape: tuple[int, ...], patch_size: int) -> int:
  h, w = latent_shape[:2]
  return (h // patch_size) * (w // patch_size)


def from_rows(rows: list[list[tuple[str, object]]], latent_shape: tuple[int, int, int],
              patch_size: int, pad_multiple: int = 1, min_length: int = 0) -> Context:
  """Left-padded Context from per-row items, at least `min_length` slots long.

  Each row is a list of ("tokens", list[int]) and ("image", float32[h, w, c]
  clean latents) items; an image item is only its patch slots (BOI/EOI must be
  in the surrounding token items).
  """
  h, w, c = latent_shape
  n = num_patches(latent_shape, patch_size)
  lengths = [sum(len(v) if kind == "tokens" else n for kind, v in row) for row in rows]
  if min(lengths, default=0) == 0:
    raise ValueError("every prompt needs at least one token or image")
  b, length = len(rows), max(-(-max(lengths) // pad_multiple) * pad_multiple, min_length)
  max_images = max(1, max(sum(kind == "image" for kind, _ in row) for row in rows))
  ctx = Context(tokens=np.full((b, length), PAD_ID, np.int32),
                segment_ids=np.zeros((b, length), np.int32),
                image_ids=np.zeros((b, length), np.int32),
                positions=np.zeros((b, length), np.int32),
                latents=np.zeros((b, max_images, h, w, c), np.float32),
                image_starts=np.zeros((b, max_images), np.int32),
                image_valid=np.zeros((b, max_images), bool), patch_size=patch_size)
  for r, row in enumerate(rows):
    at = length - lengths[r]
    ctx.segment_ids[r, at:] = 1
    ctx.positions[r, at:] = np.arange(lengths[r])
    img = 0
    for kind, value in row:
      if kind == "tokens":
        ctx.tokens[r, at:at + len(value)] = value
        at += len(value)
      elif kind == "image":
        lat = np.asarray(value, np.float32)
        if lat.shape != (h, w, c):
          raise ValueError(f"prompt {r}: image latents have shape {lat.shape}, the model "
                           f"expects {(h, w, c)} (config keys model.latent_size, "
                           f"model.latent_channels)")
        ctx.latents[r, img] = lat
        ctx.image_starts[r, img] = at
        ctx.image_valid[r, img] = True
        ctx.image_ids[r, at:at + n] = img + 1
        img += 1
        at += n
      else:
        raise ValueError(f"prompt {r}: unknown item kind {kind!r}")
  return ctx
