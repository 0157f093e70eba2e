"""The on-disk VAE directory and the loaded, jit-compiled autoencoder.

A tfjax VAE directory holds:
  tfjax_vae.json      kind, architecture, scale/shift, training metrics
  params.safetensors  Flax params, keys are '/'-joined tree paths
  recon_grid.png      validation inputs and reconstructions (informational)
It is written to a temporary sibling and renamed into place, so a directory
that exists under its final name is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from tfjax.files import write_atomic
from tfjax.vae import diffusers_import
from tfjax.vae.autoencoder import AutoencoderConfig, AutoencoderKL
from tfjax.vae.vq import VQVAE

META_FILE = "tfjax_vae.json"
PARAMS_FILE = "params.safetensors"
FORMAT = "tfjax-vae"


def build_module(meta: dict[str, Any]) -> nn.Module:
  """The Flax module a metadata dict (see `tfjax_vae.json`) describes."""
  arch = AutoencoderConfig.from_json(meta["architecture"])
  if meta["kind"] == "kl":
    return AutoencoderKL(arch)
  if meta["kind"] == "vq":
    return VQVAE(arch, int(meta["codebook_size"]), int(meta["codebook_dim"]),
                 float(meta.get("commitment_beta", 0.25)))
  raise ValueError(f"config key vae.kind: unknown {meta['kind']!r} (kl | vq)")


def flatten_params(params: Any) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(p.key for p in path)] = np.asarray(leaf)
  return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(v)
  return tree


def is_complete(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, META_FILE))
          and os.path.isfile(os.path.join(path, PARAMS_FILE)))


def save(path: str, meta: dict[str, Any], params: Any,
         extra_files: dict[str, bytes] | None = None) -> str:
  """Write a VAE directory atomically (temp dir + rename). Returns `path`.

  If another process finished the same directory first, its copy is kept.
  """
  path = os.path.abspath(path)
  if os.path.isdir(path) and not is_complete(path):
    # Not ours (we only ever rename finished directories into place): a
    # leftover that would block the rename and be mistaken for a VAE.
    raise FileExistsError(f"{path} exists but is not a complete VAE directory "
                          f"(no {META_FILE} or {PARAMS_FILE}); delete it and rerun")
  tmp = f"{path}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  flat = flatten_params(params)
  write_atomic(os.path.join(tmp, PARAMS_FILE), lambda p: safetensors.numpy.save_file(flat, p))
  for name, data in (extra_files or {}).items():
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(data)
  # The metadata goes last: is_complete() needs it and the params.
  with open(os.path.join(tmp, META_FILE), "w") as f:
    json.dump({"format": FORMAT, "version": 1, **meta}, f, indent=2)
  try:
    os.rename(tmp, path)
  except OSError:
    if not is_complete(path):
      raise
    shutil.rmtree(tmp)
  return path


class LoadedVAE:
  """A VAE ready to use: `encode`/`decode` are jit-compiled.

  Attributes:
    kind: 'kl' or 'vq'.
    scale, shift: latents for the transformer are `(z - shift) * scale`.
    downsample: image side / latent side.
    latent_channels: channels of `encode`'s output.
    config: the `AutoencoderConfig`.
    params: the Flax params.
  """

  def __init__(self, module: nn.Module, params: Any, scale: float, shift: float,
               kind: str = "kl", meta: dict[str, Any] | None = None):
    self.module, self.params, self.kind = module, params, kind
    self.scale, self.shift = float(scale), float(shift)
    self.config: AutoencoderConfig = module.config
    self.downsample = self.config.downsample
    self.meta = meta or {}
    if kind == "vq":
      self.latent_channels = module.codebook_dim
      self.codebook_size = module.codebook_size
      enc = lambda m, x: m.embed(m.encode_tokens(x))
      dec = lambda m, z: m.decode_latents(z)
      self._encode_tokens = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                                               method=VQVAE.encode_tokens))
      self._decode_tokens = jax.jit(lambda p, i: module.apply({"params": p}, i,
                                                               method=VQVAE.decode_tokens))
    else:
      self.latent_channels = self.config.latent_channels
      enc = lambda m, x: m.encode(x).mean
      dec = lambda m, z: m.decode(z)
    self._encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=enc))
    self._decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=dec))

  def __repr__(self) -> str:
    return (f"LoadedVAE(kind={self.kind}, channels={list(self.config.channels)}, "
            f"downsample={self.downsample}, latent_channels={self.latent_channels}, "
            f"scale={self.scale:.6g}, shift={self.shift:.6g})")

  def _check(self, images: Any) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"images must be [batch, H, W, {self.config.in_channels}], got {images.shape}")
    if images.shape[1] % self.downsample or images.shape[2] % self.downsample:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the VAE's "
                       f"downsampling factor {self.downsample}")
    return images

  def encode(self, images: Any) -> jax.Array:
    """float32 `[b, H, W, 3]` in [-1, 1] -> unscaled latents `[b, H/f, W/f, c]`."""
    return self._encode(self.params, self._check(images))

  def decode(self, latents: Any) -> jax.Array:
    """unscaled latents `[b, h, w, c]` -> images `[b, h*f, w*f, 3]` (about [-1, 1])."""
    return self._decode(self.params, jnp.asarray(latents, jnp.float32))

  def encode_tokens(self, images: Any) -> jax.Array:
    """VQ only: images -> code ids int32 `[b, H/f, W/f]`."""
    if self.kind != "vq":
      raise TypeError("encode_tokens needs a VQ-VAE (vae.kind='vq')")
    return self._encode_tokens(self.params, self._check(images))

  def decode_tokens(self, ids: Any) -> jax.Array:
    """VQ only: code ids `[b, h, w]` -> images `[b, h*f, w*f, 3]`."""
    if self.kind != "vq":
      raise TypeError("decode_tokens needs a VQ-VAE (vae.kind='vq')")
    return self._decode_tokens(self.params, jnp.asarray(ids, jnp.int32))


def load(path: str) -> LoadedVAE:
  """Load a tfjax VAE directory or a diffusers AutoencoderKL directory."""
  if is_complete(path):
    with open(os.path.join(path, META_FILE)) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{os.path.join(path, META_FILE)}: not a tfjax VAE (format "
                       f"{meta.get('format')!r})")
    module = build_module(meta)
    params = unflatten_params(safetensors.numpy.load_file(os.path.join(path, PARAMS_FILE)))
    return LoadedVAE(module, params, meta["scale"], meta["shift"], meta["kind"], meta)
  if diffusers_import.is_diffusers_dir(path):
    arch, params, scale, shift = diffusers_import.load_diffusers(path)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return LoadedVAE(AutoencoderKL(arch), params, scale, shift, "kl",
                     {"source": "diffusers"})
  raise FileNotFoundError(
      f"{path}: not a VAE directory (expected {META_FILE} + {PARAMS_FILE}, or diffusers' "
      f"{diffusers_import.CONFIG_FILE} + {diffusers_import.WEIGHTS_FILE}); set config key "
      f"vae.path")
