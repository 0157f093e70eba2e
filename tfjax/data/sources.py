"""Random-access record sources named by the config.

`data.text_source`:        shapes_text | tfds:NAME[/CONFIG] | text:GLOB |
                           jsonl:GLOB[:FIELD] | parquet:GLOB[:COLUMN] | none
`data.image_text_source`:  shapes | folder:PATH | tfds:NAME[/CONFIG] |
                           webdataset:GLOB | parquet:GLOB | none

Training never reads pixels: the image-text source is encoded once into the
latent cache (latents.py) and the pipeline reads that cache. The image source
name matters when the cache is built (build.py), where `image_source` opens it.
Stream sources (streams.py) have no random access: their text is copied once
into DIR/text (ArrayRecord, by latent_job.run_text_job) and their images are
encoded by the sharded latent job (latent_job.run_latent_job).
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import ml_collections

from tfjax.data import latents as latents_lib
from tfjax.data import prepare, streams

SHAPES_TEXT_DIR = "shapes_text"
TEXT_CACHE_DIR = "text"       # stream text sources, copied to ArrayRecord


class ArrayRecordSource(grain.sources.ArrayRecordDataSource):
  """grain's ArrayRecord source, reading each record as the range [i, i + 1).

  The parent reads with `reader.read([i, ...])`, and each such call costs more
  the more records the file holds (array_record 0.8.6, one shard, one record a
  call: ~23-37 us at 10k records, ~190-230 us at 100k); the range read costs
  ~5 us at both. The pipeline reads one record at a time, so at 100k records
  the parent made it 2x slower per batch (benchmarks/RESULTS.md, "ArrayRecord
  reads").
  """

  def __getitem__(self, record_key) -> bytes:
    reader_idx, position = self._reader_idx_and_position(record_key)
    self._ensure_reader_exists(reader_idx)
    return self._readers[reader_idx].read(position, position + 1)[0]

  def __getitems__(self, record_keys) -> list[bytes]:
    return [self[k] for k in record_keys]


def data_root(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return data_dir or config.data.dir


def tfds_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return config.data.tfds_dir or os.path.join(data_root(config, data_dir), "tfds")


def latent_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return config.data.latents or os.path.join(data_root(config, data_dir), "latents")


def given_tokenizer(config: ml_collections.ConfigDict) -> str | None:
  """A tokenizer from outside (never trained here): data.tokenizer, else the
  tokenizer.model of an `hf_llama:DIR` train.init_from; else None."""
  # Local: tfjax.model (and its kernels) stays out of the data pipeline's
  # imports, which every Grain worker process repeats (~1.4 s more each).
  from tfjax.model.hf_llama import tokenizer_file  # pylint: disable=g-import-not-at-top
  init_from = config.train.get("init_from", "") if "train" in config else ""
  return config.data.tokenizer or tokenizer_file(init_from)


def tokenizer_path(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  """The given tokenizer, else DIR/tokenizer (trained by the data build)."""
  return given_tokenizer(config) or os.path.join(data_root(config, data_dir), "tokenizer")


def text_cache_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return os.path.join(data_root(config, data_dir), TEXT_CACHE_DIR)


def text_shard_path(root: str, split: str) -> str:
  return os.path.join(root, SHAPES_TEXT_DIR, f"{split}.array_record")


def open_tfds(name: str, split: str, tfds_data_dir: str, key: str) -> Any:
  """A prepared TFDS dataset as a random-access source; errors name `key`."""
  import tensorflow_datasets as tfds  # slow import; only when a TFDS source is used
  try:
    return tfds.data_source(name, split=split, data_dir=tfds_data_dir, download=False)
  except Exception as e:  # TFDS raises several types for "not prepared"
    raise FileNotFoundError(
        f"config key {key}: TFDS dataset {name!r} split {split!r} is not prepared in "
        f"{tfds_data_dir} in array_record format (prepare it with `tfds build {name} "
        f"--file_format=array_record --data_dir={tfds_data_dir}` or set data.tfds_dir): "
        f"{type(e).__name__}: {str(e)[:300]}") from e


class _TextField:
  """Adapts a record source to yield the text of one field (bytes or str)."""

  def __init__(self, source: Any, field: str | None):
    self.source, self.field = source, field

  def __len__(self) -> int:
    return len(self.source)

  def _field(self, rec: Any) -> Any:
    return rec if self.field is None else rec[self.field]

  def __getitem__(self, i: int) -> Any:
    return self._field(self.source[i])

  def __getitems__(self, keys: list[int]) -> list[Any]:
    return [self._field(r) for r in latents_lib.read_keys(self.source, keys)]


def text_source(config: ml_collections.ConfigDict, data_dir: str | None, split: str) -> Any:
  """Random-access text records (bytes or str), or None for `none`."""
  name = config.data.text_source
  if name == "none":
    return None
  if name == "shapes_text":
    path = text_shard_path(data_root(config, data_dir), split)
    if not os.path.exists(path):
      raise FileNotFoundError(f"config key data.text_source=shapes_text: {path} is missing "
                              f"(build it with `tfjax-data build`)")
    return ArrayRecordSource([path])
  if name.startswith("tfds:"):
    src = open_tfds(name[5:], split, tfds_dir(config, data_dir), "data.text_source")
    return _TextField(src, config.data.text_field)
  if streams.is_text_stream(name):
    cache = text_cache_dir(config, data_dir)
    path = os.path.join(cache, latents_lib.METADATA_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"config key data.text_source={name}: its ArrayRecord copy {cache} "
                              f"is missing or incomplete (build it with `tfjax-data build`)")
    with open(path) as f:
      entry = json.load(f)["splits"].get(split, {})
    if not entry.get("shards"):
      raise FileNotFoundError(f"config key data.text_source={name}: no {split} documents in "
                              f"{cache} (raise data.validation_percent, or add documents)")
    return ArrayRecordSource([os.path.join(cache, p) for p in entry["shards"]])
  raise ValueError(f"config key data.text_source: unknown source {name!r}")


def latent_source(config: ml_collections.ConfigDict, data_dir: str | None, split: str
                  ) -> tuple[Any, dict[str, Any]] | tuple[None, None]:
  """(raw latent-cache records, cache metadata), or (None, None) for `none`."""
  if config.data.image_text_source == "none":
    return None, None
  cache = latent_dir(config, data_dir)
  meta = latents_lib.read_metadata(cache)
  return ArrayRecordSource(latents_lib.split_paths(cache, split)), meta


def image_source(config: ml_collections.ConfigDict, data_dir: str | None, split: str,
                 limit: int | None = None) -> Any:
  """Image-caption records with `image`, `caption`, `scene`, `id` (build time).

  A stream source has no random access: with `limit` it gives the first
  `limit` good records of `split` (images prepared to data.image_size), read
  from the start of the shard set (held-out samples); without, it raises.
  """
  name = config.data.image_text_source
  if streams.is_image_stream(name):
    if limit is None:
      raise ValueError(f"config key data.image_text_source={name}: a stream source has no "
                       f"random access; encode it with `tfjax-data latents` (the latent job)")
    return stream_head(config, split, limit)
  if name in ("shapes",) or name.startswith("folder:"):
    # TFDS: a slow import, paid only by TFDS sources.
    from tfjax.data import tfds_folder, tfds_shapes  # pylint: disable=g-import-not-at-top
    mod = tfds_shapes if name == "shapes" else tfds_folder
    return mod.data_source(config, data_root(config, data_dir), split)
  if name.startswith("tfds:"):
    src = open_tfds(name[5:], split, tfds_dir(config, data_dir), "data.image_text_source")
    return _TfdsImageText(src)
  raise ValueError(f"config key data.image_text_source: unknown source {name!r}")


def image_source_name(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  """What `image_source` reads, as recorded in a latent cache: the source
  string, plus for the built-in shapes the dataset's config name (size,
  splits, seed, scene options), so that a cache of other scenes is caught."""
  name = config.data.image_text_source
  if name == "shapes":
    from tfjax.data import tfds_shapes  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
    return "shapes/" + tfds_shapes.builder(config, data_root(config, data_dir)).builder_config.name
  return name


def stream_head(config: ml_collections.ConfigDict, split: str, limit: int) -> list[dict[str, Any]]:
  """The first `limit` good records of `split` of a stream image-text source,
  as {image: uint8 [S, S, 3], caption, scene: "", id}."""
  policy = prepare.ImagePolicy.from_config(config)
  out: list[dict[str, Any]] = []
  for rec in stream_records(config, split):
    try:
      image = prepare.prepare_image(rec.value["image"], policy)
    except prepare.SkipRecord:
      continue
    out.append({"image": image, "caption": rec.value["caption"], "scene": "", "id": rec.key})
    if len(out) >= limit:
      break
  return out


def stream_records(config: ml_collections.ConfigDict, split: str | None = None) -> Any:
  """Good records (streams.Record) of a stream image-text source, in shard
  order; only those of `split` when given. Bad ones are skipped here
  (the latent job counts them)."""
  paths, reader = streams.image_text_reader(config)
  for path in paths:
    for item in reader(path):
      if isinstance(item, streams.Record) and (
          split is None or streams.split_of(item.key, config.data.validation_percent) == split):
        yield item


class _TfdsImageText:
  """coco_captions-style records -> {image, caption, scene, id}."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._convert(self.source[i], i)

  def __getitems__(self, keys: list[int]) -> list[dict[str, Any]]:
    return [self._convert(r, i) for r, i in zip(latents_lib.read_keys(self.source, keys), keys)]

  @staticmethod
  def _convert(rec: dict[str, Any], i: int) -> dict[str, Any]:
    cap = rec.get("caption", "")
    if isinstance(cap, dict):  # coco_captions: {"captions": {"text": [...]}}
      cap = cap.get("text", [""])[0]
    if "captions" in rec:
      texts = rec["captions"].get("text", [])
      cap = texts[0] if len(texts) else ""
    return {"image": rec["image"], "caption": cap, "scene": "",
            "id": str(rec.get("image/id", rec.get("id", i)))}
