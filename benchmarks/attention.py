"""Transfusion attention benchmark: this kernel against its peers, one run.

Workload: `tfjax/bench/attention_layout.py` (a copy of ../shared/bench/), B=2, H=16, bf16,
L in {4096, 8192}, head dim in {64, 128}. Effective TFLOP/s count only the
unmasked pairs: forward 4*H*D*nnz, forward+backward 3.5x that.

The first row is `impl="pallas"` as tfjax.ops.kernels.api picks it (on Hopper:
the Mosaic GPU kernels of mosaic_gpu.py) with its AttentionPlan (key intervals and work
lists) built outside the timed call, as the peers' block mask and key ranges
are and as the model builds it once for all layers; the second row is the
same kernel building its plan inside every call. `--with_triton` adds the
Triton kernels of triton.py for comparison.

Peers (GPU): the XLA reference with a dense mask, cuDNN causal attention (a
dense-causal yardstick, not Transfusion-correct), torch FlexAttention with a
block mask from the same layout, and tokamax if importable. Last, two
yardstick rows on the documents' causal mask alone (image spans causal too):
this kernel and cuDNN's packed (THD) causal attention, the vendor kernel for
causal + segment_ids, with TF/s on that mask's own pairs in their notes.

Timing: medians over --reps; JAX calls in groups of back-to-back calls at
least --window_ms long, then one block (`time_jax`); torch calls between CUDA
events around --group calls.

  python benchmarks/attention.py            # GPU: the full table
  python benchmarks/attention.py --quick    # anywhere: tiny, interpret mode on CPU

Prints a table and, last, one JSON line with the headline numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import jax
import jax.numpy as jnp

from tfjax.bench import attention_layout as layout
from tfjax.bench.attention import (fwd_bwd, kernel_workload, packed_documents, rel_err,
                                   time_jax)
from tfjax.ops.attention import xla_attention
from tfjax.ops.kernels import api, triton
from tfjax.ops.mask import transfusion_mask


def time_torch(fn, reps: int, group: int) -> float:
  import torch
  fn()
  fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(group):
      fn()
    b.record()
    torch.cuda.synchronize()
    times.append(a.elapsed_time(b) / group)
  return statistics.median(times)


def triton_attention(q, k, v, seg, img, config):
  """The Triton kernels on any GPU (the api picks Mosaic GPU on Hopper): the
  layout padded to the config's multiple, as api.attention pads."""
  from tfjax.ops.mask import key_ranges
  seq = q.shape[1]
  padded = -(-seq // config.multiple) * config.multiple
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2))
  ks, ke = key_ranges(pad(seg), pad(img))
  out = triton.attention(pad(q), pad(k), pad(v), ks, ke, scale=q.shape[-1] ** -0.5,
                         config=config)
  return out[:, :seq]


