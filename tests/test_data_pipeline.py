"""Packing invariants, the Grain pipeline, checkpointing, sharding, bad records."""
import json
import os

import grain
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from tfjax.batch import empty_batch
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID, ConfigError, default_config
from tfjax.data import build, latents, packing, pipeline

P = 4  # patches per image with latent_size 4, patch_size 2


def tiny_config(**data):
  c = default_config()
  c.model.vocab_size = 512
  c.model.latent_size, c.model.latent_channels, c.model.patch_size = 4, 4, 2
  d = c.data
  d.image_size, d.num_train_scenes, d.num_eval_scenes, d.num_text_docs = 32, 300, 30, 300
  d.vocab_size, d.seq_len, d.batch_size, d.max_images_per_seq = 400, 96, 4, 4
  for k, v in data.items():
    setattr(d, k, v)
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  c = tiny_config()
  build.build_all(c, root)
  build.build_latents(c, root, latents.PixelPatchEncoder(downsample=8, channels=4))
  return root


# --------------------------------------------------------- packing invariants --
class RandomDocs:
  """index -> one random document whose tokens/latents encode its index."""

  def __call__(self, index, _):
    rng = np.random.default_rng(index)
    parts = []
    for _ in range(int(rng.integers(0, 3))):
      parts.append(("image", np.full((2, 4, 4), index, np.float32), bool(rng.random() < .5)))
    parts.insert(int(rng.integers(0, len(parts) + 1)),
                 ("text", [1000 + index] + list(rng.integers(10, 99, rng.integers(0, 40)))))
    return {"index": index, "docs": [packing.make_document(parts, P)], "skip": None}


def unpack(batch):
  """The documents of a batch: [(first token id, tokens, latents list)]."""
  docs = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    n = int((seg > 0).sum())
    assert (seg[:n] > 0).all() and (seg[n:] == 0).all(), "padding only at the end"
    if n == 0:  # an empty row (only in the last batch of a finite source)
      assert not batch["image_valid"][r].any() and not batch["text_loss_mask"][r].any()
      continue
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and seg[0] == 1
    ids = batch["image_ids"][r]
    valid = batch["image_valid"][r]
    k = int(valid.sum())
    assert valid[:k].all() and not valid[k:].any()
    assert set(np.unique(ids[ids > 0])) == set(range(1, k + 1))
    for slot in range(k):
      start = batch["image_starts"][r, slot]
      where = np.nonzero(ids == slot + 1)[0]
      np.testing.assert_array_equal(where, np.arange(start, start + P))  # whole, contiguous
      assert len(set(seg[where])) == 1
      assert batch["tokens"][r, start - 1] == BOI_ID and batch["tokens"][r, start + P] == EOI_ID
    for s in range(1, int(seg.max()) + 1):
      pos = np.nonzero(seg == s)[0]
      np.testing.assert_array_equal(batch["positions"][r, pos], np.arange(len(pos)))
      toks = batch["tokens"][r, pos]
      assert toks[0] == BOS_ID and toks[-1] == EOS_ID
      tg, m = batch["text_targets"][r, pos], batch["text_loss_mask"][r, pos]
      np.testing.assert_array_equal(tg[:-1], toks[1:])
      patch = ids[pos] > 0
      assert not (m & patch).any() and not m[toks == BOI_ID].any() and not m[-1]
      assert m[~patch & (toks != BOI_ID)][:-1].all()  # every other text input is scored
      assert m[np.nonzero(toks == BOI_ID)[0] - 1].all()  # the token before BOI predicts it
      slots = sorted(set(ids[pos][patch] - 1))
      docs.append((int(toks[1]) if toks[1] >= 1000 else None, toks,
                   [batch["image_latents"][r, sl] for sl in slots]))
  return docs


def test_packing_invariants_random_docs():
  n = 400
  docs = grain.MapDataset.range(n).map_with_index(RandomDocs())
  ds = pipeline.PackIterDataset(docs.to_iter_dataset(), docs, batch_size=3, seq_len=64,
                                max_images=3, latent_shape=(2, 4, 4), patches=P, max_misses=8)
  seen = []
  it = iter(ds)
  out = [b["batch"] for b in it]
  for b in out:
    seen += unpack(b)
  firsts = [d[0] - 1000 for d in seen if d[0] is not None]
  # Text leads some documents; image-first ones are identified by their latents.
  firsts += [int(d[2][0][0, 0, 0]) for d in seen if d[0] is None]
  assert sorted(firsts) == list(range(n)), "every document exactly once"
  for d in seen:
    ident = d[0] - 1000 if d[0] is not None else int(d[2][0][0, 0, 0])
    want = RandomDocs()(ident, None)["docs"][0]
    np.testing.assert_array_equal(d[1], want["tokens"])
    assert all((z == ident).all() for z in d[2]) and len(d[2]) == len(want["images"])
  eff = np.mean([(b["segment_ids"] > 0).mean() for b in out[:-1]])
  assert eff > 0.8, eff  # documents up to 55 of 64 positions long


