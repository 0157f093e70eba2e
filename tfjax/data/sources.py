"""Random-access record sources named by the config.

`data.text_source`:        shapes_text | tfds:NAME[/CONFIG] | none
`data.image_text_source`:  shapes | folder:PATH | tfds:NAME[/CONFIG] | none

Training never reads pixels: the image-text source is encoded once into the
latent cache (latents.py) and the pipeline reads that cache. The image source
name matters when the cache is built (build.py), where `image_source` opens it.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import ml_collections

from tfjax.data import latents as latents_lib

SHAPES_TEXT_DIR = "shapes_text"


def data_root(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return data_dir or config.data.dir


def tfds_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return config.data.tfds_dir or os.path.join(data_root(config, data_dir), "tfds")


def latent_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  return config.data.latents or os.path.join(data_root(config, data_dir), "latents")


def given_tokenizer(config: ml_collections.ConfigDict) -> str | None:
  """A tokenizer from outside (never trained here): data.tokenizer, else the
  tokenizer.model of an `hf_llama:DIR` train.init_from; else None."""
  from tfjax.model.hf_llama import tokenizer_file  # pylint: disable=g-import-not-at-top
  init_from = config.train.get("init_from", "") if "train" in config else ""
  return config.data.tokenizer or tokenizer_file(init_from)


def tokenizer_path(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
  """The given tokenizer, else DIR/tokenizer (trained by the data build)."""
  return given_tokenizer(config) or os.path.join(data_root(config, data_dir), "tokenizer")


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

  def __getitem__(self, i: int) -> Any:
    rec = self.source[i]
    return rec if self.field is None else rec[self.field]


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
    return grain.sources.ArrayRecordDataSource([path])
  if name.startswith("tfds:"):
    src = open_tfds(name[5:], split, tfds_dir(config, data_dir), "data.text_source")
    return _TextField(src, config.data.text_field)
  raise ValueError(f"config key data.text_source: unknown source {name!r}")


def latent_source(config: ml_collections.ConfigDict, data_dir: str | None, split: str
                  ) -> tuple[Any, dict[str, Any]] | tuple[None, None]:
  """(raw latent-cache records, cache metadata), or (None, None) for `none`."""
  if config.data.image_text_source == "none":
    return None, None
  cache = latent_dir(config, data_dir)
  meta = latents_lib.read_metadata(cache)
  return grain.sources.ArrayRecordDataSource(latents_lib.split_paths(cache, split)), meta


def image_source(config: ml_collections.ConfigDict, data_dir: str | None, split: str) -> Any:
  """Image-caption records with `image`, `caption`, `scene`, `id` (build time)."""
  name = config.data.image_text_source
  if name in ("shapes",) or name.startswith("folder:"):
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
    from tfjax.data import tfds_shapes  # pylint: disable=g-import-not-at-top
    return "shapes/" + tfds_shapes.builder(config, data_root(config, data_dir)).builder_config.name
  return name


class _TfdsImageText:
  """coco_captions-style records -> {image, caption, scene, id}."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    rec = self.source[i]
    cap = rec.get("caption", "")
    if isinstance(cap, dict):  # coco_captions: {"captions": {"text": [...]}}
      cap = cap.get("text", [""])[0]
    if "captions" in rec:
      texts = rec["captions"].get("text", [])
      cap = texts[0] if len(texts) else ""
    return {"image": rec["image"], "caption": cap, "scene": "",
            "id": str(rec.get("image/id", rec.get("id", i)))}
