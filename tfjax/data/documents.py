"""Documents: records -> token/latent documents, the input of the packer.

A document is a pure function of its index in the (mixed) MapDataset, seeded
by it, so the packer (pipeline.py) can rebuild any pending document from its
index on restore. Bad records become skip markers ({"skip": [reason, id]}).
The pretraining documents are here; editing ones (editing_pipeline.py) mix
these in.
"""
from __future__ import annotations

import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from tfjax.config import ConfigError, patches_per_image
from tfjax.data import latents as latents_lib
from tfjax.data import packing
from tfjax.data import sources
from tfjax.data.tokenizer import Tokenizer


class _Tag:
  """Marks a record with its source kind (picklable, unlike a lambda)."""

  def __init__(self, kind: str):
    self.kind = kind

  def __call__(self, record: Any) -> tuple[str, Any]:
    return (self.kind, record)


class DocumentMaker:
  """(index, (kind, raw record)) -> {"index", "docs", "skip"}; pure in index."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, patches: int,
               latent_shape: tuple[int, int, int], scale: float, shift: float,
               caption_first_prob: float, seed: int):
    self.tok, self.seq_len, self.patches = tokenizer, seq_len, patches
    self.latent_shape = tuple(latent_shape)
    self.scale, self.shift = scale, shift
    self.caption_first_prob, self.seed = caption_first_prob, seed

  def _skip(self, index: int, reason: str, record_id: str) -> dict[str, Any]:
    return {"index": index, "docs": [], "skip": [reason, record_id]}

  def __call__(self, index: int, item: tuple[str, Any]) -> dict[str, Any]:
    kind, raw = item
    if kind == "text":
      text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
      ids = self.tok.encode(text) if text.strip() else []
      if not ids:
        return self._skip(index, "empty_text", f"text#{index}")
      docs = [packing.make_document([("text", c)], self.patches)
              for c in packing.split_text(ids, self.seq_len)]
      return {"index": index, "docs": docs, "skip": None}
    try:
      rec = latents_lib.decode_record(raw)
      rid, caption, z = str(rec["id"]), str(rec["caption"]), np.asarray(rec["latents"])
    except Exception:  # corrupt msgpack: anything can be raised
      return self._skip(index, "undecodable_record", f"latents#{index}")
    if z.shape != self.latent_shape:
      return self._skip(index, "bad_latent_shape", rid)
    ids = self.tok.encode(caption) if caption.strip() else []
    if not ids:
      return self._skip(index, "empty_caption", rid)
    if len(ids) + packing.image_positions(self.patches) + 2 > self.seq_len:
      return self._skip(index, "caption_too_long", rid)
    z = ((z.astype(np.float32) - self.shift) * self.scale).astype(np.float32)
    rng = np.random.default_rng([self.seed, index])
    caption_first = bool(rng.random() < self.caption_first_prob)
    parts = [("text", ids), ("image", z, False)] if caption_first else \
            [("image", z, True), ("text", ids)]
    return {"index": index, "docs": [packing.make_document(parts, self.patches)], "skip": None}


class EpochShuffle(grain.MapDataset):
  """Endless repetition of `parent`, each epoch in its own seeded permutation.

  A cached numpy permutation per epoch costs O(1) per element; grain's
  `shuffle` (a Feistel index shuffle) costs ~60 us per element, a quarter of
  the pipeline's time here. Sources too large to hold a permutation
  (> PERMUTATION_MAX records) should use `shuffle().repeat()` instead.
  """

  PERMUTATION_MAX = 10_000_000  # 40 MB of int32 per process (and per worker)

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._n, self._seed = len(parent), seed
    self._perm: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    if self._perm is None or self._perm[0] != epoch:
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n).astype(np.int32)
      self._perm = (epoch, perm)
    return self._parent[int(self._perm[1][i])]


def shuffled_endless(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
  """Endless repetition of ds, reshuffled every epoch (EpochShuffle when it fits)."""
  if len(ds) <= EpochShuffle.PERMUTATION_MAX:
    return EpochShuffle(ds, seed)
  return ds.shuffle(seed=seed).repeat()


def check_latents(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> tuple[int, int, int]:
  """The latent cache's latent shape; ConfigError naming the model key it contradicts."""
  m = config.model
  shape = tuple(meta["latent_shape"])
  want = (m.latent_size, m.latent_size, m.latent_channels)
  if shape != want:
    key = "model.latent_channels" if shape[:2] == want[:2] else "model.latent_size"
    raise ConfigError(f"config key {key}: the latent cache holds latents {list(shape)} but "
                      f"the model expects {list(want)} (model.latent_size, model.latent_channels)")
  return shape


def _mean_doc_len(maker: DocumentMaker, kind: str, source: Any, n: int = 32) -> float:
  lens = []
  for i in range(min(n, len(source))):
    out = maker(i, (kind, source[i]))
    lens.extend(len(d["tokens"]) for d in out["docs"])
  return float(np.mean(lens)) if lens else 1.0


def pretraining_documents(config: ml_collections.ConfigDict, data_dir: str | None, split: str,
                          process_index: int, process_count: int, train: bool
                          ) -> tuple[grain.MapDataset, tuple[int, int, int], list[str]]:
  """This process's text and image-caption documents of `split`, mixed by
  data.text_image_ratio (train: shuffled, endless).

  Returns (a MapDataset of DocumentMaker elements, the latent shape, the ids
  of records the cache build skipped).
  """
  d = config.data
  tok = Tokenizer.load(sources.tokenizer_path(config, data_dir))
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(f"config key model.vocab_size={config.model.vocab_size} is smaller than "
                      f"the tokenizer's {tok.vocab_size} ids")
  text = sources.text_source(config, data_dir, split)
  if train and d.text_image_ratio <= 0 and d.image_text_source != "none":
    text = None  # ratio 0: image-caption documents only
  latent_src, meta = sources.latent_source(config, data_dir, split)
  if text is None and latent_src is None:
    raise ConfigError("config keys data.text_source and data.image_text_source are both 'none'")
  latent_shape = (check_latents(config, meta) if meta else
                  (config.model.latent_size, config.model.latent_size,
                   config.model.latent_channels))
  maker = DocumentMaker(tok, d.seq_len, patches_per_image(config.model), latent_shape,
                        meta["scale"] if meta else 1.0, meta["shift"] if meta else 0.0,
                        d.caption_first_prob, d.shuffle_seed)
  parts, weights = [], []
  for kind, src in (("image", latent_src), ("text", text)):
    if src is None:
      continue
    if len(src) < process_count:
      raise ConfigError(f"config key data.{'image_text' if kind == 'image' else 'text'}_source: "
                        f"{len(src)} {split} records cannot feed {process_count} processes")
    ds = grain.MapDataset.source(src)[process_index::process_count]
    if train:
      ds = shuffled_endless(ds, d.shuffle_seed + 7919 * len(parts))
    parts.append(ds.map(_Tag(kind)))
    weights.append(_mean_doc_len(maker, kind, src))
  if train and len(parts) == 2:
    # Example weights giving `text_image_ratio` text tokens per image-doc token.
    len_img, len_txt = weights
    mixed = grain.MapDataset.mix(parts, [1.0, d.text_image_ratio * len_img / len_txt])
  else:
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  build_skips = meta["splits"][split].get("skipped", []) if meta else []
  return mixed.map_with_index(maker), latent_shape, build_skips