def test_make_document_masks():
  doc = packing.make_document([("text", [7, 8]), ("image", np.zeros((2, 4, 4)), False)], P)
  np.testing.assert_array_equal(doc["tokens"], [BOS_ID, 7, 8, BOI_ID] + [PAD_ID] * P +
                                [EOI_ID, EOS_ID])
  # BOS->7, 7->8, 8->BOI scored; BOI and patches (incl. last patch -> EOI) not; EOI->EOS yes.
  np.testing.assert_array_equal(doc["scored"], [1, 1, 1, 0] + [0] * P + [1, 0])


# ------------------------------------------------------------------ pipeline --
def test_batch_structure_and_ratios(built):
  c = tiny_config()
  it = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  want = empty_batch(4, 96, 4, (4, 4, 4))
  first_before, n_img, img_tokens, text_tokens = 0, 0, 0, 0
  for _ in range(60):
    b = next(it)
    assert set(b) == set(want)
    for k in want:
      assert b[k].shape == want[k].shape and b[k].dtype == want[k].dtype, k
    unpack(b)  # the invariants hold on real batches too
    v = b["image_valid"]
    n_img += int(v.sum())
    first_before += int(b["image_before_caption"][v].sum())
    for r in range(4):
      seg = b["segment_ids"][r]
      has_img = {s for s in seg[b["image_ids"][r] > 0]}
      for s in set(seg[seg > 0]):
        if s in has_img:
          img_tokens += int((seg == s).sum())
        else:
          text_tokens += int((seg == s).sum())
  assert n_img > 150
  assert abs(first_before / n_img - 0.2) < 0.08, first_before / n_img  # caption first 0.8
  assert 0.6 < text_tokens / img_tokens < 1.6, text_tokens / img_tokens  # ratio 1.0
  assert it.skip_counts() == {}


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_determinism_and_resume(built):
  c = tiny_config()
  a = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  first = take(a, 3)
  state = json.loads(json.dumps(a.get_state()))  # what Orbax's grain handler stores
  rest = take(a, 3)
  b = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  assert_same(first, take(b, 3))
  resumed = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same(rest, take(resumed, 3))
  other = pipeline.make_train_iterator(tiny_config(shuffle_seed=1), built, process_index=0,
                                       process_count=1)
  assert not np.array_equal(next(other)["tokens"], first[0]["tokens"])


def test_orbax_checkpoint_of_iterator(built, tmp_path):
  import orbax.checkpoint as ocp
  c = tiny_config()
  it = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  take(it, 2)
  mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                              item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  expected = take(it, 2)
  fresh = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same(expected, take(fresh, 2))
  mgr.close()


def test_worker_processes_deterministic_and_resumable(built):
  c = tiny_config(num_workers=2)
  a = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  take(a, 2)
  state = json.loads(json.dumps(a.get_state()))
  rest = take(a, 3)
  a.close()
  b = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  b.set_state(state)
  assert_same(rest, take(b, 3))
  b.close()


def image_keys(batches):
  return {latent.tobytes() for b in batches
          for latent in b["image_latents"][b["image_valid"]]}


def test_process_sharding_disjoint(built):
  c = tiny_config(batch_size=8)
  p0 = pipeline.make_train_iterator(c, built, process_index=0, process_count=2)
  p1 = pipeline.make_train_iterator(c, built, process_index=1, process_count=2)
  b0, b1 = take(p0, 6), take(p1, 6)
  assert b0[0]["tokens"].shape == (4, 96)
  k0, k1 = image_keys(b0), image_keys(b1)
  assert len(k0) > 20 and len(k1) > 20 and not (k0 & k1)


def test_eval_iterator_finite_and_deterministic(built):
  c = tiny_config()
  a = list(pipeline.make_eval_iterator(c, built, process_index=0, process_count=1))
  b = list(pipeline.make_eval_iterator(c, built, process_index=0, process_count=1))
  assert_same(a, b)
  assert len(a) == len(b) and len(a) > 1
  meta = latents.read_metadata(os.path.join(built, "latents"))
  assert sum(int(x["image_valid"].sum()) for x in a) == meta["splits"]["validation"]["num_records"]
  fixed = list(pipeline.make_eval_iterator(c, built, process_index=0, process_count=1,
                                           num_batches=len(a) + 2))
  assert len(fixed) == len(a) + 2  # starts the split over: same count on every process
  assert_same(a + a[:2], fixed)