def jax_entries(doc, img, q, k, v, do, args, kernel_kw):
  """name -> (fwd fn, fwd+bwd fn) for the JAX implementations."""
  seg, im = jnp.asarray(doc), jnp.asarray(img)
  impl = "pallas"
  # Like FlexAttention's block mask and tokamax's key ranges below, the plan
  # (key intervals, work lists) is built once outside the timed call, as the
  # model builds it once per batch for all its layers.
  plan = api.plan(seg, im, head_dim=q.shape[-1], dtype=q.dtype, impl=impl, **kernel_kw)
  out = {
      "tfjax pallas (plan given)": lambda q, k, v: api.attention(
          q, k, v, seg, im, plan=plan),
      "tfjax pallas (plan in the call)": lambda q, k, v: api.attention(
          q, k, v, seg, im, impl=impl, **kernel_kw),
  }
  if jax.default_backend() == "gpu" and not args.block_q and args.with_triton:
    tri = triton.heuristic_config(q.shape[-1], q.dtype)
    out["tfjax pallas, Triton kernels"] = lambda q, k, v: triton_attention(q, k, v, seg, im, tri)
  if not args.quick or args.with_xla:
    mask = transfusion_mask(seg, im)
    out["XLA reference (dense mask)"] = lambda q, k, v: xla_attention(q, k, v, mask)
  if jax.default_backend() == "gpu" and not args.no_tokamax:
    try:
      out["tokamax mosaic_gpu (k ranges)"] = tokamax_fns(doc, img)
    except Exception as e:  # not carried, or an API change
      print(f"tokamax unavailable: {type(e).__name__}: {str(e)[:300]}")
  if jax.default_backend() == "gpu":
    out["cuDNN causal (not TF-exact)"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
  if args.only:
    keep = args.only.split(",")
    out = {n: f for n, f in out.items() if n.startswith("tfjax") or any(x in n for x in keep)}
  return {n: (jax.jit(f), fwd_bwd(f)) for n, f in out.items()}


def torch_flex(doc, img, qn, kn, vn, don, args, mode=None):
  """(fwd ms, fwd+bwd ms, out) of FlexAttention with the layout's block mask;
  mode="max-autotune-no-cudagraphs" lets inductor time its tile configs (the
  forward's and the backward's) and keep the fastest: the tuned setting."""
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  dev = "cuda"
  d_t = torch.as_tensor(doc, device=dev)
  i_t = torch.as_tensor(img, device=dev)

  def mask_mod(b, h, qi, ki):
    same_doc = d_t[b, qi] == d_t[b, ki]
    same_img = (i_t[b, qi] == i_t[b, ki]) & (i_t[b, qi] > 0)
    return same_doc & ((ki <= qi) | same_img)

  bsz, seq = doc.shape
  bm = create_block_mask(mask_mod, bsz, None, seq, seq, device=dev)
  to = lambda x: torch.as_tensor(x, device=dev).transpose(1, 2).to(torch.bfloat16)
  q, k, v, do = (to(x) for x in (qn, kn, vn, don))
  q.requires_grad_(True)
  k.requires_grad_(True)
  v.requires_grad_(True)
  flex = torch.compile(flex_attention, mode=mode)
  fwd = lambda: flex(q, k, v, block_mask=bm)

  def fwd_bwd():
    o = flex(q, k, v, block_mask=bm)
    torch.autograd.grad(o, (q, k, v), do)

  with torch.no_grad():
    t_f = time_torch(fwd, args.reps, args.group)
  t_fb = time_torch(fwd_bwd, args.reps, args.group)
  out = fwd().detach().transpose(1, 2).float().cpu().numpy()
  return t_f, t_fb, out


def tokamax_fns(doc, img):
  """tokamax's Mosaic GPU attention with per-query [k_start, k_end) ranges."""
  from tokamax._src.ops.attention import api, base  # needs jax 0.11 and xprof
  from tfjax.ops.mask import key_ranges
  ks, ke = key_ranges(jnp.asarray(doc), jnp.asarray(img))
  mask = base.Mask(k_start=ks[:, None, :], k_end=ke[:, None, :])
  impl = api.IMPLEMENTATIONS["mosaic_gpu"]
  return lambda q, k, v: impl(q, k, v, mask=mask)


def cudnn_packed_causal(doc):
  """cuDNN's fused attention on the layout's documents, each one causal
  sequence of a packed (THD) batch: what NVIDIA's kernel computes for
  causal + segment_ids. Not Transfusion-exact (image spans stay causal), but
  the same documents, so its time per pair compares with ours on that mask."""
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
  offsets, lengths = (jnp.asarray(x) for x in packed_documents(doc))
  return lambda q, k, v: dot_product_attention(
      q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
      scale=q.shape[-1] ** -0.5, mask_type=MaskType.CAUSAL, qkv_layout="BTNH")


def doc_causal_rows(doc, q, k, v, do, args, heads):
  """Yardstick rows on the documents' causal mask (no image spans): this
  kernel and cuDNN's packed causal attention on the same mask. Their notes
  give TFLOP/s on that mask's own pairs; the table's TF/s columns divide the
  Transfusion FLOPs as for every row."""
  seg, none = jnp.asarray(doc), jnp.zeros_like(jnp.asarray(doc))
  plan = api.plan(seg, none, head_dim=q.shape[-1], dtype=q.dtype, impl="pallas")
  fns = {"tfjax pallas, doc-causal (not TF-exact)":
         lambda q, k, v: api.attention(q, k, v, seg, none, plan=plan)}
  if jax.default_backend() == "gpu":
    fns["cuDNN packed doc-causal (not TF-exact)"] = cudnn_packed_causal(doc)
  flops_f = 4.0 * heads * q.shape[-1] * int(layout.counts(doc, np.zeros_like(doc))["doc_causal"].sum())
  rows, first = [], None
  for name, f in fns.items():
    try:
      fb = fwd_bwd(f)
      got = fb(q, k, v, do)
      first = got if first is None else first
      err = "/".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, first))
      tf = time_jax(jax.jit(f), (q, k, v), args.reps, args.group, args.window_ms)
      tfb = time_jax(fb, (q, k, v, do), args.reps, max(1, args.group // 2), args.window_ms)
    except Exception as e:  # a yardstick failing must not hide the table
      rows.append((name, float("nan"), float("nan"), f"FAILED: {type(e).__name__}: {str(e)[:200]}"))
      continue
    rows.append((name, tf, tfb, f"own pairs: fwd {flops_f / tf / 1e9:.0f} / f+b "
                 f"{3.5 * flops_f / tfb / 1e9:.0f} TF/s; o/dq/dk/dv vs the first row {err}"))
  return rows


def run_shape(bsz, seq, heads, d, args):
  doc, img = layout.make_layout(bsz, seq)
  nnz = int(layout.counts(doc, img)["transfusion"].sum())
  flops_f = 4.0 * heads * d * nnz
  flops_fb = 3.5 * flops_f
  qn, kn, vn, don = layout.make_inputs(bsz, seq, heads, d)
  dtype = jnp.float32 if args.quick else jnp.bfloat16
  q, k, v, do = (jnp.asarray(x, dtype) for x in (qn, kn, vn, don))
  kernel_kw = {}
  if args.block_q:
    kernel_kw = dict(block_q=args.block_q, block_k=args.block_k or args.block_q)
  rows = []
  # Correctness of ours against the float32 reference on the same bf16 inputs.
  seg, im = jnp.asarray(doc), jnp.asarray(img)
  ref_o = None
  if seq <= 4096 or args.quick:
    f32 = lambda x: x.astype(jnp.float32)
    mask = transfusion_mask(seg, im)
    ref = fwd_bwd(lambda q, k, v: xla_attention(q, k, v, mask))(f32(q), f32(k), f32(v), f32(do))
    ref_o = ref[0]
  entries = jax_entries(doc, img, q, k, v, do, args, kernel_kw)
  for name, (f, fb) in entries.items():
    err = ""
    try:
      if name.startswith(("tfjax", "tokamax")) and ref_o is not None:
        got = fb(q, k, v, do)
        err = "err o/dq/dk/dv " + "/".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, ref))
      tf = time_jax(f, (q, k, v), args.reps, args.group, args.window_ms)
      tfb = time_jax(fb, (q, k, v, do), args.reps, max(1, args.group // 2), args.window_ms)
    except Exception as e:  # a peer failing must not hide the others
      rows.append((name, float("nan"), float("nan"), f"FAILED: {type(e).__name__}: {str(e)[:200]}"))
      continue
    rows.append((name, tf, tfb, err))
  if jax.default_backend() == "gpu" and not args.no_torch and (
      not args.only or "Flex" in args.only):
    try:
      tf, tfb, o = torch_flex(doc, img, qn, kn, vn, don, args)
      err = f"err o {rel_err(o, ref_o):.1e}" if ref_o is not None else ""
      rows.append(("torch FlexAttention (block mask)", tf, tfb, err))
    except Exception as e:
      rows.append(("torch FlexAttention (block mask)", float("nan"), float("nan"),
                   f"FAILED: {type(e).__name__}: {str(e)[:200]}"))
    if args.flex_tuned:
      name = "torch FlexAttention (autotuned)"
      try:
        tf, tfb, o = torch_flex(doc, img, qn, kn, vn, don, args, mode="max-autotune-no-cudagraphs")
        err = f"err o {rel_err(o, ref_o):.1e}" if ref_o is not None else ""
        rows.append((name, tf, tfb, err))
      except Exception as e:
        rows.append((name, float("nan"), float("nan"), f"FAILED: {type(e).__name__}: {str(e)[:200]}"))
  if not args.only or "doc-causal" in args.only:
    rows += doc_causal_rows(doc, q, k, v, do, args, heads)
  return dict(seq=seq, d=d, nnz=nnz, flops_f=flops_f, flops_fb=flops_fb, rows=rows)


SWEEP = dict(
    fwd=((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
         (64, 64, 4, 4), (128, 64, 4, 3), (64, 32, 4, 3)),
    dkv=((64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 3),
         (64, 64, 8, 3), (128, 128, 8, 2), (32, 128, 4, 3)),
    dq=((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 32, 4, 3),
        (64, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 2)),
)


def sweep(bsz, seq, heads, d, args):
  """Times each GPU kernel's (block_q, block_k, num_warps, num_stages) in turn.

  Forward configs are timed on the forward alone; dk/dv and dq configs on
  forward+backward with the other kernels at their defaults.
  """
  import dataclasses
  ks, ke, q, k, v, do, flops_f = kernel_workload(bsz, seq, heads, d)
  base = triton.heuristic_config(d)
  for part, configs in SWEEP.items():
    for c in configs:
      cfg = dataclasses.replace(base, **{part: triton.Tiles(*c)})
      f = lambda q, k, v: triton.attention(q, k, v, ks, ke, scale=d ** -0.5, config=cfg)
      try:
        if part == "fwd":
          t = time_jax(jax.jit(f), (q, k, v), args.reps, args.group)
          tf = flops_f / t / 1e9
        else:
          t = time_jax(fwd_bwd(f), (q, k, v, do), args.reps, args.group // 2)
          tf = 3.5 * flops_f / t / 1e9
        print(f"sweep {seq}/{d} {part} {c}: {t:.3f} ms ({tf:.0f} TF/s)", flush=True)
      except Exception as e:
        print(f"sweep {seq}/{d} {part} {c}: FAILED {type(e).__name__}: {str(e)[:150]}",
              flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes; CPU interpret mode")
  p.add_argument("--reps", type=int, default=30, help="timed repetitions (median)")
  p.add_argument("--group", type=int, default=10,
                 help="back-to-back JAX calls per repetition, at least (5 for fwd+bwd)")
  p.add_argument("--window_ms", type=float, default=20.0,
                 help="and at least this many milliseconds of them (0: --group alone, "
                 "the timing of the tables before 2026-11-25 18:00 UTC)")
  p.add_argument("--seqs", default="4096,8192", help="sequence lengths")
  p.add_argument("--dims", default="64,128", help="head dims")
  p.add_argument("--block_q", type=int, default=0, help="override block_q (0: default)")
  p.add_argument("--block_k", type=int, default=0, help="override block_k")
  p.add_argument("--no_torch", action="store_true", help="skip FlexAttention")
  p.add_argument("--only", default="", help="comma-separated name substrings of peers to time"
                 " besides this kernel (e.g. tokamax,Flex)")
  p.add_argument("--flex_tuned", action="store_true",
                 help="also time FlexAttention compiled with mode=max-autotune-no-cudagraphs"
                      " (inductor's own tile search; minutes of compilation per shape)")
  p.add_argument("--no_tokamax", action="store_true", help="skip tokamax")
  p.add_argument("--with_xla", action="store_true", help="time XLA in --quick too")
  p.add_argument("--with_triton", action="store_true",
                 help="also time this kernel with the Triton forward and backward")
  p.add_argument("--sweep", action="store_true", help="sweep GPU kernel tile configs first")
  p.add_argument("--sweep_seqs", default="8192", help="sequence lengths to sweep")
  args = p.parse_args()
  bsz, heads = 2, 16
  seqs = [int(s) for s in args.seqs.split(",")]
  dims = [int(s) for s in args.dims.split(",")]
  if args.quick:
    bsz, heads, seqs, args.reps, args.group = 1, 2, [256], 2, 1
    dims = [64]
  print(f"backend={jax.default_backend()} devices={jax.devices()} jax={jax.__version__}")
  if args.sweep:
    for s in [int(x) for x in args.sweep_seqs.split(",")]:
      for d in dims:
        sweep(bsz, s, heads, d, args)
  results = []
  for s in seqs:
    for d in dims:
      r = run_shape(bsz, s, heads, d, args)
      results.append(r)
      for name, tf, tfb, note in r["rows"]:  # as it comes: a later shape may time out
        print(f"ROW {s}/{d} | {name} | fwd {tf:.3f} ms ({r['flops_f'] / tf / 1e9:.0f}) | f+b "
              f"{tfb:.3f} ms ({r['flops_fb'] / tfb / 1e9:.0f}) | {note}", flush=True)
      # The headline so far, so that a run cut by a time limit still has one.
      print("PARTIAL " + json.dumps(headline_figures(results)), flush=True)
  print(f"\n{'L/D':>9} | {'implementation':34} | {'fwd ms':>8} {'TF/s':>6} | "
        f"{'f+b ms':>8} {'TF/s':>6} | notes")
  for r in results:
    for name, tf, tfb, note in r["rows"]:
      print(f"{r['seq']:>5}/{r['d']:<3} | {name:34} | {tf:8.3f} {r['flops_f'] / tf / 1e9:6.0f} | "
            f"{tfb:8.3f} {r['flops_fb'] / tfb / 1e9:6.0f} | {note}")
    ours, exact = r["rows"][0], _exact_peers(r)
    if exact:
      best = min(exact, key=lambda x: x[2])
      print(f"{'':>9}   speedup fwd+bwd vs best other exact ({best[0]}): {best[2] / ours[2]:.2f}x"
            f"; fwd vs best: {min(x[1] for x in exact) / ours[1]:.2f}x")
  print(json.dumps(headline_figures(results)))


def _exact_peers(r):
  """The rows of other Transfusion-exact implementations that produced a time."""
  return [x for x in r["rows"][1:] if "not TF-exact" not in x[0] and np.isfinite(x[2])
          and not x[0].startswith("tfjax")]


def headline_figures(results) -> dict:
  """The issue's headline keys: this kernel's f+b TFLOP/s per shape and its
  speedup over the best other exact entry (None where not measured)."""
  headline = {}
  for r in results:
    ours, exact = r["rows"][0], _exact_peers(r)
    key = f"L{r['seq']}_D{r['d']}"
    headline[f"tflops_fwd_bwd_{key}"] = round(r["flops_fb"] / ours[2] / 1e9, 1)
    in_call = [x for x in r["rows"] if x[0] == "tfjax pallas (plan in the call)"]
    if in_call:
      headline[f"tflops_fwd_bwd_{key}_plan_in_call"] = round(
          r["flops_fb"] / in_call[0][2] / 1e9, 1)
    if exact:
      headline[f"speedup_vs_best_other_fwd_bwd_{key}"] = round(
          min(x[2] for x in exact) / ours[2], 3)
  for s in (4096, 8192):
    for d in (64, 128):
      headline.setdefault(f"tflops_fwd_bwd_L{s}_D{d}", None)
  headline.setdefault("speedup_vs_best_other_fwd_bwd_L8192_D128", None)
  return headline


if __name__ == "__main__":
  main()
