"""Sharded, resumable jobs from stream sources to ArrayRecord caches.

  run_latent_job(config, encoder, out_dir)   images -> VAE latents (the latent cache)
  run_text_job(config, out_dir)              text corpus -> ArrayRecord text cache

Both map input shard i (of N, the sorted glob of the source) to at most one
output shard per split, `{split}.array_record-{i:05d}-of-{N:05d}`. Process p
of P takes the inputs i with i % P == p (`jax.process_index()` /
`process_count()` unless given). Resuming is per input shard:

  1. records go to `NAME.tmp` files;
  2. when the input shard ends they are renamed to their final names, then
     `done/{i:05d}.json` (counts, skipped keys) is written (atomically);
  3. a rerun skips inputs with a done marker and redoes any other from the
     start, overwriting its files: every input record lands exactly once.

The process that finds every done marker present writes `skips.jsonl` and then
`metadata.json` (readers need it, so a cache is usable only once complete).
`job.json`, written first, pins the source, shard list and preparation
settings: a rerun with other settings fails instead of mixing two caches.

The latent job encodes with the VAE data-parallel over this process's local
devices (a 1-D mesh; batches padded to `data.latents_batch_size` rounded up
to the device count), decoding and resizing images on `data.prepare_threads`
threads while the devices encode the previous batch. Latents are stored as
`data.latents_dtype` (bfloat16 by default); readers convert to float32.
"""
from __future__ import annotations

import collections
import concurrent.futures
import glob as glob_lib
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Callable, Iterable

from array_record.python import array_record_module
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from tqdm import tqdm

from tfjax.data import latents as latents_lib
from tfjax.data import prepare, streams
from tfjax.data.pipeline import process_index_count

JOB_FILE = "job.json"
DONE_DIR = "done"
SKIPS_FILE = "skips.jsonl"


# ------------------------------------------------------------- shard files --
def check_keys(config: ml_collections.ConfigDict) -> None:
  """The data.* keys both jobs read, checked before any work."""
  d = config.data
  if not 0 <= d.validation_percent <= 100:
    raise ValueError(f"config key data.validation_percent={d.validation_percent}: must be in "
                     f"[0, 100]")
  if d.latents_batch_size < 1 or d.prepare_threads < 1:
    raise ValueError(f"config keys data.latents_batch_size={d.latents_batch_size} and "
                     f"data.prepare_threads={d.prepare_threads} must be >= 1")


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


class _Progress:
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