# --------------------------------------------------------------- bad records --
def _png(rng):
  import io
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def test_bad_records_skipped_counted_reported(built, tmp_path):
  rng = np.random.default_rng(0)
  cache = str(tmp_path / "latents")
  recs = [{"image": _png(rng), "caption": "a red circle", "id": f"ok{i}"} for i in range(6)]
  recs += [{"image": b"\x89PNG garbage", "caption": "a red circle", "id": "corrupt-image"},
           {"image": _png(rng), "caption": "", "id": "empty-caption"},
           {"image": _png(rng), "caption": "a red circle " * 40, "id": "long-caption"}]
  entry = latents.build_latent_cache(latents.PixelPatchEncoder(8, 4), recs, cache, split="train")
  assert entry["skipped"] == ["corrupt-image"] and entry["num_records"] == 8
  w = array_record_module.ArrayRecordWriter(os.path.join(cache, "train.extra"), "group_size:1")
  w.write(latents.encode_record("wrong-shape", "a blue square", "", np.zeros((8, 8, 4))))
  w.write(b"\x00not msgpack")
  w.close()
  meta = latents.read_metadata(cache)
  meta["splits"]["train"]["shards"].append("train.extra")
  with open(os.path.join(cache, "metadata.json"), "w") as f:
    json.dump(meta, f)
  c = tiny_config(latents=cache, text_source="none", batch_size=2)
  it = pipeline.make_eval_iterator(c, built, "train", process_index=0, process_count=1)
  batches = list(it)
  assert sum(int(b["image_valid"].sum()) for b in batches) == 6
  assert it.skip_counts() == {"undecodable_image": 1, "empty_caption": 1, "caption_too_long": 1,
                              "bad_latent_shape": 1, "undecodable_record": 1}
  assert {"corrupt-image", "empty-caption", "long-caption", "wrong-shape"} <= set(
      it.skipped_ids())


def test_config_errors_name_the_key(built, tmp_path):
  with pytest.raises(ConfigError, match="model.latent_size"):
    c = tiny_config()
    c.model.latent_size = 8
    pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="data.latents"):
    pipeline.make_train_iterator(tiny_config(latents=str(tmp_path / "none")), built,
                                 process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="data.text_source"):
    pipeline.make_train_iterator(tiny_config(text_source="tfds:c4/en"), built,
                                 process_index=0, process_count=1)
  with pytest.raises(ConfigError, match="data.seq_len"):
    pipeline.make_train_iterator(tiny_config(seq_len=6), built, process_index=0,
                                 process_count=1)


def test_folder_source(tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  rng = np.random.default_rng(1)
  rows = []
  for i in range(5):
    (folder / f"{i}.png").write_bytes(_png(rng))
    rows.append({"file": f"{i}.png", "caption": f"picture {i}", "split": "train"})
  (folder / "bad.png").write_bytes(b"broken")
  rows.append({"file": "bad.png", "caption": "broken", "split": "train"})
  rows.append({"file": "0.png", "caption": "held out", "split": "validation"})
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  c = tiny_config(image_text_source=f"folder:{folder}", text_source="none")
  root = str(tmp_path / "data")
  build.build_image_text(c, root)
  rep = build.build_latents(c, root, latents.PixelPatchEncoder(8, 4))
  assert rep["train"]["num_records"] == 5 and rep["train"]["skipped"] == ["bad.png"]
  assert rep["validation"]["num_records"] == 1


def test_cli_build_latents_show(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  over = ["--config=" + os.path.join(root, "configs", "tiny.py"), f"--data_dir={tmp_path}",
          "--config.data.num_train_scenes=60", "--config.data.num_eval_scenes=10",
          "--config.data.num_text_docs=100", "--config.data.vocab_size=320"]
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for cmd in (["build"], ["latents", "--pixel_patch"], ["show", "--num_batches=1"]):
    out = subprocess.run([sys.executable, "-m", "tfjax.cli.data", *cmd, *over], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
  assert "skip counts: {}" in out.stdout and "doc 1" in out.stdout


def test_tfds_sources_by_name(built, tmp_path):
  from tfjax.data import tfds_shapes
  name = "tfds:tfjax_shapes/" + tfds_shapes.builder(tiny_config(), built).builder_config.name
  c = tiny_config(image_text_source=name, text_source=name, text_field="caption",
                  tfds_dir=os.path.join(built, "tfds"), latents=str(tmp_path / "lat"))
  rep = build.build_latents(c, built, latents.PixelPatchEncoder(8, 4), splits=("train",))
  assert rep["train"]["num_records"] == 300
  b = next(pipeline.make_train_iterator(c, built, process_index=0, process_count=1))
  assert b["image_valid"].any() and (b["segment_ids"] > 0).mean() > 0.5


def test_latent_cache_of_other_scenes_is_refused(built):
  from tfjax.data import sources
  meta = latents.read_metadata(sources.latent_dir(tiny_config(), built))
  assert meta["source"].startswith("shapes/px32_train300")
  # Same directory, other scenes: the cache would silently pair the wrong latents.
  c = tiny_config(max_objects=1)
  with pytest.raises(ValueError, match="data.latents"):
    build.build_latents(c, built, latents.PixelPatchEncoder(8, 4))
