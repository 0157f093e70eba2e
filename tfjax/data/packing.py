"""Documents and first-fit packing of documents into Batch rows.

A document is one training example laid out as text positions:

  text only:      BOS t t t ... EOS
  caption first:  BOS c c c BOI p p ... p EOI EOS
  image first:    BOS BOI p p ... p EOI c c c EOS

where each `p` is one image patch position (its token is PAD). A document is
a plain dict (cheap to pickle between Grain processes):

  tokens   int32 [L]    token per position, PAD at patches.
  scored   bool  [L]    the prediction made at this position is a loss target.
  images   list of (first_patch_index, latents float32 [h, w, c], before_caption).
  clean    optional list of bool per image: enters un-noised (`image_clean`).

`BatchBuilder` places documents first-fit into `batch_size` rows and writes
the arrays of `tfjax.batch.empty_batch`. Documents never split, so images
never split either.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tfjax.batch import empty_batch
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID

Doc = dict[str, Any]


def image_positions(patches_per_image: int) -> int:
  """Positions one image takes: BOI + patches + EOI."""
  return patches_per_image + 2


def make_document(parts: Sequence[tuple], patches_per_image: int) -> Doc:
  """Lays out one document from its parts, adding BOS/EOS and BOI/EOI.

  Args:
    parts: ("text", list[int]) and ("image", latents [h, w, c], before_caption)
      in reading order.
    patches_per_image: patch positions per image.

  Loss mask rule (see tfjax/batch.py): a position is scored when its input is
  a text token other than BOI and it is not the last one of the document. So
  the token before BOI predicts BOI, BOI does not predict a patch, the last
  patch does not predict EOI, and EOI predicts what follows the image.
  """
  tokens: list[int] = [BOS_ID]
  is_text: list[bool] = [True]
  images = []
  for part in parts:
    if part[0] == "text":
      tokens.extend(part[1])
      is_text.extend([True] * len(part[1]))
    elif part[0] == "image":
      tokens.append(BOI_ID)
      is_text.append(False)  # BOI's prediction (a patch) is not a text target
      images.append((len(tokens), part[1], bool(part[2])))
      tokens.extend([PAD_ID] * patches_per_image)
      is_text.extend([False] * patches_per_image)
      tokens.append(EOI_ID)
      is_text.append(True)
    else:
      raise ValueError(f"unknown document part {part[0]!r}")
  tokens.append(EOS_ID)
  is_text.append(False)  # EOS ends the document: nothing after it to predict
  return {"tokens": np.asarray(tokens, np.int32), "scored": np.asarray(is_text, bool),
          "images": images}


def split_text(ids: Sequence[int], seq_len: int) -> list[list[int]]:
  """Chunks a long text so that each chunk plus BOS/EOS fits in `seq_len`."""
  room = seq_len - 2
  return [list(ids[i:i + room]) for i in range(0, max(len(ids), 1), room)]


class BatchBuilder:
  """First-fit placement of documents into `batch_size` rows of `seq_len`."""

  def __init__(self, batch_size: int, seq_len: int, max_images: int,
               latent_shape: tuple[int, int, int], patches_per_image: int):
    self.batch_size, self.seq_len, self.max_images = batch_size, seq_len, max_images
    self.latent_shape, self.patches = tuple(latent_shape), patches_per_image
    self.rows: list[list[Doc]] = [[] for _ in range(batch_size)]
    self.free = [seq_len] * batch_size
    self.free_images = [max_images] * batch_size

  def fits_anywhere(self, doc: Doc) -> bool:
    return len(doc["tokens"]) <= self.seq_len and len(doc["images"]) <= self.max_images

  def add(self, doc: Doc) -> bool:
    """Places `doc` in the first row with room; False if none has room."""
    n, k = len(doc["tokens"]), len(doc["images"])
    for r in range(self.batch_size):
      if self.free[r] >= n and self.free_images[r] >= k:
        self.rows[r].append(doc)
        self.free[r] -= n
        self.free_images[r] -= k
        return True
    return False

  def full(self, min_doc_len: int) -> bool:
    return max(self.free) < min_doc_len

  @property
  def empty(self) -> bool:
    return not any(self.rows)

  @property
  def num_tokens(self) -> int:
    return self.batch_size * self.seq_len - sum(self.free)

  def build(self) -> dict[str, np.ndarray]:
    """The packed batch: the arrays of `empty_batch`, filled."""
    b = empty_batch(self.batch_size, self.seq_len, self.max_images, self.latent_shape)
    for r, docs in enumerate(self.rows):
      off, slot = 0, 0
      for seg, doc in enumerate(docs, start=1):
        toks = doc["tokens"]
        n = len(toks)
        end = off + n
        b["tokens"][r, off:end] = toks
        b["segment_ids"][r, off:end] = seg
        b["positions"][r, off:end] = np.arange(n, dtype=np.int32)
        b["text_targets"][r, off:end - 1] = toks[1:]
        b["text_loss_mask"][r, off:end] = doc["scored"]
        clean = doc.get("clean") or [False] * len(doc["images"])  # editing inputs
        for (start, latents, before_caption), is_clean in zip(doc["images"], clean):
          p = off + start
          b["image_ids"][r, p:p + self.patches] = slot + 1
          b["image_starts"][r, slot] = p
          b["image_latents"][r, slot] = latents
          b["image_valid"][r, slot] = True
          b["image_before_caption"][r, slot] = before_caption
          b["image_clean"][r, slot] = is_clean
          slot += 1
        off = end
    return b
