"""Streaming readers of shard sets: WebDataset tars, Parquet, text, JSONL.

Source names (config keys data.image_text_source / data.text_source):

  webdataset:GLOB          img2dataset tar shards: KEY.jpg|jpeg|png|webp plus
                           KEY.txt and/or KEY.json (caption: KEY.txt, else
                           KEY.json[data.caption_field])
  parquet:GLOB             images: column data.image_field (bytes or a
                           {bytes, path} struct), captions: data.caption_field
  text:GLOB                text: one document per non-blank line (.gz read too)
  jsonl:GLOB[:FIELD]       text: FIELD (default data.text_field) of each line
  parquet:GLOB[:COLUMN]    text: COLUMN (default data.text_field)

Each shard is read as a stream (tarfile's "r|*" mode, pyarrow's
iter_batches, line by line), so a shard set of any size is never held in
memory. A reader yields `Record`s and `Skip`s in shard order; a bad record
(missing or empty caption, non-UTF-8 text, image-only record, truncated tar)
is a `Skip` naming its key, never dropped silently. A missing Parquet column
or a glob matching nothing raises, naming the source and the fix.
"""
from __future__ import annotations

import glob as glob_lib
import gzip
import hashlib
import json
import os
import tarfile
from typing import Any, Iterator, NamedTuple
import zlib

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_TEXT_KINDS = ("webdataset", "parquet")
TEXT_KINDS = ("text", "jsonl", "parquet")
PARQUET_BATCH_ROWS = 256


class Record(NamedTuple):
  key: str
  value: Any            # image-text: {"image": bytes, "caption": str}; text: str


class Skip(NamedTuple):
  reason: str
  key: str


def is_image_stream(name: str) -> bool:
  return name.split(":", 1)[0] in IMAGE_TEXT_KINDS


def is_text_stream(name: str) -> bool:
  return name.split(":", 1)[0] in TEXT_KINDS


def parse_text(name: str, default_field: str) -> tuple[str, str, str]:
  """'jsonl:/c4/*.jsonl:text' -> ('jsonl', '/c4/*.jsonl', 'text')."""
  kind, rest = name.split(":", 1)
  pattern, field = rest, default_field
  if kind in ("jsonl", "parquet") and ":" in rest:
    head, tail = rest.rsplit(":", 1)
    if tail and "/" not in tail and "*" not in tail:
      pattern, field = head, tail
  return kind, pattern, field


def shard_paths(pattern: str, key: str) -> list[str]:
  """The sorted files a glob matches (the same list on every host); raises if none."""
  paths = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"config key {key}: {pattern!r} matches no files (give a glob of "
                            f"shards every host can read, e.g. /data/cc3m/{{00000..00331}}.tar "
                            f"as /data/cc3m/*.tar)")
  return paths


def split_of(key: str, validation_percent: float) -> str:
  """train | validation by a stable hash of the record key (same on every host and rerun)."""
  h = int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16)
  return "validation" if h % 10000 < validation_percent * 100 else "train"


def _caption_text(value: Any, key: str) -> str | Skip:
  """A caption value (str, bytes, list of them, None) -> text, or a Skip."""
  if isinstance(value, (list, tuple)):  # e.g. several reference captions: the first non-empty
    value = next((v for v in value if v is not None and str(v).strip()), None)
  if value is None:
    return Skip("missing_caption", key)
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError:
      return Skip("non_utf8_caption", key)
  text = str(value).strip()
  return text if text else Skip("empty_caption", key)


