"""Board power, SM clock and energy per call while attention runs back to back.

Why: a kernel can only get faster by hiding latency while the board has power
to spare. This benchmark samples `nvidia-smi` every 100 ms while (1) an
8192^3 bf16 matrix product, (2) the attention forward+backward of
`benchmarks/attention.py` (plan given, as its first row) on the chosen layouts
and kernel variants, and (3) the matrix product again run back to back for
`--seconds` each, and reports per phase the median SM clock, the median board
power against its limit, how often the driver reported the software power cap
(or the hardware power brake) as a reason for lowered clocks, and the energy
per call (W x ms = mJ) and per effective FLOP (W / TF/s = pJ).

  python tools/kernel_lab/attention_power.py                # GPU: 8192/128, benchmark layout
  python tools/kernel_lab/attention_power.py --layouts benchmark,bidi8192,docs1024 \
      --variants "default;d/d:dq=RECOMPUTE_OWN_DELTA"
  python tools/kernel_lab/attention_power.py --quick        # anywhere: tiny, no power figures

Layouts: `benchmark` (attention_layout.py, as the table), `docsN` (causal
documents of N tokens), `bidiN` (documents of N tokens that are each one
image, so bidirectional). Variants: `default` (what dispatch picks) or a
`tools/kernel_lab/mgpu_ab.py` spec FWD/BWD (Mosaic GPU kernels only).

Prints a table and, last, one JSON line: `power_limit_w`, `idle_w`,
`matmul_tflops`, `matmul_w`, `matmul_sm_mhz`, and for the first run
`fwd_bwd_ms`, `fwd_bwd_w`, `fwd_bwd_sm_mhz`, `fwd_bwd_capped_fraction`,
`fwd_bwd_mj_per_call`, `fwd_bwd_pj_per_flop` (None where not measured), with
every run under `runs`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp

from tfjax.bench import attention_layout as layout
from tfjax.ops.kernels import api

SMI_FIELDS = "timestamp,clocks.sm,power.draw,power.limit"
# Bits of nvidia-smi's clocks-event reasons that mean "held back by power".
POWER_REASONS = 0x4 | 0x80  # software power cap, hardware power brake


class Sampler:
  """nvidia-smi in the background, one line per 100 ms; None fields without it."""

  def __init__(self):
    self.path, self.proc, self.reason = None, None, None
    if shutil.which("nvidia-smi") is None:
      return
    for reason in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
      ok = subprocess.run(["nvidia-smi", f"--query-gpu={reason}", "--format=csv,noheader"],
                          capture_output=True).returncode == 0
      if ok:
        self.reason = reason
        break
    fields = SMI_FIELDS + (f",{self.reason}" if self.reason else "")
    self.path = tempfile.mktemp(suffix=".csv")
    self.proc = subprocess.Popen(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", "100"],
        stdout=open(self.path, "w"))

  def samples(self):
    """[(unix time, SM MHz, W, limit W, power-capped?)] after stopping."""
    if self.proc is None:
      return []
    self.proc.terminate()
    self.proc.wait()
    out = []
    for line in open(self.path):
      parts = [x.strip() for x in line.split(",")]
      try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        capped = bool(int(parts[4], 16) & POWER_REASONS) if len(parts) > 4 else None
        out.append((t, float(parts[1]), float(parts[2]), float(parts[3]), capped))
      except (ValueError, IndexError):
        continue  # a header or an "[N/A]" field
    os.unlink(self.path)
    return out


def run_for(fn, seconds: float):
  """(first, last) unix times of back-to-back calls after warm-up, ms per call."""
  jax.block_until_ready(fn())
  t0, n = time.time(), 0
  while n == 0 or time.time() - t0 < seconds:
    for _ in range(10):
      out = fn()
    jax.block_until_ready(out)
    n += 10
  t1 = time.time()
  return t0, t1, (t1 - t0) / n * 1e3


def make_ids(name: str, bsz: int, seq: int):
  """(segment_ids, image_ids) int32[bsz, seq] of a named layout."""
  if name == "benchmark":
    return layout.make_layout(bsz, seq)
  kind, n = name[:4], int(name[4:]) if name[4:].isdigit() else 0
  if kind not in ("docs", "bidi") or not n or seq % n:
    raise ValueError(f"--layouts {name}: benchmark, docsN or bidiN with N dividing {seq}")
  doc = np.broadcast_to(np.arange(seq, dtype=np.int32) // n + 1, (bsz, seq)).copy()
  return doc, (doc if kind == "bidi" else np.zeros_like(doc))


def kernel_config(spec: str, d: int, seq: int):
  """None for `default`, else the MosaicGpuConfig of a mgpu_ab.py variant spec."""
  if spec == "default":
    return None
  from mgpu_ab import configured  # beside this script

  from tfjax.ops.kernels import mosaic_gpu
  f_spec, b_spec = spec.split("/")
  shipped = mosaic_gpu.heuristic_config(d, seq)
  return mosaic_gpu.MosaicGpuConfig(configured(f_spec, shipped.fwd),
                                    configured(b_spec, shipped.vjp))


def fwd_bwd_fn(bsz, seq, heads, d, lay, spec, dtype):
  """(thunk running one forward+backward, its effective FLOPs)."""
  doc, img = make_ids(lay, bsz, seq)
  nnz = int(layout.counts(doc, img)["transfusion"].sum())
  q, k, v, do = (jnp.asarray(x, dtype) for x in layout.make_inputs(bsz, seq, heads, d))
  seg, im = jnp.asarray(doc), jnp.asarray(img)
  plan = api.plan(seg, im, head_dim=d, dtype=dtype, impl="pallas",
                       config=kernel_config(spec, d, seq))

  @jax.jit
  def fb(q, k, v, do):
    o, vjp = jax.vjp(lambda q, k, v: api.attention(q, k, v, seg, im, plan=plan), q, k, v)
    return (o,) + vjp(do)

  return (lambda: fb(q, k, v, do)), 14.0 * heads * d * nnz


def summarize(samples, t0, t1):
  """Median SM MHz, median W, limit W, capped fraction over [t0, t1] (Nones if none)."""
  s = [x for x in samples if t0 <= x[0] <= t1]
  if not s:
    return None, None, None, None
  capped = [x[4] for x in s if x[4] is not None]
  return (statistics.median(x[1] for x in s), statistics.median(x[2] for x in s), s[0][3],
          sum(capped) / len(capped) if capped else None)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shape, short phases (CPU: no power)")
  p.add_argument("--shapes", default="8192/128", help="comma-separated L/D")
  p.add_argument("--layouts", default="benchmark", help="benchmark, docsN, bidiN (comma-separated)")
  p.add_argument("--variants", default="default",
                 help="semicolon-separated: default, or mgpu_ab.py FWD/BWD specs")
  p.add_argument("--seconds", type=float, default=5.0, help="length of each timed phase")
  p.add_argument("--matmul", type=int, default=8192, help="side of the bf16 matmul phase")
  args = p.parse_args()
  bsz, heads, dtype = 2, 16, jnp.bfloat16
  if args.quick:
    bsz, heads, args.shapes, args.seconds, args.matmul = 1, 2, "256/64", 0.2, 256
    dtype = jnp.float32
  print(f"backend={jax.default_backend()} devices={jax.devices()} jax={jax.__version__}", flush=True)
  # Everything compiles before sampling starts, so that no phase holds a compile.
  runs = {}
  for shape in args.shapes.split(","):
    seq, d = map(int, shape.split("/"))
    for lay in args.layouts.split(","):
      for spec in args.variants.split(";"):
        fn, flops = fwd_bwd_fn(bsz, seq, heads, d, lay, spec, dtype)
        jax.block_until_ready(fn())
        runs[f"{shape} {lay} {spec}"] = (fn, flops)
  m = args.matmul
  a = jax.random.normal(jax.random.key(0), (m, m), dtype)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))

  sampler = Sampler()
  time.sleep(0.5 if args.quick else 2.0)
  phases = [("idle", time.time() - (0.4 if args.quick else 1.5), time.time(), None, None)]
  phases.append(("matmul",) + run_for(lambda: mm(a), args.seconds) + (2.0 * m ** 3,))
  for name, (fn, flops) in runs.items():
    phases.append((name,) + run_for(fn, args.seconds) + (flops,))
  phases.append(("matmul again",) + run_for(lambda: mm(a), args.seconds) + (2.0 * m ** 3,))
  samples = sampler.samples()

  print(f"\n{len(samples)} nvidia-smi samples ({sampler.reason or 'no reasons field'})")
  print(f"{'phase':34} | {'ms/call':>8} | {'TF/s':>5} | {'SM MHz':>6} | {'W':>4} / limit | "
        f"{'capped':>6} | {'mJ/call':>7} | pJ/FLOP")
  table = {}
  for name, t0, t1, ms, flops in phases:
    mhz, watts, limit, capped = summarize(samples, t0 + 0.3 * (t1 - t0), t1)
    tflops = flops / ms / 1e9 if flops else None
    row = dict(ms=ms, tflops=tflops, sm_mhz=mhz, watts=watts, limit_w=limit,
               capped_fraction=capped,
               mj_per_call=watts * ms if watts is not None and ms else None,
               pj_per_flop=watts / tflops if watts is not None and tflops else None)
    table[name] = row
    f = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"{name:34} | {f(ms, '8.3f')} | {f(tflops, '5.0f')} | {f(mhz, '6.0f')} | "
          f"{f(watts, '4.0f')} / {f(limit, '.0f')} | {f(capped, '6.0%')} | "
          f"{f(row['mj_per_call'], '7.1f')} | {f(row['pj_per_flop'], '.2f')}")
  first = table[next(iter(runs))]
  rnd = lambda x, n=3: None if x is None else round(x, n)
  headline = dict(
      power_limit_w=table["matmul"]["limit_w"], idle_w=rnd(table["idle"]["watts"], 1),
      matmul_tflops=rnd(table["matmul"]["tflops"], 3), matmul_w=rnd(table["matmul"]["watts"], 1),
      matmul_sm_mhz=table["matmul"]["sm_mhz"], fwd_bwd_ms=rnd(first["ms"]),
      fwd_bwd_w=rnd(first["watts"], 1), fwd_bwd_sm_mhz=first["sm_mhz"],
      fwd_bwd_capped_fraction=rnd(first["capped_fraction"], 2),
      fwd_bwd_mj_per_call=rnd(first["mj_per_call"], 1), fwd_bwd_pj_per_flop=rnd(first["pj_per_flop"]),
      runs={n: {k: rnd(v) for k, v in r.items()} for n, r in table.items()})
  print(json.dumps(headline))


if __name__ == "__main__":
  main()
