"""Mosaic GPU kernels: checks and tile sweeps in one device call.

  python benchmarks/mgpu_dev.py [--configs "64,128,2,1;64,64,3,1"] [--shapes 4096/64,...]
      [--bwd "64,64,2,64,64,2,0;64,64,2,64,64,2,1,240"] [--no_triton_bwd] [--best_file PATH]

For each workload shape (attention_layout.py, B=2, H=16, bf16): the Mosaic
forward's out and lse against the Triton forward's, then forward time per
Mosaic config against the Triton forward, forward+backward (Mosaic forward +
Triton backward) for the best one, and with each --bwd Mosaic backward config
(gradients checked against the Triton kernels'). Milliseconds are medians
of groups of back-to-back calls (attention.py's timer).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from attention import _fwd_bwd, kernel_workload, rel_err, time_jax  # noqa: E402
from tfjax.ops.kernels import gpu, gpu_mosaic  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="4096/64,4096/128,8192/64,8192/128")
  p.add_argument("--configs", default="",
                 help="';'-separated bq,bk,stages,heads[,lpt] (default: a sweep)")
  p.add_argument("--reps", type=int, default=30)
  p.add_argument("--group", type=int, default=10)
  p.add_argument("--bwd", default="",
                 help="';'-separated gpu_mosaic_bwd.MosaicBwdConfig fields to time "
                 "(in order; trailing fields default, e.g. fuse_dq=1)")
  p.add_argument("--no_triton_bwd", action="store_true",
                 help="skip timing the all-Triton forward+backward (saves its compiles)")
  p.add_argument("--best_file", default="", help="write the best backward config here if it "
                 "beats the Triton backward at every shape")
  args = p.parse_args()
  bwd_cfgs = [tuple(map(int, c.split(","))) for c in args.bwd.split(";")] if args.bwd else []
  bwd_wins = {c: True for c in bwd_cfgs}
  bwd_time = {c: 0.0 for c in bwd_cfgs}
  print(f"jax {jax.__version__} {jax.devices()}", flush=True)
  bsz, heads = 2, 16
  summary = []
  for shape in args.shapes.split(","):
    seq, d = map(int, shape.split("/"))
    ks, ke, q, k, v, do, flops = kernel_workload(bsz, seq, heads, d)
    scale = d ** -0.5
    base = gpu.GpuConfig.for_head_dim(d)
    tri_sched = gpu.schedule(ks, ke, base)
    tri = jax.jit(lambda q, k, v: gpu._forward(q, k, v, ks, ke, tri_sched, scale=scale,
                                               cfg=base, interpret=False))
    o_t, lse_t = tri(q, k, v)
    t_tri = time_jax(tri, (q, k, v), args.reps, args.group)
    print(f"{seq}/{d} triton fwd {t_tri:.3f} ms ({flops / t_tri / 1e9:.0f} TF/s)", flush=True)
    if args.configs:
      configs = [tuple(map(int, c.split(","))) for c in args.configs.split(";")]
    else:
      # (block_q, block_k, stages, heads per CTA[, lpt])
      configs = [gpu.GpuConfig.mosaic_default(d), (64, 128, 2, 1), (64, 128, 2, 2),
                 (64, 128, 2, 4), (64, 64, 3, 4), (64, 64, 2, 2), (64, 128, 2, 4, 0)]
      if d == 64:
        configs += [(64, 128, 3, 4), (64, 128, 4, 8)]
      configs = list(dict.fromkeys(configs))
    best = None
    for c in configs:
      mc = gpu_mosaic.MosaicFwdConfig(*c)
      f = jax.jit(lambda q, k, v, mc=mc: gpu_mosaic.forward(q, k, v, ks, ke, scale=scale, cfg=mc))
      try:
        o_m, lse_m = f(q, k, v)
        live = np.asarray(lse_t) < 1e29
        e_o = rel_err(o_m, o_t)
        e_l = float(np.max(np.abs(np.where(live, np.asarray(lse_m) - np.asarray(lse_t), 0))))
        dead_ok = bool(np.all(np.asarray(lse_m)[~live] >= 1e29))
        t = time_jax(f, (q, k, v), args.reps, args.group)
      except Exception as e:  # report and go on with the next config
        print(f"{seq}/{d} mosaic {c}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
        continue
      print(f"{seq}/{d} mosaic {c}: {t:.3f} ms ({flops / t / 1e9:.0f} TF/s) "
            f"err o vs triton {e_o:.1e}, max |lse diff| {e_l:.1e}, dead rows ok {dead_ok}",
            flush=True)
      if best is None or t < best[1]:
        best = (c, t)
    if best is None:
      summary.append(f"{seq}/{d}: mosaic FAILED; triton fwd {t_tri:.3f}")
      continue
    cfg = dataclasses.replace(base, mosaic_fwd=best[0])
    fb_m = _fwd_bwd(lambda q, k, v: gpu.attention(q, k, v, ks, ke, scale=scale, config=cfg))
    fb_t = _fwd_bwd(lambda q, k, v: gpu.attention(q, k, v, ks, ke, scale=scale, config=base))
    got, want = fb_m(q, k, v, do), fb_t(q, k, v, do)
    errs = "/".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, want))
    t_fbm = time_jax(fb_m, (q, k, v, do), args.reps, args.group // 2)
    t_fbt = (float("nan") if args.no_triton_bwd else
             time_jax(fb_t, (q, k, v, do), args.reps, args.group // 2))
    line = (f"{seq}/{d}: fwd mosaic {best[0]} {best[1]:.3f} ms ({flops / best[1] / 1e9:.0f}) vs "
            f"triton {t_tri:.3f} | f+b {t_fbm:.3f} ms ({3.5 * flops / t_fbm / 1e9:.0f}) vs "
            f"triton {t_fbt:.3f} | f+b err vs triton {errs}")
    print(line, flush=True)
    summary.append(line)
    for bc in bwd_cfgs:
      cfg_b = dataclasses.replace(cfg, mosaic_bwd=bc)
      fb_b = _fwd_bwd(lambda q, k, v: gpu.attention(q, k, v, ks, ke, scale=scale, config=cfg_b))
      try:
        got_b = fb_b(q, k, v, do)
        errs_b = [rel_err(a, b) for a, b in zip(got_b, want)]
        t_b = time_jax(fb_b, (q, k, v, do), args.reps, args.group // 2)
      except Exception as e:
        print(f"{seq}/{d} mosaic bwd {bc}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
        bwd_wins[bc] = False
        continue
      ok = all(np.isfinite(x) and x < 1e-2 for x in errs_b)
      bwd_wins[bc] &= ok and t_b < t_fbm
      bwd_time[bc] += t_b
      line = (f"{seq}/{d}: f+b all-mosaic {bc} {t_b:.3f} ms ({3.5 * flops / t_b / 1e9:.0f}) vs "
              f"mosaic fwd + triton bwd {t_fbm:.3f} | err o/dq/dk/dv vs triton "
              + "/".join(f"{x:.1e}" for x in errs_b))
      print(line, flush=True)
      summary.append(line)
  winners = [c for c in bwd_cfgs if bwd_wins[c]]
  if winners and args.best_file:
    best_b = min(winners, key=lambda c: bwd_time[c])
    with open(args.best_file, "w") as f:
      f.write(",".join(map(str, best_b)))
    summary.append(f"best Mosaic backward (beats Triton at every shape): {best_b}")
  print("\nSUMMARY")
  print("\n".join(summary))


if __name__ == "__main__":
  main()
