"""Small shard sets in the field's formats, drawn from the shapes scenes.

  python -m tfjax.data.example_shards --out=DIR [--shards=4 --per_shard=24 --size=48]

writes DIR/wds/{00000..}.tar (img2dataset layout), DIR/parquet/*.parquet
(an HF-datasets-style image struct column), DIR/text/*.txt and
DIR/jsonl/*.jsonl, with bad records planted among the good ones (`--bad`,
on by default): a corrupt JPEG, an image-only record, empty, missing and
non-UTF-8 captions, a 1x1 image, a 5:1 image, a caption without an image and
a truncated last tar; and hard-but-good ones: CMYK JPEG, 16-bit grey PNG,
palette PNG with transparency, a caption only in KEY.json. `expected.json`
lists every good key and every bad key with the reason the readers give.
For tests and for running docs/real_data.md's commands on a CPU.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any

from absl import app, flags
import numpy as np
from PIL import Image

from tfjax.data import shapes


def _encode(img: np.ndarray | Image.Image, fmt: str, **kw: Any) -> bytes:
  im = img if isinstance(img, Image.Image) else Image.fromarray(img)
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _scenes(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
  images, _, captions = shapes.generate_split(
      "train", n, size, seed, shapes.SceneOptions(max_objects=1, sizes=("large",)))
  return images, captions


def _widen(img: np.ndarray, ratio: float) -> np.ndarray:
  """Pads an image left and right with its corner colour to width = ratio * height."""
  h, w, _ = img.shape
  pad = int(round(h * ratio)) - w
  out = np.empty((h, w + pad, 3), np.uint8)
  out[:] = img[0, 0]
  out[:, pad // 2:pad // 2 + w] = img
  return out


def _hard_images(img: np.ndarray) -> dict[str, tuple[str, bytes]]:
  """Good images in awkward encodings: {name: (extension, bytes)}."""
  grey16 = (img.mean(-1).astype(np.uint16) * 257).astype(np.uint16)
  palette = Image.fromarray(img).convert("P", palette=Image.ADAPTIVE, colors=16)
  palette.info["transparency"] = 0
  return {"cmyk": ("jpg", _encode(Image.fromarray(img).convert("CMYK"), "JPEG", quality=95)),
          "grey16": ("png", _encode(Image.fromarray(grey16), "PNG")),
          "palette": ("png", _encode(palette, "PNG")),
          "webp": ("webp", _encode(img, "WEBP", lossless=True))}


def write_webdataset(out_dir: str, num_shards: int = 4, per_shard: int = 24, size: int = 48,
                     seed: int = 0, bad: bool = True) -> dict[str, Any]:
  """img2dataset-style tars; returns {"paths", "good": [keys], "bad": {key: reason}}."""
  os.makedirs(out_dir, exist_ok=True)
  images, captions = _scenes(num_shards * per_shard, size, seed)
  good: list[str] = []
  bad_keys: dict[str, str] = {}
  paths = []
  for s in range(num_shards):
    name = f"{s:05d}.tar"
    path = os.path.join(out_dir, name)
    paths.append(path)
    last_offset = 0
    with tarfile.open(path, "w") as tar:
      def add(member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      for j in range(per_shard):
        n = s * per_shard + j
        key = f"{n:09d}"
        img, cap = images[n], captions[n]
        if n % 3 == 1:
          img = _widen(img, 1.5)
        last_offset = tar.offset
        members = {"jpg": _encode(img, "JPEG", quality=90), "txt": cap.encode(),
                   "json": json.dumps({"key": key, "caption": cap, "status": "success"}).encode()}
        reason = None
        if bad and s == 0:
          hard = _hard_images(images[n])
          plant = {0: "corrupt", 1: "image_only", 2: "empty", 3: "non_utf8", 4: "tiny",
                   5: "wide", 6: "caption_only", 7: "cmyk", 8: "grey16", 9: "palette",
                   10: "json_only", 11: "webp", 12: "json_missing_field"}.get(j)
          if plant == "corrupt":
            members["jpg"], reason = members["jpg"][:len(members["jpg"]) // 3], "undecodable_image"
          elif plant == "image_only":
            members, reason = {"jpg": members["jpg"]}, "missing_caption"
          elif plant == "empty":
            members["txt"], reason = b"  \n", "empty_caption"
          elif plant == "non_utf8":
            members["txt"], reason = b"a red \xff\xfe circle", "non_utf8_caption"
          elif plant == "tiny":
            members["jpg"], reason = _encode(img[:1, :1], "PNG"), "image_too_small"
          elif plant == "wide":
            members["jpg"], reason = _encode(_widen(img, 5.0), "JPEG"), "bad_aspect_ratio"
          elif plant == "caption_only":
            members, reason = {"txt": members["txt"]}, "missing_image"
          elif plant in ("cmyk", "grey16", "palette", "webp"):
            ext, data = hard[plant]
            del members["jpg"]
            members[ext] = data
          elif plant == "json_only":
            del members["txt"]
          elif plant == "json_missing_field":
            del members["txt"]
            members["json"], reason = b'{"status": "success"}', "missing_caption"
        for ext, data in members.items():
          add(f"{key}.{ext}", data)
        if reason:
          bad_keys[f"{name}/{key}"] = reason
        else:
          good.append(f"{name}/{key}")
    if bad and s == num_shards - 1:  # cut the last record mid-image: a truncated download
      with open(path, "r+b") as f:
        f.truncate(last_offset + 512 + 100)
      cut = good.pop()
      bad_keys[cut] = "truncated_shard"
  return {"paths": paths, "good": good, "bad": bad_keys}


def write_parquet(out_dir: str, num_files: int = 2, per_file: int = 20, size: int = 48,
                  seed: int = 1, bad: bool = True) -> dict[str, Any]:
  """HF-datasets-style Parquet: image {bytes, path} structs (file 0) or plain
  bytes (the others), a caption column; same return as write_webdataset."""
  # Local: importing pyarrow takes ~0.5 s, paid only by Parquet sources.
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  images, captions = _scenes(num_files * per_file, size, seed)
  good: list[str] = []
  bad_keys: dict[str, str] = {}
  paths = []
  for f in range(num_files):
    name = f"part-{f:05d}.parquet"
    rows_img, rows_cap = [], []
    for j in range(per_file):
      n = f * per_file + j
      data, cap, reason = _encode(images[n], "PNG"), captions[n], None
      if bad and f == 0 and j < 4:
        data, cap, reason = [(data[:40], cap, "undecodable_image"), (None, cap, "missing_image"),
                             (data, "", "empty_caption"), (data, None, "missing_caption")][j]
      rows_img.append({"bytes": data, "path": f"{n}.png"} if f == 0 else data)
      rows_cap.append(cap)
      (bad_keys.__setitem__(f"{name}:{j}", reason) if reason else good.append(f"{name}:{j}"))
    path = os.path.join(out_dir, name)
    pq.write_table(pa.table({"image": rows_img, "caption": rows_cap}), path, row_group_size=8)
    paths.append(path)
  return {"paths": paths, "good": good, "bad": bad_keys}


def write_text(out_dir: str, num_files: int = 2, per_file: int = 60, seed: int = 2,
               bad: bool = True) -> dict[str, Any]:
  """DIR/text/*.txt (a document a line) and DIR/jsonl/*.jsonl ({"text": ...})."""
  docs = shapes.text_corpus("train", num_files * per_file, seed)
  out: dict[str, Any] = {"text": [], "jsonl": [], "bad": {}}
  for kind in ("text", "jsonl"):
    os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
    for f in range(num_files):
      name = f"part-{f:05d}.{'txt' if kind == 'text' else 'jsonl'}"
      lines = []
      for j in range(per_file):
        doc = docs[f * per_file + j]
        lines.append(doc.encode() if kind == "text" else json.dumps({"text": doc}).encode())
      if bad and f == 0:
        if kind == "text":
          lines[3] = b"caf\xe9 in latin-1"
          out["bad"][f"{name}:4"] = "non_utf8_text"
          lines.insert(6, b"")  # a blank line separates; it is not a record
        else:
          lines[3], lines[4], lines[5] = b"{not json", b'{"title": "x"}', b'{"text": " "}'
          out["bad"].update({f"{name}:4": "undecodable_json", f"{name}:5": "missing_text",
                             f"{name}:6": "empty_text"})
      path = os.path.join(out_dir, kind, name)
      with open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
      out[kind].append(path)
  return out


def write_all(out_dir: str, shards: int = 4, per_shard: int = 24, size: int = 48,
              bad: bool = True) -> dict[str, Any]:
  """Every set above under out_dir, and out_dir/expected.json."""
  expected = {"webdataset": write_webdataset(os.path.join(out_dir, "wds"), shards, per_shard,
                                             size, bad=bad),
              "parquet": write_parquet(os.path.join(out_dir, "parquet"), size=size, bad=bad),
              "text": write_text(out_dir, bad=bad)}
  with open(os.path.join(out_dir, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
  return expected


def main() -> None:
  out = flags.DEFINE_string("out", None, "Output directory.", required=True)
  num = flags.DEFINE_integer("shards", 4, "WebDataset tar shards.")
  per = flags.DEFINE_integer("per_shard", 24, "Records per tar shard.")
  size = flags.DEFINE_integer("size", 48, "Side of the drawn images (some are widened 1.5x).")
  bad = flags.DEFINE_bool("bad", True, "Plant bad records.")

  def run(argv):
    del argv
    exp = write_all(out.value, num.value, per.value, size.value, bad.value)
    print(json.dumps({"out": out.value, "good_image_records": {
        k: len(exp[k]["good"]) for k in ("webdataset", "parquet")},
        "bad_records": {k: len(v["bad"]) for k, v in exp.items()}}))
  app.run(run)


if __name__ == "__main__":
  main()
