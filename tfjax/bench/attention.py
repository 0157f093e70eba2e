"""Helpers the attention benchmark (benchmarks/attention.py) and the kernel lab
(tools/kernel_lab/) share: the benchmark layout's kernel inputs, timing,
errors, and the layout's documents in cuDNN's packed form."""
from __future__ import annotations

import math
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.bench import attention_layout as layout
from tfjax.ops.mask import key_ranges


class KernelWorkload(NamedTuple):
  """One shape of the shared layout as the tfjax kernels take it."""
  ks: jax.Array    # int32[batch, seq] key intervals [ks, ke)
  ke: jax.Array
  q: jax.Array     # bf16 [batch, seq, heads, d], likewise k, v, do
  k: jax.Array
  v: jax.Array
  do: jax.Array
  flops: float     # forward FLOPs on the unmasked pairs (4 * H * D * nnz)


def kernel_workload(bsz: int, seq: int, heads: int, d: int) -> KernelWorkload:
  """The benchmark layout (attention_layout.py) at one shape, on the device."""
  doc, img = layout.make_layout(bsz, seq)
  nnz = int(layout.counts(doc, img)["transfusion"].sum())
  ks, ke = key_ranges(jnp.asarray(doc), jnp.asarray(img))
  q, k, v, do = (jnp.asarray(x, jnp.bfloat16) for x in layout.make_inputs(bsz, seq, heads, d))
  return KernelWorkload(ks, ke, q, k, v, do, 4.0 * heads * d * nnz)


def time_jax(fn, args, reps: int, group: int, window_ms: float = 20.0) -> float:
  """Median milliseconds per call: groups of back-to-back calls, one block.

  A group holds at least `group` calls and at least `window_ms` of them: the
  host's dispatch of the first call and the final block (0.1-0.3 ms together)
  are then a few microseconds per call, as CUDA events leave them out of the
  torch rows.
  """
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  single_ms = (time.perf_counter() - t0) * 1e3
  group = max(group, math.ceil(window_ms / max(single_ms, 1e-3)))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(group):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / group * 1e3)
  return statistics.median(times)


def fwd_bwd(f):
  """jit(q, k, v, do) -> (out, dq, dk, dv)."""
  def g(q, k, v, do):
    o, vjp = jax.vjp(f, q, k, v)
    return (o,) + vjp(do)
  return jax.jit(g)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64; NaN where `a` holds a NaN or inf."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def packed_documents(doc):
  """(offsets int32[batch, most + 1], lengths int32[batch, most]) of each row's
  documents (maximal runs of one id), padded with -1: the packed-layout
  arguments of cuDNN's fused attention, `most` the most documents in a row."""
  runs = [layout._runs(row) for row in doc]
  most = max(len(r) for r in runs)
  offsets = np.full((len(runs), most + 1), -1, np.int32)
  lengths = np.full((len(runs), most), -1, np.int32)
  for b, r in enumerate(runs):
    n = np.asarray([length for _, length in r], np.int32)
    lengths[b, :len(r)] = n
    offsets[b, :len(r)] = np.cumsum(n) - n
  return offsets, lengths
