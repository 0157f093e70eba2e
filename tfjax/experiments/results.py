"""Stored sweep results: one JSON per finished run, the only input of a report.

A run's record holds everything its table row and plots need (metrics,
FLOPs, steps, seconds) and what reproduces it (the config overrides, device,
JAX version, date), so results kept in the repository
(benchmarks/science_gpu/runs/SWEEP/RUN.json) rebuild every table without the
runs' directories, and later sessions add runs beside them.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from tfjax.files import write_atomic


def environment() -> dict[str, Any]:
  """Device kind and count, JAX version and the UTC date of this process."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"device": devices[0].device_kind, "num_devices": len(devices),
          "platform": devices[0].platform, "jax_version": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def record_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, f"{name}.json")


def write_json(path: str, obj: dict[str, Any]) -> str:
  """`obj` as JSON at `path`, written whole (no reader sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp: str) -> None:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True, default=float)
      f.write("\n")
  return write_atomic(path, write)


def write_record(results_dir: str, record: dict[str, Any]) -> str:
  """RESULTS_DIR/NAME.json."""
  return write_json(record_path(results_dir, record["name"]), record)


def read_records(results_dirs: Sequence[str], names: Iterable[str]) -> dict[str, dict[str, Any]]:
  """{run name: record} for the named runs stored in any of `results_dirs`
  (the first directory holding a run wins). A file that is not a record of
  its name raises, naming the file."""
  out: dict[str, dict[str, Any]] = {}
  for name in names:
    for d in results_dirs:
      path = record_path(d, name)
      if not os.path.exists(path):
        continue
      try:
        with open(path) as f:
          rec = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"stored sweep result {path} is not valid JSON ({e}): delete it "
                         f"to rerun the run, or restore it") from e
      if rec.get("name") != name or "flops" not in rec:
        raise ValueError(f"stored sweep result {path} is not the record of run {name} "
                         f"(name {rec.get('name')!r}, keys {sorted(rec)[:8]}...)")
      out[name] = rec
      break
  return out


def unplanned(results_dirs: Sequence[str], names: Iterable[str]) -> list[str]:
  """Stored records whose run this sweep config no longer plans (reported, not used)."""
  planned = set(names)
  found = set()
  for d in results_dirs:
    if os.path.isdir(d):
      found |= {f[:-5] for f in os.listdir(d) if f.endswith(".json")}
  return sorted(found - planned)


def seed_groups(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
  """One row per (family, size, budget): each metric's mean and min-max over seeds."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["family"], r["size"], r["budget"]), []).append(r)
  out = []
  for (fam, size, budget), rs in groups.items():
    row: dict[str, Any] = {"family": fam, "size": size, "budget": budget,
                           "seeds": sorted(r.get("seed") for r in rs if r.get("seed") is not None),
                           "flops": float(np.mean([r["flops"] for r in rs]))}
    for m in metrics:
      vals = [r[m] for r in rs if r.get(m) is not None]
      row[m] = float(np.mean(vals)) if vals else None
      row[f"{m}_range"] = (float(min(vals)), float(max(vals))) if len(vals) > 1 else None
    out.append(row)
  return sorted(out, key=lambda r: (r["family"], r["size"], r["flops"]))
