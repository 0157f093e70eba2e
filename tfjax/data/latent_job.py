"""Sharded, resumable jobs from stream sources to ArrayRecord caches.

  run_latent_job(config, encoder, out_dir)   images -> VAE latents (the latent cache)
  run_text_job(config, out_dir)              text corpus -> ArrayRecord text cache

Both map input shard i (of N, the sorted glob of the source) to at most one
output shard per split and resume after the last finished input shard
(tfjax/data/shard_writer.py says how). Process p of P takes the inputs i with
i % P == p (`jax.process_index()` / `process_count()` unless given).

The latent job encodes with the VAE data-parallel over this process's local
devices (a 1-D mesh; batches padded to `data.latents_batch_size` rounded up
to the device count), decoding and resizing images on `data.prepare_threads`
threads while the devices encode the previous batch. Latents are stored as
`data.latents_dtype` (bfloat16 by default); readers convert to float32.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from tfjax.data import latents as latents_lib
from tfjax.data import prepare, streams
from tfjax.data.pipeline import process_index_count
from tfjax.data.shard_writer import (Progress, ShardOutput, check_job, finalize, pending_inputs,
                                     summary)


def check_keys(config: ml_collections.ConfigDict) -> None:
  """The data.* keys both jobs read, checked before any work."""
  d = config.data
  if not 0 <= d.validation_percent <= 100:
    raise ValueError(f"config key data.validation_percent={d.validation_percent}: must be in "
                     f"[0, 100]")
  if d.latents_batch_size < 1 or d.prepare_threads < 1:
    raise ValueError(f"config keys data.latents_batch_size={d.latents_batch_size} and "
                     f"data.prepare_threads={d.prepare_threads} must be >= 1")


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
                  validation_percent: float, dtype: Any, progress: Progress,
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
  bar = Progress(len(pending), f"latents p{pi}/{pc}", progress)
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
  return summary(bar, t0, mine, pending, finalize(out_dir, len(paths), base), out_dir)


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
  bar = Progress(len(pending), f"text p{pi}/{pc}", progress)
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
  return summary(bar, t0, mine, pending,
                  finalize(out_dir, len(paths), {"source": d.text_source}), out_dir)
