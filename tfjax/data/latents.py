"""The latent cache: images encoded once by a VAE, stored as ArrayRecord shards.

Layout of a cache directory:

  metadata.json                 {"scale", "shift", "latent_shape": [h, w, c],
                                 "encoder", "splits": {split: {"num_records",
                                 "shards", "skipped"}}}
  {split}.array_record-00000-of-00004, ...

Each record is a msgpack map (flax.serialization) with
  id       str                  the source record id (reported on skips)
  caption  str
  scene    str                  JSON scene (shapes) or "" (other sources)
  latents  [h, w, c]            raw encoder output, NOT scaled; bfloat16 or
                                float32 (data.latents_dtype, "dtype" in the metadata).

Readers apply `(latents.astype(float32) - shift) * scale` (pipeline.py) with
the values in metadata.json, so a different VAE only changes the numbers,
never the format. Stream sources (webdataset:, parquet:) are encoded by the
sharded, resumable job of latent_job.py into the same layout (one shard per
input shard, plus skips.jsonl and a skip count per reason).
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable, Iterator, Protocol, Sequence

from array_record.python import array_record_module
from flax import serialization
import ml_dtypes
import numpy as np
from PIL import Image

METADATA_FILE = "metadata.json"


class Encoder(Protocol):
  scale: float
  shift: float

  def encode(self, images: np.ndarray) -> np.ndarray:
    """float32 [b, H, W, 3] in [-1, 1] -> latents [b, h, w, c]."""


def encode_images(encoder: Encoder, images: Sequence[np.ndarray]) -> np.ndarray:
  """uint8 images [H, W, 3] of one size -> float32 latents [b, h, w, c]."""
  x = np.stack(images).astype(np.float32) / 127.5 - 1.0  # the [-1, 1] encoders take
  return np.asarray(encoder.encode(x), np.float32)


class PixelPatchEncoder:
  """A fixed stand-in for the VAE: a linear map of each d x d pixel patch.

  The first three channels are the patch's mean colour; the rest are fixed
  random projections (seed 0) of the patch. `decode` is the least-squares
  inverse, so a pipeline can be exercised end to end before the VAE exists.
  """

  def __init__(self, downsample: int = 8, channels: int = 8):
    if channels < 3:
      raise ValueError("PixelPatchEncoder needs at least 3 channels (mean RGB)")
    self.downsample, self.channels = downsample, channels
    d = downsample * downsample * 3
    mean = np.zeros((d, 3), np.float32)
    for ch in range(3):
      mean[ch::3, ch] = 1.0 / (downsample * downsample)
    rest = np.random.default_rng(0).standard_normal((d, channels - 3)).astype(np.float32)
    rest /= np.sqrt(d)
    self.matrix = np.concatenate([mean, rest], axis=1)  # [d*d*3, c]
    self.scale, self.shift = 1.5, 0.0

  def __repr__(self) -> str:
    return f"PixelPatchEncoder(downsample={self.downsample}, channels={self.channels})"

  def encode(self, images: np.ndarray) -> np.ndarray:
    """float32 [b, H, W, 3] in [-1, 1] -> float32 [b, H/d, W/d, c]."""
    x = np.asarray(images, np.float32)
    b, hh, ww, _ = x.shape
    d = self.downsample
    if hh % d or ww % d:
      raise ValueError(f"image side {hh}x{ww} is not a multiple of downsample={d}")
    x = x.reshape(b, hh // d, d, ww // d, d, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hh // d, ww // d, d * d * 3) @ self.matrix

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """float32 [b, h, w, c] -> float32 [b, h*d, w*d, 3] (least squares)."""
    z = np.asarray(latents, np.float32)
    b, h, w, _ = z.shape
    d = self.downsample
    x = z @ np.linalg.pinv(self.matrix)
    x = x.reshape(b, h, w, d, d, 3).transpose(0, 1, 3, 2, 4, 5)
    return np.clip(x.reshape(b, h * d, w * d, 3), -1.0, 1.0)


def decode_image(value: Any) -> np.ndarray:
  """PNG/JPEG bytes or an array -> uint8 [H, W, 3]. Raises ValueError if undecodable."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    return value[..., :3]
  try:
    with Image.open(io.BytesIO(bytes(value))) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # PIL raises many types for corrupt bytes
    raise ValueError(f"undecodable image bytes ({type(e).__name__}: {e})") from e


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_record(record_id: str, caption: str, scene: str, latents: np.ndarray,
                  dtype: Any = np.float32) -> bytes:
  """One cache record; `dtype` float32 or ml_dtypes.bfloat16 (msgpack keeps it)."""
  return serialization.msgpack_serialize(
      {"id": record_id, "caption": caption, "scene": scene,
       "latents": np.asarray(latents).astype(dtype)})


def decode_record(raw: bytes) -> dict[str, Any]:
  return serialization.msgpack_restore(raw)


def storage_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' (config key data.latents_dtype) -> a numpy dtype."""
  if name == "bfloat16":
    return ml_dtypes.bfloat16
  if name == "float32":
    return np.float32
  raise ValueError(f"config key data.latents_dtype: unknown {name!r} (bfloat16 | float32)")


def _shard_paths(out_dir: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(out_dir, f"{split}.array_record-{i:05d}-of-{num_shards:05d}")
          for i in range(num_shards)]


