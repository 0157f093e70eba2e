"""Synthetic packed batches: pinned output, Batch invariants, the trainer's dataset."""
import hashlib

import numpy as np
import pytest

from configs.tiny import get_config
from tfjax.batch import BATCH_FIELDS
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, patches_per_image
from tfjax.train.synthetic import synthetic_batch


def checksum(batch):
  """sha256 over every field's dtype, shape and bytes, in BATCH_FIELDS order."""
  h = hashlib.sha256()
  for f in BATCH_FIELDS:
    a = np.ascontiguousarray(batch[f])
    h.update(f"{f}:{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


# Benchmarks time the train step on these batches (benchmarks/train.py: index 0
# and 1, doc_len seq_len / 4 or the trainer's default): recorded results stay
# comparable only while the batches do not change.
@pytest.mark.parametrize("index,doc_len,digest", [
    (0, None, "478e9b1048d2873f"),
    (1, None, "6428d2f90f93b920"),
    (0, 32, "7bb195da5a76baa4"),
    (1, 32, "b35887f7b3a7100f"),
])
def test_synthetic_batch_output_is_pinned(index, doc_len, digest):
  b = synthetic_batch(get_config(), index, doc_len=doc_len)
  assert b["tokens"].shape == (16, 128) and b["image_latents"].shape == (16, 4, 8, 8, 8)
  assert checksum(b) == digest


@pytest.mark.parametrize("whole_documents", [False, True])
def test_synthetic_batch_obeys_the_batch_invariants(whole_documents):
  c = get_config()
  b = synthetic_batch(c, 0, seed=1, doc_len=32, whole_documents=whole_documents)
  n_patch = patches_per_image(c.model)
  tokens, seg, ids = b["tokens"], b["segment_ids"], b["image_ids"]
  is_patch = ids != 0
  assert (tokens[is_patch] == 0).all() and not (is_patch & (seg == 0)).any()
  assert not b["text_loss_mask"][(tokens == BOI_ID) | is_patch | (seg == 0)].any()
  for row in range(tokens.shape[0]):
    for doc in range(1, seg[row].max() + 1):
      where = np.flatnonzero(seg[row] == doc)
      assert tokens[row, where[0]] == BOS_ID
      np.testing.assert_array_equal(b["positions"][row, where], np.arange(len(where)))
      if whole_documents:  # never cut: every document ends with EOS
        assert tokens[row, where[-1]] == EOS_ID
    for slot in np.flatnonzero(b["image_valid"][row]):
      start = b["image_starts"][row, slot]
      assert tokens[row, start - 1] == BOI_ID and tokens[row, start + n_patch] == EOI_ID
      assert (ids[row, start:start + n_patch] == slot + 1).all()
      assert (ids[row] == slot + 1).sum() == n_patch
  assert not b["image_latents"][~b["image_valid"]].any()
  if whole_documents:  # the cut last documents became padding
    assert (seg[:, -1] == 0).any()
