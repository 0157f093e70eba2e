"""Random packed Transfusion batches, served through Grain.

For tests, benchmarks and ahead-of-time planning where the real dataset is
not wanted: each batch is a deterministic function of (seed, index), built as
a Grain MapDataset so iteration, checkpointable iterator state and resumption
behave exactly as with the real pipeline.
"""
from __future__ import annotations

import grain
import ml_collections
import numpy as np

from tfjax.batch import empty_batch
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, patches_per_image


def _fill_row(out: dict[str, np.ndarray], row: int, rng: np.random.Generator,
              config: ml_collections.ConfigDict, doc_len: int, whole_documents: bool) -> None:
  """Packs documents into one row: text, or caption + image (either order).

  The last document is cut at the row's end, or with `whole_documents` left
  out, leaving padding as the real packer does.
  """
  seq = out["tokens"].shape[1]
  max_images = out["image_starts"].shape[1]
  n_patch = patches_per_image(config.model)
  vocab = config.model.vocab_size
  inputs = np.zeros(seq, np.int32)
  pos, segment, slot = 0, 0, 0
  while pos < seq - 2:
    segment += 1
    text_len = int(rng.integers(2, max(3, doc_len // 4)))
    with_image = slot < max_images and pos + text_len + n_patch + 4 <= seq
    start = pos
    inputs[pos] = BOS_ID
    pos += 1
    image_first = with_image and rng.random() > config.data.caption_first_prob

    def add_text(n):
      nonlocal pos
      n = min(n, seq - pos)
      inputs[pos:pos + n] = rng.integers(EOI_ID + 1, vocab, n)
      pos += n

    def add_image():
      nonlocal pos, slot
      inputs[pos] = BOI_ID
      out["image_ids"][row, pos + 1:pos + 1 + n_patch] = slot + 1
      out["image_starts"][row, slot] = pos + 1
      out["image_valid"][row, slot] = True
      out["image_before_caption"][row, slot] = image_first
      inputs[pos + n_patch + 1] = EOI_ID
      pos += n_patch + 2
      slot += 1

    if image_first:
      add_image()
    add_text(text_len)
    if with_image and not image_first:
      add_image()
    if not with_image:
      add_text(int(rng.integers(0, max(1, doc_len - text_len))))
    if pos < seq:
      inputs[pos] = EOS_ID
      pos += 1
    elif whole_documents:
      # No room for EOS: the document was cut. Only text documents can be (an
      # image one is drawn only where it fits), so its tokens are all there is to undo.
      inputs[start:] = 0
      break
    end = min(pos, seq)
    out["segment_ids"][row, start:end] = segment
    out["positions"][row, start:end] = np.arange(end - start)
  is_patch = out["image_ids"][row] != 0
  inputs[is_patch] = 0
  out["tokens"][row] = inputs
  targets = np.concatenate([inputs[1:], [0]])
  same_doc = np.concatenate([out["segment_ids"][row, 1:] == out["segment_ids"][row, :-1], [False]])
  next_is_patch = np.concatenate([is_patch[1:], [False]])
  out["text_targets"][row] = targets
  out["text_loss_mask"][row] = (same_doc & ~is_patch & ~next_is_patch & (inputs != BOI_ID)
                                & (out["segment_ids"][row] != 0))


def synthetic_batch(config: ml_collections.ConfigDict, index: int, seed: int = 0,
                    batch_size: int | None = None, doc_len: int | None = None,
                    whole_documents: bool = False) -> dict[str, np.ndarray]:
  """One packed batch of random tokens and latents, like tfjax.data produces.

  Shapes come from the config (data.seq_len, data.max_images_per_seq, the
  model's latents and patches); every Batch invariant holds. Documents hold
  about `doc_len` positions (default data.seq_len); `whole_documents` leaves
  padding at the end of rows instead of cutting the last document.
  """
  m = config.model
  batch_size = config.data.batch_size if batch_size is None else batch_size
  seq = config.data.seq_len
  out = empty_batch(batch_size, seq, config.data.max_images_per_seq,
                    (m.latent_size, m.latent_size, m.latent_channels))
  rng = np.random.default_rng([seed, index])
  for row in range(batch_size):
    _fill_row(out, row, rng, config, doc_len or seq, whole_documents)
  out["image_latents"] = rng.standard_normal(out["image_latents"].shape).astype(np.float32)
  out["image_latents"] *= out["image_valid"][..., None, None, None]
  return out


def synthetic_dataset(config: ml_collections.ConfigDict, seed: int = 0,
                      process_index: int = 0, process_count: int = 1,
                      doc_len: int | None = None) -> grain.IterDataset:
  """An endless Grain dataset of this process's share of each global batch."""
  local = config.data.batch_size // process_count

  def make(index: int) -> dict[str, np.ndarray]:
    full = synthetic_batch(config, index, seed, doc_len=doc_len)
    return {k: v[process_index * local:(process_index + 1) * local] for k, v in full.items()}
  return grain.MapDataset.range(0, 2 ** 31 - 1).map(make).to_iter_dataset()
