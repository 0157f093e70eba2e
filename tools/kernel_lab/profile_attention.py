"""Where one attention forward+backward call spends its time, kernel by kernel.

Runs the attention benchmark's workload (attention_layout.py, B=2, H=16,
bf16) through `api.attention` with a prebuilt plan, warms it up, then
opens the CUDA profiler window (cuProfilerStart, through torch) around one
call per shape, so that Nsight Compute times only those kernels:

  ncu --clock-control none --profile-from-start off \\
      --metrics gpu__time_duration.sum --csv --log-file ncu.csv \\
      python3 tools/kernel_lab/profile_attention.py [--shapes 4096/64,8192/128]
  python3 tools/kernel_lab/profile_attention.py --summarize ncu.csv

The second command prints, per shape, each kernel's microseconds (Mosaic
kernels, XLA fusions, copies) and the sum: the split between the attention
kernels and the XLA work around them. ncu serialises kernels, so the sum is
the time with no overlap between kernels, close to a call's own time here
(one stream). The last line is one JSON object: {shape: {kernel: us}}.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json



def run(shapes: list[str], with_plan_in_call: bool) -> None:
  import jax
  import jax.numpy as jnp
  import torch  # noqa: F401  (before JAX opens the GPU: imported after it, ncu crashed)

  from tfjax.bench import attention_layout as layout
  from tfjax.bench.attention import fwd_bwd
  from tfjax.ops.kernels import api

  for shape in shapes:
    seq, d = map(int, shape.split("/"))
    doc, img = layout.make_layout(2, seq)
    seg, im = jnp.asarray(doc), jnp.asarray(img)
    q, k, v, do = (jnp.asarray(x, jnp.bfloat16) for x in layout.make_inputs(2, seq, 16, d))
    plan = api.plan(seg, im, head_dim=d, dtype=q.dtype, impl="pallas")
    variants = {"plan given": lambda q, k, v: api.attention(q, k, v, seg, im, plan=plan)}
    if with_plan_in_call:
      variants["plan in the call"] = lambda q, k, v: api.attention(
          q, k, v, seg, im, impl="pallas")
    for name, f in variants.items():
      fb = fwd_bwd(f)
      for _ in range(3):
        jax.block_until_ready(fb(q, k, v, do))
      print(f"PROFILE {shape} {name}", flush=True)
      profile_window(lambda: fb(q, k, v, do))


def profile_window(call) -> None:
  """One call inside a CUDA profiler window that `summarize` can find: a torch
  fill kernel opens it in ncu's log (the caller has warmed `call` up)."""
  import jax
  import torch
  marker = torch.empty(1, device="cuda")
  torch.cuda.synchronize()
  torch.cuda.profiler.start()
  marker.fill_(1.0)
  torch.cuda.synchronize()
  jax.block_until_ready(call())
  torch.cuda.profiler.stop()


def summarize(path: str, shapes: list[str], with_plan_in_call: bool) -> None:
  summarize_windows(path, [f"{s} {n}" for s in shapes for n in (
      ("plan given", "plan in the call") if with_plan_in_call else ("plan given",))])


def summarize_windows(path: str, names: list[str]) -> dict:
  """ncu's CSV (one row per kernel launch, in launch order) split per window
  (`profile_window`), one window per name."""
  rows = []
  with open(path) as f:
    lines = [ln for ln in f if ln.startswith('"')]
  for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
      scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3,
               "msecond": 1e3}[r["Metric Unit"]]
      value = float(r["Metric Value"].replace(",", ""))
      rows.append((int(r["ID"]), r["Kernel Name"], value * scale))
  rows.sort()
  windows = []
  for _, kernel, us in rows:
    if "FillFunctor" in kernel:  # run()'s marker opens a window
      windows.append([])
    elif windows:
      windows[-1].append((kernel, us))
  if len(windows) != len(names):
    raise SystemExit(f"{len(windows)} profiler windows in {path}, expected {len(names)}"
                     " (the same shapes and variants as the profiled run?)")
  result = {}
  for name, window in zip(names, windows):
    acc = collections.OrderedDict()
    names_in_window = [kernel[:60] for kernel, _ in window]
    for i, (kernel, us) in enumerate(window):
      key = kernel[:60]
      if names_in_window.count(key) > 1 and "mosaic" in key:  # every Mosaic kernel is "entry_..."
        key = f"{key} #{i + 1} of {len(window)}"
      acc[key] = acc.get(key, 0.0) + us
    total = sum(acc.values())
    print(f"\n{name}: {len(window)} kernels, {total:.1f} us")
    for kernel, us in sorted(acc.items(), key=lambda x: -x[1]):
      print(f"  {us:8.1f} us  {100 * us / total:5.1f}%  {kernel}")
    result[name] = {k: round(v, 1) for k, v in acc.items()}
  print(json.dumps(result))
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="4096/64,4096/128,8192/64,8192/128")
  p.add_argument("--with_plan_in_call", action="store_true",
                 help="also profile the call that builds its own plan")
  p.add_argument("--summarize", default="", help="print the breakdown from ncu's CSV log")
  args = p.parse_args()
  shapes = args.shapes.split(",")
  if args.summarize:
    summarize(args.summarize, shapes, args.with_plan_in_call)
  else:
    run(shapes, args.with_plan_in_call)


if __name__ == "__main__":
  main()
