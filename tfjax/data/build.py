"""One-call dataset stages for the main job, each skipped when already built.

  build_all(config, data_dir)                image-text dataset (TFDS ArrayRecord),
                                             text corpus (stream text sources: an
                                             ArrayRecord copy in DIR/text), tokenizer
  build_latents(config, data_dir, encoder)   latent cache of the image-text data
                                             (stream sources: the sharded latent job,
                                             this process's share)
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from array_record.python import array_record_module
import jax
import ml_collections

from tfjax.data import latent_job, shapes, sources, streams
from tfjax.data import latents as latents_lib
from tfjax.data.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer
from tfjax.files import utf8_lines

CORPUS_FILE = "corpus.txt"
EVAL_SPLITS = ("validation",)


def build_text_corpus(config: ml_collections.ConfigDict, root: str) -> str:
  """Shapes text corpus: ArrayRecord per split plus corpus.txt for the tokenizer."""
  d = config.data
  out = os.path.join(root, sources.SHAPES_TEXT_DIR)
  done = os.path.join(out, CORPUS_FILE)
  if os.path.exists(done):
    return out
  os.makedirs(out, exist_ok=True)
  counts = {"train": d.num_text_docs, "validation": max(1, d.num_text_docs // 20)}
  train_docs = []
  for split, num in counts.items():
    docs = shapes.text_corpus(split, num, d.seed, shapes.SceneOptions.from_config(d))
    w = array_record_module.ArrayRecordWriter(sources.text_shard_path(root, split),
                                              "group_size:1")
    for doc in docs:
      w.write(doc.encode("utf-8"))
    w.close()
    if split == "train":
      train_docs = docs
  # Written last: its presence marks the stage complete.
  with open(done + ".tmp", "w") as f:
    f.write("\n".join(train_docs) + "\n")
  os.replace(done + ".tmp", done)
  return out


def read_text_lines(path: str) -> list[str]:
  """The lines of a UTF-8 text file; a bad byte is reported by file and line."""
  return [text.rstrip("\r\n") for _, text in utf8_lines(path)]


def _as_text(value: Any) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _tokenizer_corpus(config: ml_collections.ConfigDict, root: str) -> list[str]:
  """Lines to train the tokenizer on: the text corpus plus image captions."""
  lines: list[str] = []
  if config.data.text_source == "shapes_text":
    with open(os.path.join(root, sources.SHAPES_TEXT_DIR, CORPUS_FILE)) as f:
      lines.extend(f.read().splitlines())
  elif config.data.text_source.startswith("tfds:") or streams.is_text_stream(
      config.data.text_source):
    src = sources.text_source(config, root, "train")
    lines.extend(_as_text(t) for t in latents_lib.iter_records(src, min(len(src), 100000)))
  if streams.is_image_stream(config.data.image_text_source):
    for n, rec in enumerate(sources.stream_records(config)):
      if n >= 20000:
        break
      lines.append(rec.value["caption"])
  elif config.data.image_text_source != "none":
    src = sources.image_source(config, root, "train")
    lines.extend(_as_text(rec["caption"])
                 for rec in latents_lib.iter_records(src, min(len(src), 20000)))
  if not lines:
    raise ValueError("config keys data.text_source / data.image_text_source give no text to "
                     "train a tokenizer on; set data.tokenizer to a .model file")
  return lines


def build_tokenizer(config: ml_collections.ConfigDict, root: str) -> Tokenizer:
  """Loads the given tokenizer (sources.given_tokenizer), or trains one into
  DIR/tokenizer if not there yet."""
  path = sources.tokenizer_path(config, root)
  if sources.given_tokenizer(config) or os.path.exists(os.path.join(path, MODEL_FILE)):
    return Tokenizer.load(path)
  return train_tokenizer(_tokenizer_corpus(config, root), config.data.vocab_size, path)


def build_image_text(config: ml_collections.ConfigDict, root: str) -> str | None:
  name = config.data.image_text_source
  if name == "shapes":
    from tfjax.data import tfds_shapes  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
    return tfds_shapes.build(config, root)
  if name.startswith("folder:"):
    from tfjax.data import tfds_folder  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
    return tfds_folder.build(config, root)
  if name.startswith("tfds:"):
    sources.image_source(config, root, "train")  # raises, naming the key, if not prepared
  if streams.is_image_stream(name):
    streams.image_text_reader(config)  # raises, naming the key, if the glob matches nothing
  return None


def build_all(config: ml_collections.ConfigDict, data_dir: str | None = None) -> dict[str, Any]:
  """Builds every stage that does not need the VAE; returns paths and timings."""
  root = sources.data_root(config, data_dir)
  os.makedirs(root, exist_ok=True)
  report: dict[str, Any] = {}
  t = time.time()
  report["image_text"] = build_image_text(config, root)
  report["image_text_s"] = round(time.time() - t, 2)
  t = time.time()
  if config.data.text_source == "shapes_text":
    report["text"] = build_text_corpus(config, root)
  elif streams.is_text_stream(config.data.text_source):
    job = latent_job.run_text_job(config, sources.text_cache_dir(config, root))
    report["text"] = {k: job[k] for k in ("out", "written", "skipped", "complete")}
  report["text_s"] = round(time.time() - t, 2)
  t = time.time()
  tok = build_tokenizer(config, root)
  report["tokenizer"] = sources.tokenizer_path(config, root)
  report["vocab_size"] = tok.vocab_size
  report["tokenizer_s"] = round(time.time() - t, 2)
  logging.info("data build: %s", report)
  return report


def build_latents(config: ml_collections.ConfigDict, data_dir: str | None,
                  encoder: latents_lib.Encoder, splits: tuple[str, ...] = ("train",) + EVAL_SPLITS,
                  batch_size: int = 64, process_index: int | None = None,
                  process_count: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Encodes the image-text source into the latent cache, split by split.

  A split already in the cache's metadata is kept as is (delete the cache
  directory to re-encode, e.g. after changing the VAE). A stream source
  (webdataset:, parquet:) goes through `latent_job.run_latent_job`: this
  process's share of the input shards, every split at once, resumable; it
  returns that job's summary.
  """
  root = sources.data_root(config, data_dir)
  out = sources.latent_dir(config, root)
  if streams.is_image_stream(config.data.image_text_source):
    return latent_job.run_latent_job(config, encoder, out, process_index=process_index,
                                     process_count=process_count, progress=progress)
  if hasattr(encoder, "params") and jax.local_device_count() > 1:  # a VAE: use every device
    encoder = latent_job.MeshEncoder(encoder, jax.local_devices(), batch_size)
  source = sources.image_source_name(config, root)
  meta_path = os.path.join(out, latents_lib.METADATA_FILE)
  if os.path.exists(meta_path):
    cached = latents_lib.read_metadata(out).get("source")
    if cached not in (None, source):  # caches from before the field was written pass
      raise ValueError(
          f"latent cache {out} holds {cached!r}, but the config selects {source!r} "
          f"(data.image_text_source and, for shapes, data.image_size/num_*_scenes/seed/"
          f"max_objects/object_sizes): delete {out} to re-encode, or set data.latents "
          f"to another directory")
  return latents_lib.encode_missing_splits(out, splits, lambda split: latents_lib.build_latent_cache(
      encoder, sources.image_source(config, root, split), out, split=split, batch_size=batch_size,
      source=source, dtype=config.data.latents_dtype))