def read_metadata(cache_dir: str) -> dict[str, Any]:
  path = os.path.join(cache_dir, METADATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no latent cache at {cache_dir} ({METADATA_FILE} missing; config key "
                            f"data.latents; build it with `tfjax-data latents`)")
  with open(path) as f:
    return json.load(f)


def read_range(source: Any, start: int, stop: int) -> list[Any]:
  """Records [start, stop) of a random-access source, in one batched read where
  it has one (`__getitems__`): TFDS's one-record read costs grow with the
  file's record count (368 against 63 us per 64x64 scene at 100k and 10k
  records, tensorflow-datasets 4.9.10), its batched read of a range much less
  (69 and 42 us; benchmarks/RESULTS.md, "ArrayRecord reads")."""
  return read_keys(source, list(range(start, stop)))


def iter_records(source: Any, stop: int, chunk: int = 1024) -> Iterator[Any]:
  """Records [0, stop) of a random-access source, read chunk by chunk (read_range)."""
  for start in range(0, stop, chunk):
    yield from read_range(source, start, min(stop, start + chunk))


def read_keys(source: Any, keys: list[int]) -> list[Any]:
  """source[k] for each of `keys`, batched as read_range says."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems(keys))
  return [source[k] for k in keys]


def build_latent_cache(encoder: Encoder, images_source: Sequence[dict[str, Any]], out_dir: str,
                       *, split: str = "train", batch_size: int = 64,
                       records_per_shard: int = 20000, source: str | None = None,
                       dtype: str = "float32") -> dict[str, Any]:
  """Encodes every image of `images_source` and writes `split` shards to `out_dir`.

  Args:
    encoder: has `encode(float32 [b, H, W, 3] in [-1, 1]) -> [b, h, w, c]`,
      `scale` and `shift`.
    images_source: random-access records (len/getitem) with `image` (encoded
      bytes or uint8 [H, W, 3]), `caption`, optional `scene` and `id`.
    out_dir: cache directory; metadata.json there is created or updated.
    source: what the images are (e.g. the shapes dataset's config name),
      recorded in the metadata so that a cache of other images is caught.
    dtype: storage dtype of the latents, "float32" or "bfloat16" (the VQ
      token cache needs float32: its code ids exceed bfloat16's integers).

  Returns:
    The split's metadata entry: {"num_records", "shards", "skipped"}. Records
    whose image does not decode are skipped and listed by id in "skipped".
  """
  os.makedirs(out_dir, exist_ok=True)
  n = len(images_source)
  num_shards = max(1, -(-n // records_per_shard))
  paths = _shard_paths(out_dir, split, num_shards)
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
  skipped: list[str] = []
  latent_shape = None
  written = 0
  store = storage_dtype(dtype)
  try:
    for start in range(0, n, batch_size):
      ids, captions, scenes, images = [], [], [], []
      for i, rec in enumerate(read_range(images_source, start, min(n, start + batch_size)), start):
        rid = _text(rec.get("id", i))
        try:
          img = decode_image(rec["image"])
        except ValueError as e:
          logging.warning("latent cache: skipping record %s: %s", rid, e)
          skipped.append(rid)
          continue
        if images and img.shape != images[0].shape:
          logging.warning("latent cache: skipping record %s: image shape %s != %s", rid,
                          img.shape, images[0].shape)
          skipped.append(rid)
          continue
        ids.append(rid)
        captions.append(_text(rec.get("caption", "")))
        scenes.append(_text(rec.get("scene", "")))
        images.append(img)
      if not images:
        continue
      z = encode_images(encoder, images)
      latent_shape = latent_shape or list(z.shape[1:])
      for j in range(len(ids)):
        writers[written % num_shards].write(
            encode_record(ids[j], captions[j], scenes[j], z[j], dtype=store))
        written += 1
  finally:
    for w in writers:
      w.close()
  meta = {}
  if os.path.exists(os.path.join(out_dir, METADATA_FILE)):
    meta = read_metadata(out_dir)
  if latent_shape is not None and meta.get("latent_shape") not in (None, latent_shape):
    raise ValueError(f"{out_dir}: split {split} latents {latent_shape} differ from the cache's "
                     f"{meta['latent_shape']}")
  meta.update(scale=float(encoder.scale), shift=float(encoder.shift),
              latent_shape=latent_shape or meta.get("latent_shape"), encoder=repr(encoder),
              dtype=dtype)
  if source is not None:
    meta["source"] = source
  entry = {"num_records": written, "shards": [os.path.basename(p) for p in paths],
           "skipped": skipped}
  meta.setdefault("splits", {})[split] = entry
  with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  return entry


def split_paths(cache_dir: str, split: str) -> list[str]:
  """The shard files of one split; raises naming the directory if absent."""
  meta = read_metadata(cache_dir)
  if split not in meta.get("splits", {}):
    raise FileNotFoundError(f"latent cache {cache_dir} has no split {split!r} "
                            f"(has {sorted(meta.get('splits', {}))})")
  shards = meta["splits"][split]["shards"]
  if not shards:
    raise FileNotFoundError(f"latent cache {cache_dir}: split {split!r} has no records (all "
                            f"skipped, see its skips.jsonl; or raise data.validation_percent)")
  return [os.path.join(cache_dir, s) for s in shards]


def encode_missing_splits(out_dir: str, splits: Sequence[str],
                          encode_split: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
  """Fills a cache directory split by split, keeping splits already encoded.

  A split listed in the cache's metadata is reported as it is (delete the
  directory to re-encode, e.g. after changing the autoencoder);
  `encode_split(split)` encodes the others and returns their report, or None
  for a split the source does not have. Latent, token and editing caches
  share this so that a resumed build never encodes a split twice.
  """
  done: dict[str, Any] = {}
  if os.path.exists(os.path.join(out_dir, METADATA_FILE)):
    done = read_metadata(out_dir).get("splits", {})
  report = {}
  for split in splits:
    result = done[split] if split in done else encode_split(split)
    if result is not None:
      report[split] = result
  return report
