"""Stream sources (WebDataset, Parquet, text, JSONL) and image preparation:
every planted bad record is a counted skip naming its key, or a clear error."""
import io
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from tfjax.config import default_config
from tfjax.data import example_shards, latent_job, prepare, shard_writer, sources, streams

POLICY = prepare.ImagePolicy(size=32, min_size=16, max_aspect=3.0)


def read_all(paths, reader):
  """(good keys in order, {bad key: reason}) after reading and preparing."""
  good, bad = [], {}
  for path in paths:
    for item in reader(path):
      if isinstance(item, streams.Skip):
        bad[item.key] = item.reason
        continue
      try:
        img = prepare.prepare_image(item.value["image"], POLICY)
      except prepare.SkipRecord as e:
        bad[item.key] = e.reason
        continue
      assert img.shape == (32, 32, 3) and img.dtype == np.uint8
      assert isinstance(item.value["caption"], str) and item.value["caption"]
      good.append(item.key)
  return good, bad


def test_webdataset_counts_every_bad_record(tmp_path):
  exp = example_shards.write_webdataset(str(tmp_path), num_shards=3, per_shard=14, size=40)
  good, bad = read_all(exp["paths"], streams.iter_webdataset)
  assert good == exp["good"] and bad == exp["bad"]
  assert set(bad.values()) == {"undecodable_image", "missing_caption", "empty_caption",
                               "non_utf8_caption", "image_too_small", "bad_aspect_ratio",
                               "missing_image", "truncated_shard"}
  # CMYK, 16-bit grey, palette+alpha, WebP and a caption only in KEY.json are good.
  assert {f"00000.tar/{i:09d}" for i in (7, 8, 9, 10, 11)} <= set(good)


def test_unreadable_tar_is_a_counted_skip(tmp_path):
  path = tmp_path / "broken.tar"
  path.write_bytes(b"this is not a tar file" * 40)
  assert list(streams.iter_webdataset(str(path))) == [streams.Skip("truncated_shard",
                                                                   "broken.tar")]


def test_parquet_images_and_missing_column(tmp_path):
  exp = example_shards.write_parquet(str(tmp_path), num_files=2, per_file=10, size=40)
  good, bad = read_all(exp["paths"], streams.iter_parquet_images)
  assert good == exp["good"] and bad == exp["bad"]
  assert set(bad.values()) == {"undecodable_image", "missing_image", "empty_caption",
                               "missing_caption"}
  with pytest.raises(ValueError, match=r"no column 'text'.*data.image_field / data.caption_field"):
    list(streams.iter_parquet_images(exp["paths"][0], "image", "text"))


def test_glob_matching_nothing_names_the_key(tmp_path):
  c = default_config()
  c.data.image_text_source = f"webdataset:{tmp_path}/*.tar"
  with pytest.raises(FileNotFoundError, match="data.image_text_source"):
    streams.image_text_reader(c)


def _png(im):
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def test_conversions_keep_colours():
  # 16-bit grey: full scale is white, not clipped from 65535 to 255 by truncation.
  grey = np.full((40, 40), 32768, np.uint16)
  out = prepare.prepare_image(_png(Image.fromarray(grey)), POLICY)
  assert abs(int(out[0, 0, 0]) - 128) <= 1 and (out[..., 0] == out[..., 2]).all()
  # Transparent pixels are composited on white; opaque red stays red.
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[:, :20] = (255, 0, 0, 255)
  out = prepare.prepare_image(_png(Image.fromarray(rgba, "RGBA")), POLICY)
  assert tuple(out[16, 2]) == (255, 0, 0) and tuple(out[16, 30]) == (255, 255, 255)
  buf = io.BytesIO()
  Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
  out = prepare.prepare_image(buf.getvalue(), POLICY)
  assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_resize_policies():
  wide = np.zeros((40, 80, 3), np.uint8)
  wide[:, :16] = 255                                  # a white band on the left fifth
  data = _png(Image.fromarray(wide))
  crop = prepare.prepare_image(data, POLICY)
  assert crop.shape == (32, 32, 3) and crop.max() == 0  # centre crop cuts the band off
  squash = prepare.prepare_image(data, prepare.ImagePolicy(32, "squash", 16, 3.0))
  assert squash[:, :4].min() > 200 and squash[:, 10:].max() < 30
  with pytest.raises(prepare.SkipRecord, match="image_too_small"):
    prepare.prepare_image(_png(Image.new("RGB", (1, 1))), POLICY)
  c = default_config()
  c.data.resize_policy = "stretch"
  with pytest.raises(ValueError, match="data.resize_policy"):
    prepare.ImagePolicy.from_config(c)