# -------------------------------------------------------------- webdataset --
def _split_member(name: str) -> tuple[str, str]:
  """'shard/000123.jpg' -> ('shard/000123', 'jpg'): WebDataset's key/extension rule
  (the key is the path up to the first dot of the file name)."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem) if directory else stem, ext.lower()


def _webdataset_record(key: str, members: dict[str, bytes], caption_field: str
                       ) -> Record | Skip:
  image_ext = next((e for e in IMAGE_EXTS if e in members), None)
  if image_ext is None:
    return Skip("missing_image", key)
  if "txt" in members:
    caption = _caption_text(members["txt"], key)
  elif "json" in members:
    try:
      meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
      return Skip("undecodable_json", key)
    caption = _caption_text(meta.get(caption_field) if isinstance(meta, dict) else None, key)
  else:
    caption = Skip("missing_caption", key)
  if isinstance(caption, Skip):
    return caption
  return Record(key, {"image": members[image_ext], "caption": caption})


def iter_webdataset(path: str, caption_field: str = "caption", name: str | None = None
                    ) -> Iterator[Record | Skip]:
  """The records of one tar shard, streamed. A truncated or unreadable tar ends
  the shard with a Skip ("truncated_shard") naming the record it cut (or the
  shard); the complete records before it are kept."""
  shard = name or os.path.basename(path)
  key, members = None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for info in tar:
        if not info.isfile():
          continue
        k, ext = _split_member(info.name)
        if k != key and key is not None:
          yield _webdataset_record(f"{shard}/{key}", members, caption_field)
          members = {}
        key = k
        if ext.startswith("__") or not ext:
          continue
        members[ext] = tar.extractfile(info).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    del e
    yield Skip("truncated_shard", f"{shard}/{key}" if key is not None else shard)
    return
  if key is not None:
    yield _webdataset_record(f"{shard}/{key}", members, caption_field)


# ----------------------------------------------------------------- parquet --
def _parquet_file(path: str, columns: list[str], source_key: str, fix: str) -> Any:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (~0.5 s; Parquet only)
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
    raise ValueError(f"config key {source_key}: {path} is not a readable Parquet file "
                     f"({type(e).__name__}: {e})") from e
  names = pf.schema_arrow.names
  for col in columns:
    if col not in names:
      raise ValueError(f"config key {source_key}: {path} has no column {col!r} (columns: "
                       f"{names}); set {fix}")
  return pf


def iter_parquet_images(path: str, image_field: str = "image", caption_field: str = "caption",
                        name: str | None = None) -> Iterator[Record | Skip]:
  """Image-caption rows of one Parquet file, a batch of rows at a time.

  The key is the row's `key` or `id` column when there is one (img2dataset
  and many HF datasets write it), else FILE:ROW.
  """
  pf = _parquet_file(path, [image_field, caption_field], "data.image_text_source",
                     f"data.image_field / data.caption_field to the image and caption columns")
  names = pf.schema_arrow.names
  key_col = next((c for c in ("key", "id") if c in names), None)
  cols = [image_field, caption_field] + ([key_col] if key_col else [])
  shard, row = name or os.path.basename(path), 0
  for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
    data = batch.to_pydict()
    for i in range(batch.num_rows):
      key = f"{shard}/{data[key_col][i]}" if key_col else f"{shard}:{row}"
      row += 1
      image = data[image_field][i]
      if isinstance(image, dict):  # HF datasets' Image feature: {bytes, path}
        image = image.get("bytes")
      if not image:
        yield Skip("missing_image", key)
        continue
      caption = _caption_text(data[caption_field][i], key)
      yield caption if isinstance(caption, Skip) else Record(
          key, {"image": bytes(image), "caption": caption})


# -------------------------------------------------------------------- text --
def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_text_lines(path: str, name: str | None = None) -> Iterator[Record | Skip]:
  """One document per non-blank line (blank lines separate, they are not records)."""
  shard = name or os.path.basename(path)
  with _open_binary(path) as f:
    for n, line in enumerate(f, start=1):
      key = f"{shard}:{n}"
      try:
        text = line.decode("utf-8").strip()
      except UnicodeDecodeError:
        yield Skip("non_utf8_text", key)
        continue
      if text:
        yield Record(key, text)


def iter_jsonl(path: str, field: str, name: str | None = None) -> Iterator[Record | Skip]:
  shard = name or os.path.basename(path)
  with _open_binary(path) as f:
    for n, line in enumerate(f, start=1):
      key = f"{shard}:{n}"
      if not line.strip():
        continue
      try:
        row = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError:
        yield Skip("non_utf8_text", key)
        continue
      except ValueError:
        yield Skip("undecodable_json", key)
        continue
      value = row.get(field) if isinstance(row, dict) else None
      if value is None:
        yield Skip("missing_text", key)
      elif not str(value).strip():
        yield Skip("empty_text", key)
      else:
        yield Record(key, str(value))


def iter_parquet_text(path: str, column: str, name: str | None = None
                      ) -> Iterator[Record | Skip]:
  pf = _parquet_file(path, [column], "data.text_source",
                     f"the column as data.text_source=parquet:GLOB:COLUMN (or data.text_field)")
  shard, row = name or os.path.basename(path), 0
  for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS * 16, columns=[column]):
    for value in batch.column(0).to_pylist():
      key = f"{shard}:{row}"
      row += 1
      if isinstance(value, bytes):
        try:
          value = value.decode("utf-8")
        except UnicodeDecodeError:
          yield Skip("non_utf8_text", key)
          continue
      if value is None or not str(value).strip():
        yield Skip("empty_text", key)
      else:
        yield Record(key, str(value))


def image_text_reader(config: Any) -> tuple[list[str], "Reader"]:
  """(shard paths, a Reader) of the config's image-text stream source."""
  kind, pattern = config.data.image_text_source.split(":", 1)
  paths = shard_paths(pattern, "data.image_text_source")
  if kind == "webdataset":
    return paths, Reader(paths, iter_webdataset, config.data.caption_field)
  return paths, Reader(paths, iter_parquet_images, config.data.image_field,
                       config.data.caption_field)


def text_reader(config: Any) -> tuple[list[str], "Reader"]:
  """(shard paths, a Reader) of the config's text stream source."""
  kind, pattern, field = parse_text(config.data.text_source, config.data.text_field)
  paths = shard_paths(pattern, "data.text_source")
  if kind == "text":
    return paths, Reader(paths, iter_text_lines)
  return paths, Reader(paths, iter_jsonl if kind == "jsonl" else iter_parquet_text, field)


class Reader:
  """path -> the shard's Records and Skips. Shards are named (in keys and
  reports) by their path below the shard set's common directory, so that
  shard sets joined by one glob (e.g. {cc3m,cc12m}/*.tar) keep keys apart."""

  def __init__(self, paths: list[str], fn, *args):
    self.fn, self.args = fn, args
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    self.names = {p: os.path.relpath(p, root) for p in paths}

  def name(self, path: str) -> str:
    return self.names.get(path, os.path.basename(path))

  def __call__(self, path: str) -> Iterator[Record | Skip]:
    return self.fn(path, *self.args, name=self.name(path))
