"""TFDS builder for the shapes dataset, written as ArrayRecord.

Images are stored as PNG bytes (a scalar `object` tensor), which TFDS writes
without TensorFlow; `scene` is the JSON scene the evaluation scores against.
The builder config name records everything the data depends on, so a config
change builds a new dataset instead of silently reusing an old one.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tfjax.data import shapes

VERSION = "1.0.0"


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


class TfjaxShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shapes scenes with captions and scene metadata."""

  VERSION = tfds.core.Version(VERSION)
  # Built from code, not from a TFDS package directory: no checksums file to
  # look up (and no importlib_resources needed to find one).
  code_path = None

  def __init__(self, *, image_size: int = 64, num_train: int = 1000, num_eval: int = 100,
               seed: int = 0, options: shapes.SceneOptions = shapes.SceneOptions(), **kwargs):
    self.image_size, self.num_train, self.num_eval, self.seed = (
        image_size, num_train, num_eval, seed)
    self.options = options
    name = f"px{image_size}_train{num_train}_eval{num_eval}_seed{seed}{options.name}"
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Built-in shapes scenes: 1-3 coloured shapes on a plain background.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
            "caption": tfds.features.Text(),
            "scene": tfds.features.Text(),  # JSON, see tfjax/data/shapes.py
            "id": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    return {"train": self._generate_examples("train", self.num_train),
            "validation": self._generate_examples("validation", self.num_eval),
            "test": self._generate_examples("test", self.num_eval)}

  def _generate_examples(self, split: str, num: int):
    images, scenes, captions = shapes.generate_split(split, num, self.image_size, self.seed,
                                                     self.options)
    for i in range(num):
      rid = f"shapes-{split}-{i}"
      yield rid, {"image": _png(images[i]), "caption": captions[i],
                  "scene": json.dumps(scenes[i]), "id": rid}


def builder(config: ml_collections.ConfigDict, root: str) -> TfjaxShapes:
  d = config.data
  data_dir = d.tfds_dir or os.path.join(root, "tfds")
  return TfjaxShapes(image_size=d.image_size, num_train=d.num_train_scenes,
                     num_eval=d.num_eval_scenes, seed=d.seed,
                     options=shapes.SceneOptions.from_config(d), data_dir=data_dir,
                     file_format="array_record")


def build(config: ml_collections.ConfigDict, root: str) -> str:
  """Writes the shapes dataset unless it exists; returns its directory."""
  b = builder(config, root)
  tfds.disable_progress_bar()  # a progress bar per split floods job logs
  b.download_and_prepare()  # a no-op when already prepared
  return str(b.data_dir)


def data_source(config: ml_collections.ConfigDict, root: str, split: str) -> Any:
  """Random-access records of a built split; errors name the fix."""
  b = builder(config, root)
  if not b.is_prepared():
    raise FileNotFoundError(f"shapes dataset not built in {b.data_dir} (config key "
                            f"data.image_text_source=shapes; run `tfjax-data build`)")
  return b.as_data_source(split=split)