def test_parse_text_names():
  assert streams.parse_text("jsonl:/c4/*.jsonl:body", "text") == ("jsonl", "/c4/*.jsonl", "body")
  assert streams.parse_text("jsonl:/c4/*.jsonl", "text") == ("jsonl", "/c4/*.jsonl", "text")
  assert streams.parse_text("parquet:/w/*.parquet", "text") == ("parquet", "/w/*.parquet", "text")
  assert streams.parse_text("text:/a:b/*.txt", "t") == ("text", "/a:b/*.txt", "t")


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_text_sources_copy_to_array_record(tmp_path, kind):
  d = str(tmp_path / "src")
  exp = example_shards.write_text(d, num_files=2, per_file=30)
  if kind == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(d, "parquet"))
    docs = ["one document", None, "", "another one"] * 5
    pq.write_table(pa.table({"body": docs}), os.path.join(d, "parquet", "a.parquet"))
    name = f"parquet:{d}/parquet/*.parquet:body"
    want_bad = {f"a.parquet:{i}": "empty_text" for i in range(20) if i % 4 in (1, 2)}
    want_good = 10
  else:
    ext = "txt" if kind == "text" else "jsonl"
    name = f"{kind}:{d}/{kind}/*.{ext}"
    want_bad = {k: v for k, v in exp["bad"].items() if k.endswith(ext) or f".{ext}:" in k}
    want_good = 60 - len(want_bad)
  c = default_config()
  c.data.text_source, c.data.validation_percent = name, 25
  root = str(tmp_path / "data")
  report = latent_job.run_text_job(c, sources.text_cache_dir(c, root), progress=False)
  assert report["complete"] and sum(report["written"].values()) == want_good
  with open(os.path.join(sources.text_cache_dir(c, root), shard_writer.SKIPS_FILE)) as f:
    assert {r["key"]: r["reason"] for r in map(json.loads, f)} == want_bad
  train = sources.text_source(c, root, "train")
  val = sources.text_source(c, root, "validation")
  assert len(train) + len(val) == want_good and len(val) > 0
  assert all(train[i].decode("utf-8").strip() for i in range(len(train)))
  if kind == "parquet":
    c.data.text_source = f"parquet:{d}/parquet/*.parquet:missing"
    with pytest.raises(ValueError, match="no column 'missing'.*parquet:GLOB:COLUMN"):
      latent_job.run_text_job(c, str(tmp_path / "other"), progress=False)


def test_text_source_before_build_names_the_command(tmp_path):
  c = default_config()
  c.data.text_source = f"jsonl:{tmp_path}/*.jsonl"
  with pytest.raises(FileNotFoundError, match="tfjax-data build"):
    sources.text_source(c, str(tmp_path), "train")


def test_shard_sets_joined_by_one_glob_keep_keys_apart(tmp_path):
  for d in ("cc3m", "cc12m"):  # both have 00000.tar with the same record keys
    example_shards.write_webdataset(str(tmp_path / d), num_shards=1, per_shard=3, bad=False)
  c = default_config()
  c.data.image_text_source = f"webdataset:{tmp_path}/*/*.tar"
  paths, reader = streams.image_text_reader(c)
  keys = [r.key for p in paths for r in reader(p)]
  assert len(keys) == 6 == len(set(keys)) and keys[0] == "cc12m/00000.tar/000000000"


def test_array_record_source_reads_what_grains_reads(tmp_path):
  """The range read (sources.ArrayRecordSource) returns grain's records, across
  shards and for out-of-range keys fails as grain does."""
  from array_record.python import array_record_module
  paths = []
  for shard in range(3):
    paths.append(str(tmp_path / f"part-{shard}"))
    w = array_record_module.ArrayRecordWriter(paths[-1], "group_size:1")
    for i in range(7 + shard):
      w.write(f"shard {shard} record {i} ".encode() * (i + 1))
    w.close()
  ours, grains = sources.ArrayRecordSource(paths), grain.sources.ArrayRecordDataSource(paths)
  assert len(ours) == len(grains) == 24
  assert [ours[i] for i in range(24)] == [grains[i] for i in range(24)]
  assert ours[8] == b"shard 1 record 1 " * 2
  with pytest.raises(ValueError):
    ours[24]
