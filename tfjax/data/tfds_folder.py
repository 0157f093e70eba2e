"""TFDS builder for a folder of images plus a captions JSONL file.

The folder holds image files and `captions.jsonl`, one JSON object a line:

  {"file": "cat.jpg", "caption": "a cat on a sofa", "split": "train"}

`split` is optional (train/validation/test); without it a hash of the file
name puts 5% of the images in validation. Image bytes are stored as they are
(no decoding here), so a corrupt file is found, skipped and reported by id
when the latent cache is built.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tfjax.files import utf8_lines

VERSION = "1.0.0"
CAPTIONS_FILE = "captions.jsonl"


def _split_for(name: str) -> str:
  return "validation" if int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100 < 5 \
      else "train"


def read_captions(folder: str) -> list[dict[str, Any]]:
  path = os.path.join(folder, CAPTIONS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config key data.image_text_source=folder:{folder}: "
                            f"{path} is missing")
  rows = []
  for n, line in utf8_lines(path):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      row["file"], row["caption"] = str(row["file"]), str(row.get("caption", ""))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}:{n}: expected {{\"file\": ..., \"caption\": ...}}: "
                       f"{type(e).__name__}: {e}") from None
    row.setdefault("split", _split_for(row["file"]))
    row["line"] = n
    rows.append(row)
  return rows


def check_files(folder: str, rows: list[dict[str, Any]]) -> None:
  """Every row's image file exists; the error names the captions line."""
  for row in rows:
    if not os.path.isfile(os.path.join(folder, row["file"])):
      raise FileNotFoundError(f"{os.path.join(folder, CAPTIONS_FILE)}:{row['line']}: names "
                              f"{row['file']!r}, which is not in {folder}")


class TfjaxFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images of a folder with captions from its captions.jsonl."""

  VERSION = tfds.core.Version(VERSION)
  # Built from code, not from a TFDS package directory: no checksums file to
  # look up (and no importlib_resources needed to find one).
  code_path = None

  def __init__(self, *, folder: str, **kwargs):
    self.folder = os.path.abspath(folder)
    tag = hashlib.sha1(self.folder.encode()).hexdigest()[:10]
    name = f"{os.path.basename(self.folder.rstrip('/')) or 'root'}_{tag}"
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"Images and captions of {self.folder}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
            "caption": tfds.features.Text(),
            "scene": tfds.features.Text(),
            "id": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    rows = read_captions(self.folder)
    splits = sorted({r["split"] for r in rows} | {"train"})
    return {s: self._generate_examples([r for r in rows if r["split"] == s]) for s in splits}

  def _generate_examples(self, rows: list[dict[str, Any]]):
    check_files(self.folder, rows)
    for row in rows:
      with open(os.path.join(self.folder, row["file"]), "rb") as f:
        data = f.read()
      yield row["file"], {"image": data, "caption": row["caption"], "scene": "",
                          "id": row["file"]}


def builder(config: ml_collections.ConfigDict, root: str) -> TfjaxFolder:
  folder = config.data.image_text_source[len("folder:"):]
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"config key data.image_text_source: folder {folder} does not exist")
  data_dir = config.data.tfds_dir or os.path.join(root, "tfds")
  return TfjaxFolder(folder=folder, data_dir=data_dir, file_format="array_record")


def build(config: ml_collections.ConfigDict, root: str) -> str:
  """Builds the dataset once; a failed build leaves no directory behind."""
  b = builder(config, root)
  if b.is_prepared():
    return str(b.data_dir)
  check_files(b.folder, read_captions(b.folder))  # bad input stops before TFDS writes
  tfds.disable_progress_bar()  # a progress bar per split floods job logs
  created = [d for d in (os.path.dirname(str(b.data_dir)), os.path.dirname(os.path.dirname(
      str(b.data_dir)))) if not os.path.exists(d)]
  try:
    b.download_and_prepare()
  except BaseException:
    for d in created:
      shutil.rmtree(d, ignore_errors=True)
    raise
  return str(b.data_dir)


def data_source(config: ml_collections.ConfigDict, root: str, split: str) -> Any:
  b = builder(config, root)
  if not b.is_prepared():
    raise FileNotFoundError(f"folder dataset not built in {b.data_dir} (config key "
                            f"data.image_text_source; run `tfjax-data build`)")
  return b.as_data_source(split=split)
