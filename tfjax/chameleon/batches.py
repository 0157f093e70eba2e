"""Chameleon batches: image positions become VQ tokens scored by the LM loss.

The data pipeline, fed a VQ token cache (tokens.py), packs documents exactly
as for Transfusion: `BOS caption BOI p ... p EOI EOS` (or image first), each
`p` a patch position and the image's codes in `image_latents[..., 0]`.
`to_chameleon_batch` rewrites that layout in place:

  tokens          p positions get `offset + code`
  text_targets    the next position's token wherever it is in the same document
  text_loss_mask  also True at BOI (predicts the first code) and at every
                  code (predicts the next code; the last one predicts EOI)
  image_*         no image slots: ids 0, valid False, latents 0

so the model sees a plain causal token sequence and the Transfusion objective
(LM + lambda * diffusion over zero images) is exactly Chameleon's LM loss.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from tfjax.chameleon.tokens import codes_from_latents, image_token_offset
from tfjax.config import ConfigError
from tfjax.data import make_eval_iterator, make_train_iterator


def to_chameleon_batch(batch: dict[str, np.ndarray], offset: int,
                       codebook_size: int | None = None) -> dict[str, np.ndarray]:
  """The Chameleon form of a packed batch whose image latents hold VQ codes.

  Args:
    batch: numpy arrays of `tfjax.batch.empty_batch` layout, image_latents
      `[b, max_images, h, w, c]` holding code ids in channel 0.
    offset: token id of code 0 (`tokens.image_token_offset`).
    codebook_size: if given, codes are checked to lie in [0, codebook_size).

  Returns:
    A new dict of the same keys, shapes and dtypes.
  """
  out = {k: np.array(v, copy=True) for k, v in batch.items()}
  tokens, seg = out["tokens"], out["segment_ids"]
  valid = np.asarray(batch["image_valid"], bool)
  b, n_img = valid.shape
  rows, slots = np.nonzero(valid)
  if len(rows):
    codes = codes_from_latents(batch["image_latents"][rows, slots], codebook_size)
    codes = codes.reshape(len(rows), -1)  # raster order, as patches are laid out
    num = codes.shape[1]
    starts = batch["image_starts"][rows, slots]
    idx = starts[:, None] + np.arange(num)[None]                # [images, num]
    if (idx >= tokens.shape[1]).any() or (starts < 1).any():
      raise ValueError("batch: an image's codes do not fit after its BOI in the row")
    tokens[rows[:, None], idx] = offset + codes
    mask = out["text_loss_mask"]
    mask[rows[:, None], idx] = True
    mask[rows, starts - 1] = True                               # BOI predicts code 0
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  out["text_targets"][:, :-1] = np.where(same_doc, tokens[:, 1:], out["text_targets"][:, :-1])
  out["image_ids"][:] = 0
  out["image_latents"][:] = 0.0
  out["image_starts"][:] = 0
  for k in ("image_valid", "image_before_caption", "image_clean"):
    out[k][:] = False
  return out


class ChameleonIterator:
  """Wraps a data iterator, converting every batch; state passes through.

  `get_state`/`set_state` (checkpointed with the run), `skip_counts` and
  `close` are the wrapped iterator's, so resumption is exact.
  """

  def __init__(self, parent: Any, offset: int, codebook_size: int | None = None):
    self._parent, self._offset, self._codebook = parent, offset, codebook_size

  def __iter__(self) -> "ChameleonIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return to_chameleon_batch(next(self._parent), self._offset, self._codebook)

  def get_state(self) -> Any:
    return self._parent.get_state()

  def set_state(self, state: Any) -> None:
    self._parent.set_state(state)

  def skip_counts(self) -> dict[str, int]:
    fn = getattr(self._parent, "skip_counts", None)
    return fn() if fn else {}

  def close(self) -> None:
    fn = getattr(self._parent, "close", None)
    if fn:
      fn()


def check_layout(config: ml_collections.ConfigDict) -> None:
  """The model's image grid must be the VQ grid, one token per position."""
  if config.model.patch_size != 1:
    raise ConfigError(f"config key model.patch_size={config.model.patch_size}: the Chameleon "
                      "baseline places one VQ token per position (patch_size 1)")


def data_factories(config: ml_collections.ConfigDict, codebook_size: int | None = None
                   ) -> tuple[Callable[..., Iterator], Callable[..., Iterator]]:
  """(train, eval) data factories for `tfjax.train.loop.train`.

  The config's `data.latents` must name the VQ token cache.
  """
  check_layout(config)
  offset = image_token_offset(config)

  def train_data(cfg, process_index: int, process_count: int):
    it = make_train_iterator(cfg, cfg.data.dir, process_index=process_index,
                             process_count=process_count)
    return ChameleonIterator(it, offset, codebook_size)

  def eval_data(cfg, process_index: int, process_count: int):
    it = make_eval_iterator(cfg, cfg.data.dir, process_index=process_index,
                            process_count=process_count)
    return ChameleonIterator(it, offset, codebook_size)

  return train_data, eval_data
