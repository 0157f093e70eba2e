"""Mosaic GPU kernel variants side by side, in one device call (A/B runs).

  python tools/kernel_lab/mgpu_ab.py [--variants "d/d;d:skip_empty=0/d:dq=RECOMPUTE_OWN_DELTA"]
      [--shapes 4096/64,...] [--rounds 2] [--reps 20]
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
      --csv --log-file ncu.csv python tools/kernel_lab/mgpu_ab.py --profile [same flags]
  python tools/kernel_lab/mgpu_ab.py --summarize ncu.csv [same flags]

A variant is FWD/BWD[+nomask|+nosplit|+cond] (diagnostics: `_without_masks`,
`_unsplit`; `+cond`: the schedule not `mosaic_gpu.settle`d, so that a FROM_DS
backward checks its dS^T buffer in a lax.cond in every call): the
forward's `mosaic_gpu_fwd.FwdConfig` and the backward's
`mosaic_gpu_vjp.VjpConfig` as `d[:field=V...]`, the shape's shipped config
with the named fields replaced (e.g. `d:persistent=1`, `d:dq=FROM_DS`). Per shape
(attention_layout.py, B=2, H=16, bf16; `--layout` names others: one causal
document per row, causal documents or bidirectional blocks of N tokens)
every variant's forward and forward+backward is timed with its schedule
built outside the call, in `--rounds` interleaved rounds (so run-to-run
drift shows), and its outputs and gradients are compared with the first
variant's. The last line is JSON: {"<shape> <variant>": [fwd ms, f+b ms], ...}
(medians over the rounds). With --profile each variant's forward+backward runs
once inside a profiler window instead (kernel by kernel under Nsight Compute,
as profile_attention.py), and --summarize prints those windows' breakdown.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import enum

import jax

from tfjax.bench.attention import kernel_workload, rel_err, time_jax
from tfjax.ops.kernels import mosaic_gpu


def configured(spec: str, default):
  """`default` (a kernel config dataclass) with the fields `spec` names replaced:
  `d[:field=V...]`, V an integer, 0/1 for booleans, a member name for enums,
  or None."""
  head, *changes = spec.split(":")
  if head != "d":
    raise ValueError(f"variant {spec!r}: d[:field=value...]")
  types = {f.name: type(getattr(default, f.name)) for f in dataclasses.fields(default)}
  values = {}
  for change in changes:
    name, value = change.split("=")
    if name not in types:
      raise ValueError(f"variant {spec!r}: {name} is not a field of {type(default).__name__}")
    kind = types[name]
    if value == "None":
      values[name] = None
    elif issubclass(kind, enum.Enum):
      values[name] = kind[value]
    elif kind is bool:
      values[name] = bool(int(value))
    else:
      values[name] = int(value)
  return dataclasses.replace(default, **values)


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
  p.add_argument("--variants", default="d/d;d:skip_empty=0/d:skip_empty=0")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--group", type=int, default=10)
  p.add_argument("--window_ms", type=float, default=20.0,
                 help="see tfjax.bench.attention.time_jax")
  p.add_argument("--layout", default="benchmark",
                 help="comma-separated layouts, each timed with the same compiled "
                      "variants. benchmark: attention_layout.py's packed batch; causal: one "
                      "causal document per row (half the tiles listed: past the dS^T "
                      "buffer's default capacity, so FROM_DS takes its recomputing "
                      "fallback); docsN: causal documents of N tokens; bidiN: "
                      "bidirectional blocks of N tokens (with N a multiple of 64 every "
                      "listed 64x64 tile is full: list length without partial tiles)")
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
  result, flops_of = {}, {}
  for shape in args.shapes.split(","):
    seq, d = map(int, shape.split("/"))
    ks0, ke0, q, k, v, do, flops0 = kernel_workload(bsz, seq, heads, d)
    layouts = {name: synthetic_layout(name, ks0, ke0, flops0, heads, d)
               for name in args.layout.split(",")}
    scale = d ** -0.5
    shipped = mosaic_gpu.heuristic_config(d, seq)
    fns = {}
    for spec in args.variants.split(";"):
      f_spec, b_spec = spec.split("+")[0].split("/")
      cfg = mosaic_gpu.MosaicGpuConfig(configured(f_spec, shipped.fwd),
                                       configured(b_spec, shipped.vjp))

      def plan(ks, ke, spec=spec, cfg=cfg):
        sched = jax.jit(lambda ks, ke: mosaic_gpu.schedule(ks, ke, cfg))(ks, ke)
        if "+cond" not in spec:  # as api.plan outside jit
          sched = mosaic_gpu.settle(sched, cfg)
        if "+nomask" in spec:
          sched = _without_masks(sched)
        if "+nosplit" in spec:
          sched = _unsplit(sched)
        return sched

      def fwd(q, k, v, ks, ke, sched, cfg=cfg):
        return mosaic_gpu.attention(q, k, v, ks, ke, scale=scale, config=cfg, sched=sched)

      def fb(q, k, v, do, ks, ke, sched, fwd=fwd):
        o, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, ks, ke, sched), q, k, v)
        return (o,) + vjp(do)

      fns[spec] = (jax.jit(fwd), jax.jit(fb), plan)
    for lay, (ks, ke, flops) in layouts.items():
      tag = shape if len(layouts) == 1 else f"{shape} {lay}"
      timed = _time_layout(args, tag, fns, q, k, v, do, ks, ke, flops)
      result.update(timed)
      flops_of.update(dict.fromkeys(timed, flops))
  print("\nvariant | fwd ms (TF/s) | f+b ms (TF/s), effective: on the unmasked pairs")
  for key, (tf, tb) in result.items():
    fl = flops_of[key]
    print(f"{key} | {tf:.3f} ({fl / tf / 1e9:.0f}) | {tb:.3f} ({3.5 * fl / tb / 1e9:.0f})")
  print(json.dumps(result))


def synthetic_layout(name, ks, ke, flops, heads, d):
  """(k_start, k_end, forward FLOPs) of a named layout (see --layout)."""
  jnp = jax.numpy
  if name == "benchmark":
    return ks, ke, flops
  bsz, seq = ks.shape
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=ks.dtype), ks.shape)
  if name == "causal":
    name = f"docs{seq}"
  n = int(name[4:])
  if name[:4] not in ("docs", "bidi") or seq % n:
    raise ValueError(f"--layout {name}: benchmark, causal, docsN or bidiN with N dividing {seq}")
  start = pos // n * n
  pairs = n * (n + 1) / 2 if name.startswith("docs") else n * n
  end = pos + 1 if name.startswith("docs") else start + n
  return start, end, 4.0 * heads * d * bsz * (seq // n) * pairs


def _time_layout(args, shape, fns, q, k, v, do, ks, ke, flops):
  """{"<shape> <variant>": [fwd ms, f+b ms]} of every variant on one layout."""
  result = {}
  scheds = {spec: plan(ks, ke) for spec, (_, _, plan) in fns.items()}
  if args.profile:
    from profile_attention import profile_window
    for spec, (_, g, _) in fns.items():
      sched = scheds[spec]
      for _ in range(3):
        jax.block_until_ready(g(q, k, v, do, ks, ke, sched))
      print(f"PROFILE {shape} {spec}", flush=True)
      profile_window(lambda: g(q, k, v, do, ks, ke, sched))
    return result
  ref = None
  times = {s: ([], []) for s in fns}
  for r in range(args.rounds):
    for spec, (f, g, _) in fns.items():
      sched = scheds[spec]
      try:
        if r == 0:
          got = g(q, k, v, do, ks, ke, sched)
          ref = got if ref is None else ref
          errs = "/".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, ref))
        tf = time_jax(f, (q, k, v, ks, ke, sched), args.reps, args.group, args.window_ms)
        tb = time_jax(g, (q, k, v, do, ks, ke, sched), args.reps, args.group // 2,
                      args.window_ms)
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
  return result


if __name__ == "__main__":
  main()
