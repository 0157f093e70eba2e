"""Mosaic GPU kernel variants side by side, in one device call (A/B runs).

  python benchmarks/mgpu_ab.py [--variants "d0/d0;d1/d1;64,64,2,1,1,0,0,1/d1"]
      [--shapes 4096/64,...] [--rounds 2] [--reps 20]
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
      --csv --log-file ncu.csv python benchmarks/mgpu_ab.py --profile [same flags]
  python benchmarks/mgpu_ab.py --summarize ncu.csv [same flags]

A variant is FWD/BWD[+nomask|+nosplit] (diagnostics: `_without_masks`,
`_unsplit`): the forward's `gpu_mosaic.MosaicFwdConfig` fields and
the backward's `gpu_mosaic_bwd.MosaicBwdConfig` fields as comma-separated
integers, or `dN`: the default tiles for the shape with skip_empty=N. Per
shape (attention_layout.py, B=2, H=16, bf16; `--layout causal`: one causal
document per row instead) every variant's forward and
forward+backward is timed with its schedule built outside the call, in
`--rounds` interleaved rounds (so run-to-run drift shows), and its outputs
and gradients are compared with the first variant's. The last line is JSON:
{"<shape> <variant>": [fwd ms, f+b ms], ...} (medians over the rounds).
With --profile each variant's forward+backward runs once inside a profiler
window instead (kernel by kernel under Nsight Compute, as
profile_attention.py), and --summarize prints those windows' breakdown.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from attention import kernel_workload, rel_err, time_jax  # noqa: E402
from tfjax.ops.kernels import gpu  # noqa: E402
from tfjax.ops.kernels.gpu_mosaic import MosaicFwdConfig  # noqa: E402
from tfjax.ops.kernels.gpu_mosaic_bwd import MosaicBwdConfig  # noqa: E402


def _fields(spec: str, default: tuple, cls) -> tuple:
  if spec.startswith("d"):
    return dataclasses.astuple(dataclasses.replace(cls(*default), skip_empty=int(spec[1:])))
  return tuple(int(x) for x in spec.split(","))


def _without_masks(sched):
  """A diagnostic, not a kernel (its outputs are wrong): every partial tile
  of every schedule taken as full, so that the variant's time shows what the
  mask arithmetic on partial tiles costs. Variant suffix `+nomask`."""
  from tfjax.ops.kernels.block_map import EMPTY, FULL
  full = lambda s: s._replace(states=jax.numpy.where(s.states == EMPTY, EMPTY, FULL))
  bwd = sched.bwd._replace(dkv=full(sched.bwd.dkv), dq=full(sched.bwd.dq))
  return sched._replace(fwd=full(sched.fwd), bwd=bwd)


def _unsplit(sched):
  """Every LOWER/UPPER tile back to PARTIAL (both bounds tested): what the
  one-bound masks save. Variant suffix `+nosplit`; outputs unchanged."""
  from tfjax.ops.kernels.block_map import LOWER, PARTIAL
  both = lambda s: s._replace(states=jax.numpy.where(s.states >= LOWER, PARTIAL, s.states))
  return sched._replace(fwd=both(sched.fwd),
                        bwd=sched.bwd._replace(dkv=both(sched.bwd.dkv), dq=both(sched.bwd.dq)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4096/64,4096/128,8192/64,8192/128")
  p.add_argument("--variants", default="d0/d0;d1/d1")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--group", type=int, default=10)
  p.add_argument("--window_ms", type=float, default=20.0, help="see attention.time_jax")
  p.add_argument("--layout", default="benchmark", choices=["benchmark", "causal"],
                 help="benchmark: attention_layout.py's packed batch; causal: one causal "
                      "document per row (half the tiles listed: past the dS^T buffer's "
                      "default capacity, so dq_from_ds takes its recomputing fallback)")
  p.add_argument("--profile", action="store_true",
                 help="one profiler window per variant's forward+backward, no timing")
  p.add_argument("--summarize", default="", help="print the breakdown from ncu's CSV log")
  args = p.parse_args()
  if args.summarize:
    from profile_attention import summarize_windows
    summarize_windows(args.summarize, [f"{shape} {spec}" for shape in args.shapes.split(",")
                                       for spec in args.variants.split(";")])
    return
  if args.profile:
    # Before JAX opens the GPU, as in profile_attention.py: else ncu crashed.
    import torch  # noqa: F401
  print(f"jax {jax.__version__} {jax.devices()}", flush=True)
  bsz, heads = 2, 16
  result = {}
  for shape in args.shapes.split(","):
    seq, d = map(int, shape.split("/"))
    ks, ke, q, k, v, do, flops = kernel_workload(bsz, seq, heads, d)
    if args.layout == "causal":
      ks = jax.numpy.zeros_like(ks)
      ke = jax.numpy.broadcast_to(jax.numpy.arange(1, seq + 1, dtype=ks.dtype), ks.shape)
      flops = 4.0 * heads * d * bsz * seq * (seq + 1) / 2
    scale = d ** -0.5
    base = gpu.GpuConfig.for_head_dim(d)
    fns = {}
    for spec in args.variants.split(";"):
      f_spec, b_spec = spec.split("+")[0].split("/")
      cfg = dataclasses.replace(
          base, mosaic_fwd=_fields(f_spec, gpu.GpuConfig.mosaic_default(d, seq), MosaicFwdConfig),
          mosaic_bwd=_fields(b_spec, gpu.GpuConfig.mosaic_bwd_default(d), MosaicBwdConfig))
      sched = jax.jit(lambda ks, ke, cfg=cfg: gpu.schedule(ks, ke, cfg))(ks, ke)
      if "+nomask" in spec:
        sched = _without_masks(sched)
      if "+nosplit" in spec:
        sched = _unsplit(sched)

      def fwd(q, k, v, sched, cfg=cfg):
        return gpu.attention(q, k, v, ks, ke, scale=scale, config=cfg, sched=sched)

      def fb(q, k, v, do, sched, fwd=fwd):
        o, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, sched), q, k, v)
        return (o,) + vjp(do)

      fns[spec] = (jax.jit(fwd), jax.jit(fb), sched)
    if args.profile:
      from profile_attention import profile_window
      for spec, (_, g, sched) in fns.items():
        for _ in range(3):
          jax.block_until_ready(g(q, k, v, do, sched))
        print(f"PROFILE {shape} {spec}", flush=True)
        profile_window(lambda: g(q, k, v, do, sched))
      continue
    ref = None
    times = {s: ([], []) for s in fns}
    for r in range(args.rounds):
      for spec, (f, g, sched) in fns.items():
        try:
          if r == 0:
            got = g(q, k, v, do, sched)
            ref = got if ref is None else ref
            errs = "/".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, ref))
          tf = time_jax(f, (q, k, v, sched), args.reps, args.group, args.window_ms)
          tb = time_jax(g, (q, k, v, do, sched), args.reps, args.group // 2, args.window_ms)
        except Exception as e:  # report and go on with the next variant
          print(f"{shape} {spec}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
          continue
        times[spec][0].append(tf)
        times[spec][1].append(tb)
        print(f"{shape} round {r} {spec}: fwd {tf:.3f} ms ({flops / tf / 1e9:.0f} TF/s) "
              f"f+b {tb:.3f} ms ({3.5 * flops / tb / 1e9:.0f})"
              + (f" | o/dq/dk/dv vs first {errs}" if r == 0 else ""), flush=True)
    for spec, (tf, tb) in times.items():
      if tf:
        result[f"{shape} {spec}"] = [round(statistics.median(tf), 4),
                                     round(statistics.median(tb), 4)]
  print("\nvariant | fwd ms | f+b ms")
  for key, (tf, tb) in result.items():
    print(f"{key} | {tf:.3f} | {tb:.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
