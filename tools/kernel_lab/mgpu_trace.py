"""Where a Mosaic GPU kernel's time goes inside its CTAs: Mosaic GPU's in-kernel
profiler over the dk/dv kernel's `jax.named_scope` regions (consumer, kv_wait,
tiles, tile, store; producer), one forward+backward call per layout.

  (device tool, carry .whl_app)  python3 tools/kernel_lab/mgpu_trace.py \
      [--layouts bidi256,benchmark] [--bwd d1:ds_capacity=100:persistent_dkv=1] [--space 128]

Per layout it prints, for each region and warpgroup role (c: consumer, p:
producer), the count and the mean / median / p90 duration, and the mean idle
gap between a consumer's consecutive top-level regions (persistent grids:
between one work item's store and the next one's K/V wait). Durations are in
kilocycles of the SM clock (the profiler reads %clock; the CTA start times in
its trace are %globaltimer nanoseconds, so gaps between CTAs are not
reported: they mix the two clocks and include the profiler's own trace
copy-out). The profiler's buffer takes shared memory in every Mosaic kernel of
the call, not only the dk/dv kernel (its warpgroups x --space x 16 bytes):
configs within 1 KiB of the limit (the persistent dk/dv grid with dS^T
buffers at head dim 128) do not fit. Profiling slows the kernel
(~3x here); compare regions with each other, not with timings. Last line:
JSON {layout: {region: mean kilocycles}}. NOTES_attention.md M50.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import tempfile
import time

import numpy as np


def region_stats(events: list[dict], warpgroups: int) -> dict:
  """{(role, name): [durations]} and {"a->b": [gaps]} from one Perfetto trace
  (B/E events per tid = 1 + block * warpgroups + warpgroup; the last
  warpgroup is the producer). Gaps: between consecutive top-level regions
  inside each consumer's outermost one."""
  stacks, spans = collections.defaultdict(list), []
  for e in events:
    if e["ph"] == "B":
      stacks[e["tid"]].append(e)
    else:
      begin = stacks[e["tid"]].pop()
      spans.append((e["tid"] - 1, begin["name"], len(stacks[e["tid"]]), begin["ts"], e["ts"]))
  durations, inner = collections.defaultdict(list), collections.defaultdict(list)
  for tid, name, depth, t0, t1 in spans:
    role = "p" if tid % warpgroups == warpgroups - 1 else "c"
    durations[(role, name)].append(t1 - t0)
    if role == "c" and depth == 1:
      inner[tid].append((t0, t1, name))
  gaps = collections.defaultdict(list)
  for xs in inner.values():
    xs.sort()
    for (_, a1, an), (b0, _, bn) in zip(xs, xs[1:]):
      gaps[f"{an}->{bn}"].append(b0 - a1)
  return {"regions": dict(durations), "gaps": dict(gaps)}


def _print(tag: str, stats: dict) -> dict:
  print(f"\n{tag} (kilocycles)\n| role | region | n | mean | median | p90 |\n|---|---|---|---|---|---|")
  means = {}
  for (role, name), ds in sorted(stats["regions"].items()):
    ds = np.asarray(ds)
    means[f"{role} {name}"] = round(float(ds.mean()), 3)
    print(f"| {role} | {name} | {len(ds)} | {ds.mean():.3f} | {np.median(ds):.3f} | "
          f"{np.percentile(ds, 90):.3f} |")
  for name, g in sorted(stats["gaps"].items()):
    g = np.asarray(g)
    means[f"gap {name}"] = round(float(g.mean()), 3)
    print(f"| c | gap {name} | {len(g)} | {g.mean():.3f} | {np.median(g):.3f} | "
          f"{np.percentile(g, 90):.3f} |")
  return means


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layouts", default="bidi256,bidi1024,benchmark",
                 help="comma-separated mgpu_ab.py layouts (benchmark, causal, docsN, bidiN)")
  p.add_argument("--shape", default="8192/128", help="seq/head_dim (B=2, H=16, bf16)")
  p.add_argument("--bwd", default="d:ds_capacity=100",
                 help="the backward's VjpConfig in mgpu_ab.py's variant spelling "
                      "(d[:field=V...])")
  p.add_argument("--space", type=int, default=128, help="profiler regions per warpgroup")
  args = p.parse_args()
  out = tempfile.mkdtemp(prefix="mosaic_trace_")
  import jax
  from mgpu_ab import configured, synthetic_layout  # beside this script

  from tfjax.bench.attention import kernel_workload
  from tfjax.ops.kernels import mosaic_gpu, mosaic_gpu_common

  seq, d = map(int, args.shape.split("/"))
  bsz, heads = 2, 16
  ks0, ke0, q, k, v, do, flops0 = kernel_workload(bsz, seq, heads, d)
  shipped = mosaic_gpu.heuristic_config(d, seq)
  bwd = configured(args.bwd, shipped.vjp)
  cfg = dataclasses.replace(shipped, vjp=bwd)
  print(f"jax {jax.__version__} {jax.devices()}\n{bwd}")
  result = {}
  for lay in args.layouts.split(","):
    ks, ke, _ = synthetic_layout(lay, ks0, ke0, flops0, heads, d)
    sched = mosaic_gpu.settle(
        jax.jit(lambda ks, ke: mosaic_gpu.schedule(ks, ke, cfg))(ks, ke), cfg)
    fwd = lambda q, k, v: mosaic_gpu.attention(q, k, v, ks, ke, scale=d ** -0.5, config=cfg,
                                               sched=sched)
    fb = jax.jit(lambda q, k, v, do: jax.vjp(fwd, q, k, v)[1](do))
    for f in glob.glob(os.path.join(out, "*")):
      os.remove(f)
    with mosaic_gpu_common.profiling(out, args.space):  # traced (and compiled) inside
      jax.block_until_ready(fb(q, k, v, do))
    jax.effects_barrier()
    time.sleep(1.0)
    for path in sorted(glob.glob(os.path.join(out, "*"))):
      with open(path) as f:
        events = json.load(f)["traceEvents"]
      if any(e["name"] == "kv_wait" for e in events):  # the dk/dv kernel's trace
        result[lay] = _print(f"{args.shape} {lay}", region_stats(events, bwd.consumers_dkv + 1))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
