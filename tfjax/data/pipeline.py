"""The Grain input pipeline: mix, order, tokenize, pack into Batches.

  text records ----shard(process)-shuffle-repeat--.
                                                    mix(token ratio) -> make documents
  latent records --shard(process)-shuffle-repeat--'      (MapDataset, index-addressed)
      -> to_iter_dataset -> PackIterDataset (first-fit into batch rows)
      -> mp_prefetch(num_workers) -> SkipCountIterDataset (main process)

Every element before packing is addressed by its index in the mixed
MapDataset, and a document is a pure function of that index (seeded by it), so
the packer's checkpoint state is small JSON: its parent's state plus the
indices of documents read but not yet placed. Restoring replays nothing and
continues with exactly the next batch.

Bad records (undecodable latent record, wrong latent shape, empty caption or
text, caption longer than the sequence) become skip markers; the packer counts
them per batch and the outermost iterator sums them: `iterator.skip_counts()`
(records skipped after the last batch of a finite pass are not counted).
"""
from __future__ import annotations

import collections
import json
import logging
from typing import Any, Iterator

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from tfjax.config import ConfigError, patches_per_image
from tfjax.data import documents, editing_pipeline, packing

MIN_DOC_LEN = 3      # BOS t EOS: a row with less room than this is full
SKIP_IDS_KEPT = 20   # most recent skipped record ids kept for reporting


# ------------------------------------------------------------------ packing --
class PackIterDataset(grain.IterDataset):
  """First-fit packs documents into full batches of `[batch_size, seq_len]`.

  Args:
    parent: IterDataset of DocumentMaker outputs.
    lookup: the MapDataset `parent` iterates (before worker slicing), used to
      rebuild pending documents on restore.
    max_misses: documents that did not fit before a batch is closed; they
      lead the next batch, so nothing is dropped or reordered far.
  """

  def __init__(self, parent: grain.IterDataset, lookup: grain.MapDataset, *, batch_size: int,
               seq_len: int, max_images: int, latent_shape: tuple[int, int, int],
               patches: int, max_misses: int):
    super().__init__(parent)
    self.lookup, self.max_misses = lookup, max_misses
    self.builder_args = (batch_size, seq_len, max_images, tuple(latent_shape), patches)

  def __iter__(self) -> "_PackIterator":
    return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset):
    super().__init__(parent)
    self._ds = ds
    self._pending: list[tuple[int, int, packing.Doc]] = []

  def __next__(self) -> dict[str, Any]:
    builder = packing.BatchBuilder(*self._ds.builder_args)
    queue = collections.deque(self._pending)
    leftovers, misses = [], 0
    skipped: collections.Counter = collections.Counter()
    skipped_ids: list[str] = []
    exhausted = False
    while not builder.full(MIN_DOC_LEN) and misses < self._ds.max_misses:
      if not queue:
        try:
          elem = next(self._parent)
        except StopIteration:
          exhausted = True
          break
        if elem["skip"]:
          reason, rid = elem["skip"]
          skipped[reason] += 1
          skipped_ids.append(rid)
          logging.warning("data: skipped record %s (%s)", rid, reason)
          continue
        queue.extend((elem["index"], p, d) for p, d in enumerate(elem["docs"]))
        continue
      item = queue.popleft()
      if builder.empty and not builder.fits_anywhere(item[2]):
        raise ValueError(f"document {item[0]} ({len(item[2]['tokens'])} positions, "
                         f"{len(item[2]['images'])} images) cannot fit an empty row: raise "
                         f"data.seq_len or data.max_images_per_seq")
      if not builder.add(item[2]):
        leftovers.append(item)
        misses += 1
    self._pending = leftovers + list(queue)
    if exhausted and builder.empty:
      raise StopIteration
    return {"batch": builder.build(), "skipped": dict(skipped),
            "skipped_ids": skipped_ids[-SKIP_IDS_KEPT:]}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            "pending": [[int(i), int(p)] for i, p, _ in self._pending]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = [(i, p, self._ds.lookup[i]["docs"][p]) for i, p in state["pending"]]


class SkipCountIterDataset(grain.IterDataset):
  """Unwraps packed batches and sums skip counts (runs in the main process).

  `build_skips` are records already dropped when the latent cache was built:
  an id (undecodable image) or a [reason, id] pair (the stream latent job's
  reasons); they start the counts so the trainer reports them too.
  """

  def __init__(self, parent: grain.IterDataset, build_skips: list[str] | None = None):
    super().__init__(parent)
    self.build_skips = list(build_skips or [])

  def __iter__(self) -> "SkipCountIterator":
    it = SkipCountIterator(self._parent.__iter__())
    pairs = [s if isinstance(s, (list, tuple)) else ("undecodable_image", s)
             for s in self.build_skips]
    it._counts.update(reason for reason, _ in pairs)  # pylint: disable=protected-access
    it._ids = [rid for _, rid in pairs[-SKIP_IDS_KEPT:]]  # pylint: disable=protected-access
    return it


