"""Image preparation for stream sources: decode, RGB, resize + crop, filter.

`prepare_image(data, policy)` turns encoded image bytes into uint8
[size, size, 3] or raises `SkipRecord(reason)`; the latent job counts each
skip by reason with the record's key. Reasons:

  undecodable_image   PIL cannot open or decode the bytes (corrupt, truncated)
  image_too_small     shorter side below `data.min_image_size`
  bad_aspect_ratio    long side / short side above `data.max_aspect_ratio`
"""
from __future__ import annotations

import dataclasses
import io

import ml_collections
import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("center_crop", "squash")


class SkipRecord(Exception):
  """A record to skip, counted under `reason` (a short snake_case name)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
  """How source images become model-sized squares (config keys in data.*)."""
  size: int
  resize: str = "center_crop"
  min_size: int = 0
  max_aspect: float = 3.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ImagePolicy":
    d = config.data
    if d.resize_policy not in RESIZE_POLICIES:
      raise ValueError(f"config key data.resize_policy: unknown {d.resize_policy!r} "
                       f"({' | '.join(RESIZE_POLICIES)})")
    if d.max_aspect_ratio < 1.0:
      raise ValueError(f"config key data.max_aspect_ratio={d.max_aspect_ratio}: must be >= 1")
    return cls(size=int(d.image_size), resize=d.resize_policy,
               min_size=int(d.min_image_size or d.image_size // 2),
               max_aspect=float(d.max_aspect_ratio))


def to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB: CMYK, palette, grey, 16-bit grey (scaled, not
  clipped), alpha (composited on white, as a viewer shows it)."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(im, np.float64)
    peak = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
    im = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  elif im.mode == "F":
    im = Image.fromarray(np.clip(np.asarray(im) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if im.mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, rgba)
  return im.convert("RGB") if im.mode != "RGB" else im


def resize_square(im: Image.Image, size: int, policy: str) -> Image.Image:
  """RGB image -> size x size: shorter side to `size` then centre crop, or squash."""
  w, h = im.size
  if policy == "squash":
    return im.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
  left, top = (nw - size) // 2, (nh - size) // 2
  return im.crop((left, top, left + size, top + size))


def prepare_image(data: bytes, policy: ImagePolicy) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3]; raises SkipRecord."""
  try:
    im = Image.open(io.BytesIO(data))
    w, h = im.size
  except Exception as e:  # PIL raises many types for bad bytes
    raise SkipRecord("undecodable_image", f"{type(e).__name__}: {e}") from e
  if min(w, h) < max(1, policy.min_size):
    raise SkipRecord("image_too_small", f"{w}x{h} < data.min_image_size={policy.min_size}")
  if max(w, h) / min(w, h) > policy.max_aspect:
    raise SkipRecord("bad_aspect_ratio", f"{w}x{h} > data.max_aspect_ratio={policy.max_aspect}")
  try:
    if im.format == "JPEG" and policy.resize == "center_crop":
      im.draft("RGB", (policy.size, policy.size))  # DCT-domain downscale: both sides stay >= size
    im.load()
    im = to_rgb(ImageOps.exif_transpose(im))
    out = np.asarray(resize_square(im, policy.size, policy.resize), np.uint8)
  except Exception as e:  # truncated data surfaces at load()
    raise SkipRecord("undecodable_image", f"{type(e).__name__}: {e}") from e
  return out
