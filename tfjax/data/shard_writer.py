"""Resumable sharded ArrayRecord output: input shard i of N -> one file per split.

Output names are `{split}.array_record-{i:05d}-of-{N:05d}`. Resuming is per
input shard:

  1. records go to `NAME.tmp` files (ShardOutput.write);
  2. when the input shard ends they are renamed to their final names, then
     `done/{i:05d}.json` (counts, skipped keys) is written atomically (commit);
  3. a rerun skips inputs with a done marker (pending_inputs) and redoes any
     other from the start, overwriting its files: every record lands once.

`finalize`, run by the process that finds every done marker present, writes
`skips.jsonl` and then `metadata.json` (readers need it, so a cache is usable
only once complete). `job.json`, written first (check_job), pins the job's
settings: a rerun with other settings fails instead of mixing two caches.
"""
from __future__ import annotations

import collections
import glob as glob_lib
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from array_record.python import array_record_module
from tqdm import tqdm

from tfjax.data import latents as latents_lib

JOB_FILE = "job.json"
DONE_DIR = "done"
SKIPS_FILE = "skips.jsonl"


def _private_tmp(path: str) -> str:
  """A temp name no other process (on any host) writes at the same time."""
  return f"{path}.{socket.gethostname()}-{os.getpid()}.part"