class SkipCountIterator(grain.DatasetIterator):
  """Yields batch dicts; `skip_counts()` and `skipped_ids()` report bad records."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._counts: collections.Counter = collections.Counter()
    self._ids: list[str] = []

  def __next__(self) -> dict[str, np.ndarray]:
    out = next(self._parent)
    self._counts.update(out["skipped"])
    self._ids = (self._ids + list(out["skipped_ids"]))[-SKIP_IDS_KEPT:]
    return out["batch"]

  def skip_counts(self) -> dict[str, int]:
    """Cumulative skipped records by reason, e.g. {"empty_caption": 3}."""
    return dict(self._counts)

  def skipped_ids(self) -> list[str]:
    """Ids of the most recently skipped records."""
    return list(self._ids)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skip_counts": dict(self._counts),
            "skipped_ids": list(self._ids)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = collections.Counter(state["skip_counts"])
    self._ids = list(state["skipped_ids"])

  def close(self) -> None:
    close = getattr(self._parent, "close", None)
    if close:
      close()


# ----------------------------------------------------------------- assembly --
def _documents(config: ml_collections.ConfigDict, data_dir: str | None, split: str,
               process_index: int, process_count: int, train: bool
               ) -> tuple[grain.MapDataset, tuple[int, int, int], list[str]]:
  if config.get("editing") and config.editing.source != "none":
    return editing_pipeline.documents(config, data_dir, split, process_index, process_count, train)
  return documents.pretraining_documents(config, data_dir, split, process_index, process_count,
                                         train)


def _pipeline(config: ml_collections.ConfigDict, data_dir: str | None, split: str,
              process_index: int, process_count: int, train: bool,
              num_workers: int) -> grain.IterDataset:
  d = config.data
  if d.batch_size % process_count:
    raise ConfigError(f"config key data.batch_size={d.batch_size} is not divisible by the "
                      f"{process_count} processes")
  if d.image_text_source != "none" and d.max_images_per_seq < 1:
    raise ConfigError("config key data.max_images_per_seq must be >= 1 when "
                      "data.image_text_source is not 'none'")
  need = packing.image_positions(patches_per_image(config.model)) + 2
  if need > d.seq_len:
    raise ConfigError(f"config key data.seq_len={d.seq_len}: a document with one image needs "
                      f"{need} positions (BOS, BOI, patches, EOI, EOS)")
  docs, latent_shape, build_skips = _documents(config, data_dir, split, process_index,
                                               process_count, train)
  batch_size = d.batch_size // process_count
  # Documents are made in Python (GIL-bound): read threads only add overhead
  # unless storage is slow; parallelism comes from worker processes.
  read = grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=4 * d.read_threads)
  ds = PackIterDataset(docs.to_iter_dataset(read), docs, batch_size=batch_size, seq_len=d.seq_len,
                       max_images=d.max_images_per_seq, latent_shape=latent_shape,
                       patches=patches_per_image(config.model),
                       max_misses=d.pack_max_misses or 2 * batch_size + 8)
  if num_workers > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests,
    # notebooks) nothing parsed them, so take the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  # Build-time skips are reported once, by process 0.
  return SkipCountIterDataset(ds, build_skips if process_index == 0 else None)


def process_index_count(process_index: int | None, process_count: int | None
                        ) -> tuple[int, int]:
  """(process_index, process_count), jax's where not given; checked."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def make_train_iterator(config: ml_collections.ConfigDict, data_dir: str | None = None, *,
                        process_index: int | None = None,
                        process_count: int | None = None) -> SkipCountIterator:
  """Endless packed training batches for this JAX process.

  Yields dicts with exactly the keys, dtypes and shapes of
  `tfjax.batch.empty_batch(data.batch_size // process_count, data.seq_len,
  data.max_images_per_seq, latent_shape)`. The iterator is a
  `grain.DatasetIterator`: save it with Orbax via
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` under
  a `grain.checkpoint.CheckpointHandler()` item (or `get_state`/`set_state`).
  """
  pi, pc = process_index_count(process_index, process_count)
  ds = _pipeline(config, data_dir, "train", pi, pc, True, config.data.num_workers)
  return ds.__iter__()


def make_eval_iterator(config: ml_collections.ConfigDict, data_dir: str | None = None,
                       split: str = "validation", *, process_index: int | None = None,
                       process_count: int | None = None,
                       num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic validation batches of `split` (images, then text).

  Without `num_batches`: one pass (finite; the last batch may be partly
  padding). With it: exactly `num_batches` batches, starting the split over
  when it runs out, so every JAX process yields the same count (processes
  hold different shards, and a process stopping early would hang collectives).
  """
  pi, pc = process_index_count(process_index, process_count)
  make = lambda: _pipeline(config, data_dir, split, pi, pc, False, 0).__iter__()
  if num_batches is None:
    return make()
  return _FixedCount(make, num_batches)


class _FixedCount:
  """Exactly `n` batches from `make()`, restarting it when exhausted."""

  def __init__(self, make, n: int):
    self._make, self._left = make, n
    self._it = make()
    self._counts: collections.Counter = collections.Counter()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._left <= 0:
      raise StopIteration
    try:
      batch = next(self._it)
    except StopIteration:
      self._counts.update(self._it.skip_counts())
      self._it = self._make()
      batch = next(self._it)
    self._left -= 1
    return batch

  def skip_counts(self) -> dict[str, int]:
    return dict(self._counts + collections.Counter(self._it.skip_counts()))


def describe(batch: dict[str, np.ndarray]) -> str:
  """One-line summary of a batch (for logs and the CLI)."""
  seg = batch["segment_ids"]
  return json.dumps({"shape": list(seg.shape), "non_padding": float((seg > 0).mean()),
                     "documents": int(sum(len(set(r[r > 0])) for r in seg)),
                     "images": int(batch["image_valid"].sum())})

