"""Random reads from ArrayRecord files: grain's one-record read against ours.

  python benchmarks/record_reads.py [--quick]
  python benchmarks/record_reads.py --sweep=compare --shared=/tmp/science_gpu/compare/shared

grain's ArrayRecordDataSource reads record i with `reader.read([i])`, whose
cost grows with the file's record count; tfjax.data.sources.ArrayRecordSource
reads the range [i, i + 1) instead, and bulk readers (latent and edit caches,
the tokenizer corpus) batch their reads (`latents.read_range`). The table has
microseconds per record for files of 10k and 100k records (~400 bytes each,
one shard, like the shapes text corpus).

With --sweep and --shared (a science_gpu sweep's built shared/ directory,
e.g. left by a `tfjax-sweep` run) it also times the training input pipeline
of the sweep's first Transfusion run, in one process (data.num_workers=0),
with grain's source and with ours, and the cache builds' reads of its TFDS
scenes one at a time and by read_range. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _write(path: str, n: int) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  w = array_record_module.ArrayRecordWriter(path, "group_size:1")
  rng = np.random.default_rng(0)
  for _ in range(n):
    w.write(rng.bytes(400))
  w.close()


def _us_per_read(read, keys) -> float:
  for k in keys[:200]:
    read(k)
  t = time.perf_counter()
  for k in keys:
    read(k)
  return (time.perf_counter() - t) / len(keys) * 1e6


def record_reads(sizes, reads: int) -> list[dict]:
  import grain  # pylint: disable=g-import-not-at-top
  from tfjax.data import latents, sources  # pylint: disable=g-import-not-at-top
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in sizes:
      path = os.path.join(tmp, f"records-{n}")
      _write(path, n)
      keys = [int(k) for k in np.random.default_rng(1).integers(0, n, reads)]
      theirs, ours = grain.sources.ArrayRecordDataSource([path]), sources.ArrayRecordSource([path])
      batches = [keys[i:i + 256] for i in range(0, len(keys), 256)]
      row = {"records": n, "grain_us": round(_us_per_read(theirs.__getitem__, keys), 1),
             "range_us": round(_us_per_read(ours.__getitem__, keys), 1)}
      for name, src in (("grain_batch_us", theirs), ("range_batch_us", ours)):
        row[name] = round(_us_per_read(src.__getitems__, batches) / 256, 1)
      starts = list(range(0, min(n, len(keys)) - 256, 256))
      row["contiguous_batch_us"] = round(
          _us_per_read(lambda s: latents.read_range(theirs, s, s + 256), starts) / 256, 1)
      rows.append(row)
  return rows


def pipeline(sweep_name: str, shared: str, batches: int) -> tuple[list[dict], dict]:
  import grain  # pylint: disable=g-import-not-at-top
  from tfjax.config.files import load_module  # pylint: disable=g-import-not-at-top
  from tfjax.data import latents  # pylint: disable=g-import-not-at-top
  from tfjax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from tfjax.data import sources  # pylint: disable=g-import-not-at-top
  from tfjax.jobs import sweep as runner  # pylint: disable=g-import-not-at-top
  sweep = load_module(os.path.join(REPO, "configs", "science_gpu", f"{sweep_name}.py")).get_config()
  run = next(r for r in runner.plan(sweep) if r.family == "transfusion")
  with tempfile.TemporaryDirectory() as tmp:
    _, job = runner.run_job(run.config, shared, tmp, sweep.eval)
  c = job.config.copy_and_resolve_references()
  c.data.num_workers = 0
  # The cache builds' image reads (TFDS): one at a time against latents.read_range.
  images = sources.image_source(job.base_config, c.data.dir, "train")
  n = min(len(images), 4096)
  t = time.perf_counter()
  for i in range(n):
    images[i]  # pylint: disable=pointless-statement
  one = (time.perf_counter() - t) / n * 1e6
  t = time.perf_counter()
  for start in range(0, n, 256):
    latents.read_range(images, start, start + 256)
  tfds_row = {"scenes": len(images), "one_at_a_time_us": round(one, 1),
              "read_range_256_us": round((time.perf_counter() - t) / n * 1e6, 1)}
  ours, rows = sources.ArrayRecordSource, []
  for name, cls in (("grain", grain.sources.ArrayRecordDataSource), ("range", ours)):
    sources.ArrayRecordSource = cls
    try:
      it = pipeline_lib.make_train_iterator(c, c.data.dir)
      for _ in range(5):
        next(it)
      t = time.perf_counter()
      for _ in range(batches):
        next(it)
      rows.append({"source": name, "scenes": int(c.data.num_train_scenes),
                   "ms_per_batch": round((time.perf_counter() - t) / batches * 1e3, 1)})
    finally:
      sources.ArrayRecordSource = ours
  return rows, tfds_row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="2k reads instead of 20k; 50 batches")
  ap.add_argument("--sweep", help="configs/science_gpu/SWEEP.py whose pipeline to time")
  ap.add_argument("--shared", help="that sweep's built shared/ directory")
  args = ap.parse_args()
  reads = 2000 if args.quick else 20000
  rows = record_reads((10_000, 100_000), reads)
  print("Microseconds per record, random keys unless said: one at a time, in batches of 256,"
        " and batches of 256 consecutive records (latents.read_range).\n")
  print("| records | grain | ours (range) | grain, batch | ours, batch | consecutive batch |\n"
        "|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['records']} | {r['grain_us']} | {r['range_us']} | {r['grain_batch_us']} | "
          f"{r['range_batch_us']} | {r['contiguous_batch_us']} |")
  out = {"reads": reads, "record_reads": rows}
  if args.sweep:
    if not args.shared:
      raise SystemExit("--sweep needs --shared (the sweep's built shared/ directory)")
    out["pipeline"], out["tfds_images"] = pipeline(args.sweep, args.shared,
                                                   50 if args.quick else 300)
    print(f"\n| pipeline source | scenes | ms per batch (one process) |\n|---|---|---|")
    for r in out["pipeline"]:
      print(f"| {r['source']} | {r['scenes']} | {r['ms_per_batch']} |")
    t = out["tfds_images"]
    print(f"\n| TFDS scenes | one at a time us | read_range by 256 us |\n|---|---|---|\n"
          f"| {t['scenes']} | {t['one_at_a_time_us']} | {t['read_range_256_us']} |")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