def _write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename): readers see all of it or none."""
  tmp = _private_tmp(path)
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def output_name(split: str, index: int, num_inputs: int) -> str:
  return f"{split}.array_record-{index:05d}-of-{num_inputs:05d}"


def done_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, DONE_DIR, f"{index:05d}.json")


class ShardOutput:
  """The output of one input shard: a temp ArrayRecord file per split, then
  renamed together and marked done by `commit`."""

  def __init__(self, out_dir: str, index: int, num_inputs: int, input_name: str):
    self.out_dir, self.index, self.num_inputs = out_dir, index, num_inputs
    self.input = input_name
    self.writers: dict[str, Any] = {}
    self.counts: collections.Counter = collections.Counter()
    self.skipped: list[list[str]] = []

  def _path(self, split: str) -> str:
    return os.path.join(self.out_dir, output_name(split, self.index, self.num_inputs))

  def write(self, split: str, raw: bytes) -> None:
    if split not in self.writers:
      self.writers[split] = array_record_module.ArrayRecordWriter(self._path(split) + ".tmp",
                                                                  "group_size:1")
    self.writers[split].write(raw)
    self.counts[split] += 1

  def skip(self, split: str, reason: str, key: str) -> None:
    logging.debug("skipping %s (%s)", key, reason)
    self.skipped.append([split, reason, key])

  def commit(self, **extra: Any) -> dict[str, Any]:
    """Closes and renames the split files, then writes the done marker last."""
    for w in self.writers.values():
      w.close()
    for split in self.writers:
      os.replace(self._path(split) + ".tmp", self._path(split))
    marker = {"index": self.index, "input": self.input,
              "splits": {s: {"num_records": n, "shard": os.path.basename(self._path(s))}
                         for s, n in self.counts.items()},
              "skipped": self.skipped, **extra}
    _write_json(done_path(self.out_dir, self.index), marker)
    return marker


def check_job(out_dir: str, spec: dict[str, Any]) -> None:
  """Records the job's settings, or fails if the directory holds another job's."""
  os.makedirs(os.path.join(out_dir, DONE_DIR), exist_ok=True)
  path = os.path.join(out_dir, JOB_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if diff:
      raise ValueError(f"{out_dir} holds a cache made with other settings ({', '.join(diff)} "
                       f"differ: {[old.get(k) for k in diff]} there, "
                       f"{[spec.get(k) for k in diff]} now): delete {out_dir} to rebuild, or "
                       f"point the config (data.latents) at another directory")
    return
  _write_json(path, spec)


def pending_inputs(out_dir: str, num_inputs: int, process_index: int,
                   process_count: int) -> tuple[list[int], list[int]]:
  """(this process's input shard indices, those of them not done yet)."""
  mine = list(range(process_index, num_inputs, process_count))
  return mine, [i for i in mine if not os.path.exists(done_path(out_dir, i))]


def finalize(out_dir: str, num_inputs: int, base: dict[str, Any]) -> dict[str, Any] | None:
  """Writes skips.jsonl and metadata.json once every input shard is done; returns
  the metadata, or None while some shard (of any process) is not done."""
  markers = []
  for i in range(num_inputs):
    try:
      with open(done_path(out_dir, i)) as f:
        markers.append(json.load(f))
    except FileNotFoundError:
      return None
  splits: dict[str, dict[str, Any]] = {}
  skips_path = os.path.join(out_dir, SKIPS_FILE)
  with open(_private_tmp(skips_path), "w") as f:
    for m in markers:
      for split, entry in sorted(m["splits"].items()):
        s = splits.setdefault(split, {"num_records": 0, "shards": [], "skipped": []})
        s["num_records"] += entry["num_records"]
        s["shards"].append(entry["shard"])
      for split, reason, key in m["skipped"]:
        splits.setdefault(split, {"num_records": 0, "shards": [], "skipped": []})
        splits[split]["skipped"].append([reason, key])
        f.write(json.dumps({"split": split, "reason": reason, "key": key,
                            "input": m["input"]}) + "\n")
  os.replace(_private_tmp(skips_path), skips_path)
  for s in splits.values():
    s["skip_counts"] = dict(collections.Counter(r for r, _ in s["skipped"]))
  if not any(s["num_records"] for s in splits.values()):
    raise ValueError(f"{out_dir}: every record of the {num_inputs} input shards was skipped "
                     f"(see {os.path.join(out_dir, SKIPS_FILE)})")
  meta = dict(base, splits=splits, num_inputs=num_inputs,
              skip_counts=dict(sum((collections.Counter(s["skip_counts"])
                                    for s in splits.values()), collections.Counter())))
  for m in markers:  # every process must have made the same latents
    if "latent_shape" in m and m["latent_shape"] is not None:
      if meta.setdefault("latent_shape", m["latent_shape"]) != m["latent_shape"]:
        raise ValueError(f"{out_dir}: input {m['input']} has latents {m['latent_shape']}, "
                         f"others {meta['latent_shape']}")
  for stale in glob_lib.glob(os.path.join(out_dir, "*.array_record-*.tmp")):  # killed runs
    os.remove(stale)
  _write_json(os.path.join(out_dir, latents_lib.METADATA_FILE), meta)
  return meta


class Progress:
  """A tqdm bar over records whose total is estimated from the finished shards
  (a stream's record count is unknown until it is read), so it shows records/s
  and an ETA; the summary counts written and skipped records by reason."""

  def __init__(self, num_pending: int, label: str, enabled: bool):
    # In a log file (pod workers, SLURM), a line every 30 s rather than ten a second.
    self.bar = tqdm(total=None, unit="rec", desc=label, disable=not enabled, smoothing=0.1,
                    dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    self.num_pending, self.shards_done, self.records = num_pending, 0, 0
    self.written: collections.Counter = collections.Counter()
    self.skipped: collections.Counter = collections.Counter()

  def records_done(self, n: int) -> None:
    self.records += n
    self.bar.update(n)

  def shard_done(self, marker: dict[str, Any]) -> None:
    self.shards_done += 1
    self.written.update({s: e["num_records"] for s, e in marker["splits"].items()})
    self.skipped.update(r for _, r, _ in marker["skipped"])
    self.bar.total = round(self.records / self.shards_done * self.num_pending)
    self.bar.set_postfix(shards=f"{self.shards_done}/{self.num_pending}",
                         skipped=sum(self.skipped.values()))
    self.bar.refresh()

  def close(self) -> None:
    self.bar.close()


def summary(progress: Progress, t0: float, mine: list[int], pending: list[int],
             meta: dict[str, Any] | None, out_dir: str) -> dict[str, Any]:
  seconds = time.time() - t0
  report = {"out": out_dir, "shards_this_process": len(mine),
            "shards_done_now": progress.shards_done,
            "shards_already_done": len(mine) - len(pending),
            "written": dict(progress.written), "skipped": dict(progress.skipped),
            "records_per_s": round(progress.records / seconds, 1) if seconds > 0 else 0.0,
            "seconds": round(seconds, 1), "complete": meta is not None}
  if meta is not None:
    report["cache"] = {s: {"num_records": e["num_records"], "skip_counts": e["skip_counts"]}
                       for s, e in meta["splits"].items()}
  logging.info("%s: %s", out_dir, json.dumps(report))
  return report
