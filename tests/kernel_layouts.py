"""Random packed Transfusion layouts, inputs and error measures shared by the
attention-kernel tests (test_attention_schedules, _kernels, _mosaic)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# METHOD.md: float32 far under 1e-3, bf16 operands 1e-3..1e-2 (vs a float32
# reference on the same bf16 inputs).
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1.5e-2}


def rel_error(a, b) -> float:
  """||a - b|| / ||b|| in float64; fails on any NaN/inf in `a` (the kernel's)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "NaN/inf in kernel result"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_inputs(rng: np.random.Generator, batch: int, seq: int, hq: int, hkv: int, d: int,
                  dtype):
  """q, k, v, dO [batch, seq, heads, d] of standard normals in `dtype`."""
  draw = lambda h: jnp.asarray(rng.standard_normal((batch, seq, h, d)), dtype)
  return draw(hq), draw(hkv), draw(hkv), draw(hq)


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
