"""Data pipeline benchmark: packed tokens per second and packing efficiency.

  python benchmarks/data.py [--quick] [--data_dir=DIR] [--out=result.json]

Builds a shapes dataset (64x64 images, PixelPatchEncoder latents 8x8x8, patch
size 2: 16 patches per image) in a temporary directory unless --data_dir holds
one, then measures
  * packed tokens/s (non-padding positions per second of wall time, after the
    first batch) with 0, 1 and 2 Grain worker processes at seq_len 1024;
  * packing efficiency (non-padding fraction) at seq_len 1024 and 4096;
and compares the throughput with what a 0.16B-parameter model consumes on one
H100 at the MFU the trainer measured there (26.3%: benchmarks/RESULTS.md,
Training, Pallas attention at seq 4096): tokens/s = MFU * 989e12 / (6 * 0.16e9).
Prints a table, then the JSON on the last line.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

_QUICK = flags.DEFINE_bool("quick", False, "Smaller dataset and fewer batches (CI smoke run).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built data to reuse (default: a temp dir).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
_MFU = flags.DEFINE_float("mfu", 0.263, "Model FLOPs utilisation for the H100 figure (default: "
                          "the trainer's measured 0.16B MFU on an H100, RESULTS.md).")

H100_BF16_PEAK = 989e12
MODEL_PARAMS = 0.16e9


def bench_config(seq_len: int, batch_size: int, workers: int, quick: bool):
  from tfjax.config import default_config
  c = default_config()
  c.model.vocab_size = 512
  c.model.latent_size, c.model.latent_channels, c.model.patch_size = 8, 8, 2
  d = c.data
  d.image_size, d.vocab_size = 64, 512
  d.num_train_scenes = 500 if quick else 4000
  d.num_eval_scenes = 50 if quick else 200
  d.num_text_docs = 500 if quick else 4000
  d.seq_len, d.batch_size, d.num_workers = seq_len, batch_size, workers
  d.max_images_per_seq = seq_len // 16  # never the binding limit
  return c


def measure(config, data_dir: str, num_batches: int, warmup: int = 0) -> dict[str, float]:
  from tfjax.data import pipeline
  it = pipeline.make_train_iterator(config, data_dir, process_index=0, process_count=1)
  t0 = time.perf_counter()
  next(it)  # start-up (worker processes, first fill) is not throughput
  startup = time.perf_counter() - t0
  # Workers fill their buffers while the others start: drain well past them so
  # the timed window is steady state, not buffered batches.
  for _ in range(warmup):
    next(it)
  tokens = slots = 0
  t0 = time.perf_counter()
  for _ in range(num_batches):
    b = next(it)
    tokens += int((b["segment_ids"] > 0).sum())
    slots += b["segment_ids"].size
  dt = time.perf_counter() - t0
  it.close()
  return {"tokens_per_s": tokens / dt, "efficiency": tokens / slots, "startup_s": startup,
          "batches": num_batches, "warmup": warmup}


def _main(argv) -> None:
  del argv
  from tfjax.data import build, latents
  quick = _QUICK.value
  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="tfjax_bench_data_")
  base = bench_config(1024, 8, 0, quick)
  t0 = time.perf_counter()
  build.build_all(base, data_dir)
  build.build_latents(base, data_dir, latents.PixelPatchEncoder(downsample=8, channels=8))
  build_s = time.perf_counter() - t0

  n = 20 if quick else 150
  runs = {}
  for workers in (0, 1, 2):
    runs[f"workers_{workers}"] = measure(bench_config(1024, 8, workers, quick), data_dir, n,
                                         warmup=n // 2)
  eff_4096 = measure(bench_config(4096, 8, 0, quick), data_dir, max(4, n // 4))
  h100 = _MFU.value * H100_BF16_PEAK / (6 * MODEL_PARAMS)
  result = {
      "packing_efficiency_1024": round(runs["workers_0"]["efficiency"], 4),
      "packing_efficiency_4096": round(eff_4096["efficiency"], 4),
      "tokens_per_s_workers_0": round(runs["workers_0"]["tokens_per_s"]),
      "tokens_per_s_workers_1": round(runs["workers_1"]["tokens_per_s"]),
      "tokens_per_s_workers_2": round(runs["workers_2"]["tokens_per_s"]),
      "h100_0p16b_tokens_per_s": round(h100),
      "h100_reference": f"6ND at {_MFU.value:.0%} MFU of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s, "
                        f"N={MODEL_PARAMS / 1e9:.2f}B",
      "build_s": round(build_s, 1),
      "quick": quick,
      "cpu_count": os.cpu_count(),
  }
  print(f"{'setting':<26}{'tokens/s':>12}{'x H100 need':>13}{'non-pad':>9}{'startup s':>11}")
  for name, r in list(runs.items()) + [("seq 4096, workers_0", eff_4096)]:
    label = name if name.startswith("seq") else f"seq 1024, {name}"
    print(f"{label:<26}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / h100:>13.3f}"
          f"{r['efficiency']:>9.2%}{r['startup_s']:>11.1f}")
  print(f"H100 0.16B model at {_MFU.value:.0%} MFU consumes {h100:,.0f} tokens/s")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(_main)