def _summary(progress: _Progress, t0: float, mine: list[int], pending: list[int],
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


# ---------------------------------------------------------------- the jobs --
class MeshEncoder:
  """uint8 image batches -> latents, data-parallel over `devices` (a 1-D mesh).

  Batches are padded to `batch` (a multiple of the device count) so one
  compiled program serves every call; the result is asynchronous (a jax.Array
  for jax encoders), so the host prepares the next batch meanwhile.
  """

  def __init__(self, encoder: latents_lib.Encoder, devices: list[Any], batch_size: int):
    self.encoder, self.jax = encoder, jax
    n = len(devices)
    self.batch = -(-max(1, batch_size) // n) * n
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self.sharding = NamedSharding(self.mesh, P("data"))
    if hasattr(encoder, "params"):  # a LoadedVAE: one replica of the weights per device
      encoder.params = jax.device_put(encoder.params, NamedSharding(self.mesh, P()))
    self._to_unit = jax.jit(lambda x: x.astype(jnp.float32) / 127.5 - 1.0,
                            out_shardings=self.sharding)

  def __call__(self, images: np.ndarray) -> Any:
    """uint8 [k <= batch, H, W, 3] -> latents [batch, h, w, c] (rows past k are padding)."""
    x = self._to_unit(self.jax.device_put(_pad(images, self.batch), self.sharding))
    return self.encoder.encode(x)

  # The Encoder protocol, so that build_latent_cache (random-access sources)
  # encodes on every device too.
  scale = property(lambda self: self.encoder.scale)
  shift = property(lambda self: self.encoder.shift)

  def __repr__(self) -> str:
    return repr(self.encoder)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """float32 [b, H, W, 3] in [-1, 1] -> float32 latents [b, h, w, c]."""
    n = len(self.mesh.devices.flat)
    x = self.jax.device_put(_pad(np.asarray(images, np.float32), -(-len(images) // n) * n),
                            self.sharding)
    return np.asarray(self.encoder.encode(x), np.float32)[:len(images)]


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  """x padded with zero rows to `rows` rows."""
  if rows == len(x):
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def _prepare_one(policy: prepare.ImagePolicy, data: bytes) -> np.ndarray | prepare.SkipRecord:
  try:
    return prepare.prepare_image(data, policy)
  except prepare.SkipRecord as e:
    return e


class _Batch:
  """Records of one batch awaiting their latents."""

  def __init__(self, keys, captions, splits, latents):
    self.keys, self.captions, self.splits, self.latents = keys, captions, splits, latents


def _encode_shard(records: Iterable[Any], out: ShardOutput, encode: MeshEncoder,
                  policy: prepare.ImagePolicy, pool: concurrent.futures.Executor,
                  validation_percent: float, dtype: Any, progress: _Progress,
                  on_batch: Callable[[int, int], None] | None) -> list[int] | None:
  """Streams one input shard through preparation and the encoder into `out`.

  A three-stage pipeline: while the threads prepare batch k (decode, resize)
  and the devices encode batch k-1, the main thread reads the tar stream and
  writes batch k-2's latents.
  """
  latent_shape = None
  batch_no = 0

  def write(b: _Batch | None) -> None:
    nonlocal latent_shape
    if b is None:
      return
    z = np.asarray(b.latents)[:len(b.keys)].astype(dtype)
    latent_shape = list(z.shape[1:])
    for key, caption, split, zi in zip(b.keys, b.captions, b.splits, z):
      out.write(split, latents_lib.encode_record(key, caption, "", zi, dtype=dtype))
    progress.records_done(len(b.keys))

  def dispatch(chunk: list[streams.Record], futures: list[Any]) -> _Batch | None:
    """Collects a chunk's prepared images (skips counted) and starts encoding them."""
    nonlocal batch_no
    keys, captions, splits, images = [], [], [], []
    for rec, fut in zip(chunk, futures):
      img = fut.result()
      split = streams.split_of(rec.key, validation_percent)
      if isinstance(img, prepare.SkipRecord):
        out.skip(split, img.reason, rec.key)
        continue
      keys.append(rec.key)
      captions.append(rec.value["caption"])
      splits.append(split)
      images.append(img)
    batch_no += 1
    if on_batch is not None:
      on_batch(out.index, batch_no)
    return _Batch(keys, captions, splits, encode(np.stack(images))) if images else None

  preparing: tuple[list[Any], list[Any]] | None = None
  encoding: _Batch | None = None

  def advance(chunk: list[streams.Record] | None) -> None:
    nonlocal preparing, encoding
    nxt = (chunk, [pool.submit(_prepare_one, policy, r.value["image"]) for r in chunk]
           ) if chunk else None
    ready = dispatch(*preparing) if preparing else None
    write(encoding)
    preparing, encoding = nxt, ready

  chunk: list[streams.Record] = []
  for item in records:
    if isinstance(item, streams.Skip):
      out.skip(streams.split_of(item.key, validation_percent), item.reason, item.key)
      continue
    chunk.append(item)
    if len(chunk) == encode.batch:
      advance(chunk)
      chunk = []
  advance(chunk or None)
  advance(None)
  advance(None)
  return latent_shape


def run_latent_job(config: ml_collections.ConfigDict, encoder: latents_lib.Encoder,
                   out_dir: str, *, process_index: int | None = None,
                   process_count: int | None = None, devices: list[Any] | None = None,
                   progress: bool = True,
                   on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
  """Encodes this process's share of `data.image_text_source` (a stream source)
  into the latent cache `out_dir`, resuming after its last finished shard.

  Args:
    encoder: `encode(float32 [b, H, W, 3] in [-1, 1]) -> [b, h, w, c]`,
      `scale`, `shift` (a `tfjax.vae.load` VAE, or the PixelPatchEncoder).
    process_index, process_count: this process's share (default: jax's).
    devices: the devices to encode on (default: this process's local devices).
    on_batch: called with (input shard index, batch number) after each batch
      is prepared (tests use it to interrupt the job).

  Returns:
    A summary: shards done now and before, records written by split and
    skipped by reason (this process, this run), records/s, whether the cache
    is complete (its metadata.json written).
  """
  pi, pc = process_index_count(process_index, process_count)
  check_keys(config)
  paths, reader = streams.image_text_reader(config)
  policy = prepare.ImagePolicy.from_config(config)
  dtype = latents_lib.storage_dtype(config.data.latents_dtype)
  d = config.data
  spec = {"kind": "latents", "source": d.image_text_source,
          "inputs": [reader.name(p) for p in paths], "image": vars(policy).copy(),
          "dtype": d.latents_dtype, "encoder": repr(encoder),
          "validation_percent": d.validation_percent, "caption_field": d.caption_field,
          "image_field": d.image_field}
  check_job(out_dir, spec)
  mine, pending = pending_inputs(out_dir, len(paths), pi, pc)
  encode = MeshEncoder(encoder, devices or jax.local_devices(), int(d.latents_batch_size))
  bar = _Progress(len(pending), f"latents p{pi}/{pc}", progress)
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(int(d.prepare_threads)) as pool:
    try:
      for i in pending:
        out = ShardOutput(out_dir, i, len(paths), reader.name(paths[i]))
        t_shard = time.time()
        shape = _encode_shard(reader(paths[i]), out, encode, policy, pool,
                              d.validation_percent, dtype, bar, on_batch)
        bar.shard_done(out.commit(latent_shape=shape, seconds=round(time.time() - t_shard, 2)))
    finally:
      bar.close()
  base = {"scale": float(encoder.scale), "shift": float(encoder.shift),
          "encoder": repr(encoder), "source": d.image_text_source, "dtype": d.latents_dtype}
  return _summary(bar, t0, mine, pending, finalize(out_dir, len(paths), base), out_dir)


def run_text_job(config: ml_collections.ConfigDict, out_dir: str, *,
                 process_index: int = 0, process_count: int = 1,
                 progress: bool = True) -> dict[str, Any]:
  """Copies `data.text_source` (a stream source) into ArrayRecord shards of
  UTF-8 documents (random access for the Grain pipeline), split by key hash."""
  pi, pc = process_index_count(process_index, process_count)
  check_keys(config)
  paths, reader = streams.text_reader(config)
  d = config.data
  check_job(out_dir, {"kind": "text", "source": d.text_source, "text_field": d.text_field,
                      "inputs": [reader.name(p) for p in paths],
                      "validation_percent": d.validation_percent})
  mine, pending = pending_inputs(out_dir, len(paths), pi, pc)
  bar = _Progress(len(pending), f"text p{pi}/{pc}", progress)
  t0 = time.time()
  try:
    for i in pending:
      out = ShardOutput(out_dir, i, len(paths), reader.name(paths[i]))
      n = 0
      for item in reader(paths[i]):
        split = streams.split_of(item.key, d.validation_percent)
        if isinstance(item, streams.Skip):
          out.skip(split, item.reason, item.key)
        else:
          out.write(split, item.value.encode("utf-8"))
          n += 1
      bar.records_done(n)
      bar.shard_done(out.commit())
  finally:
    bar.close()
  return _summary(bar, t0, mine, pending,
                  finalize(out_dir, len(paths), {"source": d.text_source}), out_dir)
