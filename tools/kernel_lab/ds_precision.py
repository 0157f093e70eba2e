"""How precisely must the stored dS^T tiles be kept? dq's error per storage format.

Why: at head dim 128 the backward's dk/dv kernel writes every listed dS^T tile
in bf16 and the dq kernel reads them back (`tfjax/ops/kernels/mosaic_gpu_vjp_ds.py`): ~270 MB
written and ~380 MB read per call at 8192/128 (NOTES_attention.md M51c). An
8-bit store with one scale per 64x64 tile would halve that traffic. Before
spending GPU time on such a kernel, this measures on the CPU whether its dq
could pass the bf16 tolerance at all (METHOD.md: normwise relative error
between 1e-3 and 1e-2 for bf16 operands).

The attention gradient of one layout (`attention_layout.py`, float64 numpy,
dense): P, dP = dO V^T, delta = rowsum(dO * O), dS = P * (dP - delta), then
dq = scale * dS K with dS rounded to each format (per-tile absmax scaling for
the 8-bit ones, as a kernel would do) and K in bf16, against dq in float64.
The `bf16 dS` row is what the kernels store today.

  python tools/kernel_lab/ds_precision.py            # L=2048, 4 heads, D=128
  python tools/kernel_lab/ds_precision.py --quick    # L=512, 2 heads

Prints a table and, last, one JSON line: `rel_err_dq_bf16`,
`rel_err_dq_e4m3`, `rel_err_dq_e5m2` (worst head) and `tolerance`.
"""
from __future__ import annotations

import argparse
import json

import ml_dtypes
import numpy as np

from tfjax.bench.attention_layout import dense_mask, make_inputs, make_layout

TOLERANCE = 1e-2  # METHOD.md's upper end for bf16 operands
TILE = 64  # the kernels' dS^T tile edge at head dim 128
FORMATS = {"bf16": ml_dtypes.bfloat16, "e4m3": ml_dtypes.float8_e4m3fn,
           "e5m2": ml_dtypes.float8_e5m2}


def round_to(x: np.ndarray, fmt: str) -> np.ndarray:
  """x [L, L] float64 stored as `fmt` and read back; the 8-bit formats scale
  each TILE x TILE tile by its absmax onto the format's largest finite value."""
  dtype = FORMATS[fmt]
  if fmt == "bf16":
    return x.astype(dtype).astype(np.float64)
  n = x.shape[0] // TILE
  tiles = x.reshape(n, TILE, n, TILE)
  amax = np.abs(tiles).max(axis=(1, 3), keepdims=True)
  scale = np.where(amax > 0, amax / float(ml_dtypes.finfo(dtype).max), 1.0)
  return ((tiles / scale).astype(dtype).astype(np.float64) * scale).reshape(x.shape)


def head_errors(q, k, v, do, allowed, scale) -> dict[str, float]:
  """Normwise relative error of dq [L, D] per dS format, for one head."""
  s = np.where(allowed, scale * q @ k.T, -np.inf)
  # The layout has no padding: every row sees at least its own position.
  p = np.exp(s - s.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  o = p @ v
  ds = p * (do @ v.T - (do * o).sum(axis=1, keepdims=True))
  k_bf16 = k.astype(ml_dtypes.bfloat16).astype(np.float64)
  ref = scale * ds @ k
  return {fmt: float(np.linalg.norm(scale * round_to(ds, fmt) @ k_bf16 - ref)
                     / np.linalg.norm(ref)) for fmt in FORMATS}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq", type=int, default=2048, help="sequence length (a multiple of 64)")
  ap.add_argument("--heads", type=int, default=4, help="heads to measure")
  ap.add_argument("--head_dim", type=int, default=128, help="head dimension")
  ap.add_argument("--quick", action="store_true", help="L=512, 2 heads (a smoke run)")
  args = ap.parse_args(argv)
  seq, heads = (512, 2) if args.quick else (args.seq, args.heads)
  if seq % TILE:
    ap.error(f"--seq must be a multiple of the {TILE}-row dS^T tile, got {seq}")
  doc, img = make_layout(1, seq)
  allowed = dense_mask(doc, img)[0]
  q, k, v, do = (x[0].astype(np.float64) for x in make_inputs(1, seq, heads, args.head_dim))
  scale = args.head_dim ** -0.5
  rows = [head_errors(q[:, h], k[:, h], v[:, h], do[:, h], allowed, scale)
          for h in range(heads)]
  print(f"dq = scale * dS K, layout of attention_layout.py, L={seq}, D={args.head_dim}, "
        f"{heads} heads; ||dq - dq_float64|| / ||dq_float64||")
  print(f"{'dS stored as':<14}" + "".join(f"{'head ' + str(h):>12}" for h in range(heads))
        + f"{'worst':>12}{'< ' + str(TOLERANCE):>10}")
  worst = {}
  for fmt in FORMATS:
    errs = [r[fmt] for r in rows]
    worst[fmt] = max(errs)
    print(f"{fmt + ' dS':<14}" + "".join(f"{e:>12.2e}" for e in errs)
          + f"{worst[fmt]:>12.2e}{'yes' if worst[fmt] < TOLERANCE else 'no':>10}")
  result = {f"rel_err_dq_{fmt}": round(w, 6) for fmt, w in worst.items()}
  result.update(tolerance=TOLERANCE, seq=seq, head_dim=args.head_dim, heads=heads)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
