"""Random packed Transfusion layouts for the attention-kernel tests."""
from __future__ import annotations

import numpy as np


def random_layout(rng: np.random.Generator, batch: int, seq: int,
                  pad_max: int = 40) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, image_ids) int32[batch, seq] of a random packed batch.

  Documents of 1-200 positions, some shorter than any block; images of 1-150
  patches (one-patch images included) placed anywhere, so they cross block
  boundaries; a tail of padding of up to `pad_max` positions per row.
  """
  seg = np.zeros((batch, seq), np.int32)
  img = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    end = seq - int(rng.integers(0, pad_max + 1))
    pos, doc, im = 0, 0, 0
    while pos < end:
      doc += 1
      n = int(min(rng.choice([rng.integers(1, 9), rng.integers(9, 201)]), end - pos))
      seg[b, pos:pos + n] = doc
      p = pos
      while p < pos + n:
        if rng.random() < 0.3:
          m = int(min(rng.choice([1, rng.integers(2, 151)]), pos + n - p))
          im += 1
          img[b, p:p + m] = im
          p += m
        p += int(rng.integers(1, 30))
      pos += n
  return seg, img
