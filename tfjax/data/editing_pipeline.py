"""Editing examples in the training pipeline: build, cache, make documents.

  editing.source = shapes        generate the shapes editing set into the
                                 folder format at editing.dir (build_editing_set)
  editing.source = folder:PATH   users' own folder (see editing.py)
      -> VAE encode both images once -> editing latent cache (build_editing_latents)
      -> EditDocumentMaker: BOS BOI in EOI instruction BOI out EOI EOS (in training,
         editing.instruction_dropout of them without the instruction)
      -> alone, or mixed with the pretraining documents (editing.pretrain_fraction)
      -> the usual packer (pipeline.py), which writes `image_clean`.

The editing latent cache has the latent cache's layout (metadata.json with
scale, shift, latent_shape, splits; ArrayRecord shards), each record a msgpack
map {id, instruction, meta (JSON str), input, output} with raw latents
float32 [h, w, c] (`(z - shift) * scale` is applied when reading).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from array_record.python import array_record_module
from flax import serialization
import grain
import ml_collections
import numpy as np

from tfjax.config import ConfigError, patches_per_image
from tfjax.data import documents as documents_lib
from tfjax.data import editing, shapes, sources
from tfjax.data import latents as latents_lib
from tfjax.data.tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------- paths --
def editing_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  """The folder-format directory of config.editing.source."""
  src = config.editing.source
  if src.startswith("folder:"):
    return src[len("folder:"):]
  if src == "shapes":
    return config.editing.dir or os.path.join(sources.data_root(config, data_dir), "editing")
  raise ConfigError(f"config key editing.source: unknown source {src!r} "
                    f"(none | shapes | folder:PATH)")


def latent_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return config.editing.latents or os.path.join(sources.data_root(config, data_dir),
                                                "editing_latents")


# ------------------------------------------------------------------- build --
def build_editing_set(config: ml_collections.ConfigDict, data_dir: str | None = None
                      ) -> dict[str, str]:
  """Writes the shapes editing set (train/validation/test) unless already there."""
  e = config.editing
  root = editing_dir(config, data_dir)
  counts = {"train": e.num_train, "validation": e.num_eval, "test": e.num_eval}
  out = {}
  for split, num in counts.items():
    path = os.path.join(root, f"{split}.jsonl")
    if not os.path.exists(path):
      examples = editing.generate_split(split, num, config.data.image_size, e.seed,
                                        options=shapes.SceneOptions.from_config(e, "editing"))
      editing.write_folder(examples, root, split)
    out[split] = path
  return out


def _record(ex: dict[str, Any], z_in: np.ndarray, z_out: np.ndarray) -> bytes:
  return serialization.msgpack_serialize(
      {"id": ex["id"], "instruction": ex["instruction"], "meta": ex["meta"],
       "input": np.asarray(z_in, np.float32), "output": np.asarray(z_out, np.float32)})


def build_editing_cache(encoder: latents_lib.Encoder, source: Any, out_dir: str, split: str,
                        batch_size: int = 64) -> dict[str, Any]:
  """Encodes both images of every example of `source` (FolderSource-like items).

  Examples whose images do not decode, or whose input and output differ in
  size, are skipped and listed by id in the returned split entry.
  """
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{split}.array_record")
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  skipped, written, latent_shape = [], 0, None
  try:
    for start in range(0, len(source), batch_size):
      batch, images = [], []
      for ex in latents_lib.read_range(source, start, min(len(source), start + batch_size)):
        try:
          pair = [latents_lib.decode_image(ex["input"]), latents_lib.decode_image(ex["output"])]
        except ValueError as err:
          logging.warning("editing cache: skipping %s: %s", ex["id"], err)
          skipped.append(ex["id"])
          continue
        if pair[0].shape != pair[1].shape or (images and pair[0].shape != images[0].shape):
          logging.warning("editing cache: skipping %s: image sizes %s/%s differ from the set's",
                          ex["id"], pair[0].shape, pair[1].shape)
          skipped.append(ex["id"])
          continue
        batch.append(ex)
        images.extend(pair)
      if not batch:
        continue
      z = latents_lib.encode_images(encoder, images)
      latent_shape = latent_shape or list(z.shape[1:])
      for j, ex in enumerate(batch):
        writer.write(_record(ex, z[2 * j], z[2 * j + 1]))
        written += 1
  finally:
    writer.close()
  os.replace(path + ".tmp", path)
  meta_path = os.path.join(out_dir, latents_lib.METADATA_FILE)
  meta = latents_lib.read_metadata(out_dir) if os.path.exists(meta_path) else {}
  if latent_shape and meta.get("latent_shape") not in (None, latent_shape):
    raise ValueError(f"{out_dir}: split {split} latents {latent_shape} differ from the cache's "
                     f"{meta['latent_shape']}; delete the cache to re-encode")
  meta.update(scale=float(encoder.scale), shift=float(encoder.shift),
              latent_shape=latent_shape or meta.get("latent_shape"), encoder=repr(encoder))
  entry = {"num_records": written, "shards": [os.path.basename(path)], "skipped": skipped}
  meta.setdefault("splits", {})[split] = entry
  with open(meta_path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(meta_path + ".tmp", meta_path)
  return entry


def build_editing_latents(config: ml_collections.ConfigDict, data_dir: str | None,
                          encoder: latents_lib.Encoder, splits: tuple[str, ...] = SPLITS,
                          batch_size: int = 64) -> dict[str, Any]:
  """Builds (shapes) or reads (folder) the editing set and encodes its splits.

  A split already in the cache is kept; folder splits without a JSONL file
  are skipped (only `train` is required).
  """
  if config.editing.source == "shapes":
    build_editing_set(config, data_dir)
  root = editing_dir(config, data_dir)
  out = latent_dir(config, data_dir)

  def encode_split(split):
    if split != "train" and not os.path.exists(os.path.join(root, f"{split}.jsonl")):
      return None
    return build_editing_cache(encoder, editing.FolderSource(root, split), out, split, batch_size)
  return latents_lib.encode_missing_splits(out, splits, encode_split)


# --------------------------------------------------------------- documents --
class EditDocumentMaker:
  """(index, raw cache record) -> {"index", "docs", "skip"}, as documents.DocumentMaker.

  `instruction_dropout`: the share of documents made without their instruction
  (BOS BOI in EOI BOI out EOI EOS), drawn per index from `seed`: the text-free
  branch of InstructPix2Pix guidance (diffusion.image_cfg_scale).
  """

  def __init__(self, tokenizer: Tokenizer, seq_len: int, patches: int,
               latent_shape: tuple[int, int, int], scale: float, shift: float,
               instruction_dropout: float = 0.0, seed: int = 0):
    self.tok, self.seq_len, self.patches = tokenizer, seq_len, patches
    self.latent_shape, self.scale, self.shift = tuple(latent_shape), scale, shift
    self.instruction_dropout, self.seed = instruction_dropout, seed

  def __call__(self, index: int, raw: bytes) -> dict[str, Any]:
    skip = lambda reason, rid: {"index": index, "docs": [], "skip": [reason, rid]}
    try:
      rec = serialization.msgpack_restore(raw)
      rid = str(rec["id"])
      z_in, z_out = np.asarray(rec["input"]), np.asarray(rec["output"])
    except Exception:  # corrupt msgpack: anything can be raised
      return skip("undecodable_record", f"editing#{index}")
    if z_in.shape != self.latent_shape or z_out.shape != self.latent_shape:
      return skip("bad_latent_shape", rid)
    ids = self.tok.encode(str(rec["instruction"]))
    if not ids:
      return skip("empty_instruction", rid)
    if editing.document_length(len(ids), self.patches) > self.seq_len:
      return skip("instruction_too_long", rid)
    scale = lambda z: ((z.astype(np.float32) - self.shift) * self.scale).astype(np.float32)
    if (self.instruction_dropout > 0
        and np.random.default_rng((self.seed, index)).random() < self.instruction_dropout):
      ids = []
    doc = editing.editing_document(ids, scale(z_in), scale(z_out), self.patches)
    return {"index": index, "docs": [doc], "skip": None}


class _Reindex:
  """Sets each element's "index" to its index in the outer (mixed) dataset.

  The packer rebuilds pending documents on restore as `lookup[index]`, so the
  index must address the dataset it iterates, not a mixed-in part.
  """

  def __call__(self, index: int, elem: dict[str, Any]) -> dict[str, Any]:
    return dict(elem, index=index)


def _check(config: ml_collections.ConfigDict) -> None:
  d, e = config.data, config.editing
  if d.max_images_per_seq < 2:
    raise ConfigError(f"config key data.max_images_per_seq={d.max_images_per_seq}: an editing "
                      f"example holds 2 images")
  need = editing.document_length(1, patches_per_image(config.model))
  if need > d.seq_len:
    raise ConfigError(f"config key data.seq_len={d.seq_len}: an editing example needs at least "
                      f"{need} positions (2 images of {patches_per_image(config.model)} patches)")
  if not 0.0 <= e.pretrain_fraction < 1.0:
    raise ConfigError(f"config key editing.pretrain_fraction={e.pretrain_fraction}: must be in "
                      f"[0, 1)")


def documents(config: ml_collections.ConfigDict, data_dir: str | None, split: str,
              process_index: int, process_count: int, train: bool
              ) -> tuple[grain.MapDataset, tuple[int, int, int], list[str]]:
  """Editing documents (mixed with pretraining ones when configured).

  What the pipeline reads when editing.source is not `none`; returns what
  `documents.pretraining_documents` returns (a MapDataset of DocumentMaker-style
  elements, the latent shape, and the ids of records the cache build skipped).
  """
  _check(config)
  cache = latent_dir(config, data_dir)
  try:
    meta = latents_lib.read_metadata(cache)
    paths = latents_lib.split_paths(cache, split)
  except FileNotFoundError as err:
    raise FileNotFoundError(f"config key editing.latents: {err}; build it with "
                            f"`tfjax-edit-data --config=...`") from err
  latent_shape = documents_lib.check_latents(config, meta)
  tok = Tokenizer.load(sources.tokenizer_path(config, data_dir))
  maker = EditDocumentMaker(tok, config.data.seq_len, patches_per_image(config.model),
                            latent_shape, meta["scale"], meta["shift"],
                            config.editing.get("instruction_dropout", 0.0) if train else 0.0,
                            config.data.shuffle_seed)
  src = sources.ArrayRecordSource(paths)
  if len(src) < process_count:
    raise ConfigError(f"config key editing.source: {len(src)} {split} examples cannot feed "
                      f"{process_count} processes")
  ds = grain.MapDataset.source(src)[process_index::process_count]
  if train:
    ds = documents_lib.shuffled_endless(ds, config.data.shuffle_seed + 104729)
  docs = ds.map_with_index(maker)
  build_skips = list(meta["splits"][split].get("skipped", []))
  frac = config.editing.pretrain_fraction
  if not train or frac <= 0:
    return docs, latent_shape, build_skips
  base_config = config.copy_and_resolve_references()
  base_config.editing.source = "none"
  base, base_shape, base_skips = documents_lib.pretraining_documents(
      base_config, data_dir, split, process_index, process_count, train)
  if tuple(base_shape) != tuple(latent_shape):
    raise ConfigError(f"config key editing.latents: editing latents {list(latent_shape)} differ "
                      f"from the pretraining latents {list(base_shape)}")
  mixed = grain.MapDataset.mix([docs, base], [1.0 - frac, frac])
  return mixed.map_with_index(_Reindex()), latent_shape, build_skips + base_skips
