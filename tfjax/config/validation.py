"""`validate(config)`: runs at start-up of every command and names the key that
makes a config impossible (the shapes scene keys are checked by tfjax.data.shapes'
own rule, so the allowed values live in one place)."""
from __future__ import annotations

import ml_collections

from tfjax.config.overrides import ConfigError
from tfjax.config.sizes import patches_per_image
from tfjax.config.tokens import EOI_ID
from tfjax.data.shapes import read_scene_limits, scene_limits_error


def _require(cond: bool, key: str, why: str) -> None:
  if not cond:
    raise ConfigError(f"config key {key}: {why}")


def is_editing(c: ml_collections.ConfigDict) -> bool:
  """A config with an editing source: its images follow an input image and an instruction."""
  return "editing" in c and c.editing.source != "none"


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns `c` unchanged if it can work; else raises ConfigError naming the key."""
  m = c.model
  _require(m.dim % m.num_heads == 0, "model.num_heads",
           f"{m.num_heads} heads do not divide model.dim={m.dim}")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"{m.num_kv_heads} must divide model.num_heads={m.num_heads}")
  _require(m.patch_size in (1, 2, 4, 8, 16), "model.patch_size",
           f"{m.patch_size} is not one of 1, 2, 4, 8, 16")
  _require(m.latent_size % m.patch_size == 0, "model.patch_size",
           f"patch size {m.patch_size} does not divide the latent grid "
           f"model.latent_size={m.latent_size}")
  _require(m.patch_type in ("linear", "unet"), "model.patch_type", f"unknown {m.patch_type!r}")
  _require(m.get("scan_unroll", 1) >= 1, "model.scan_unroll",
           f"{m.get('scan_unroll', 1)} must be at least 1")
  _require(m.attention_impl in ("xla", "pallas", "auto"), "model.attention_impl",
           f"unknown {m.attention_impl!r}")
  _require(m.image_attention in ("bidirectional", "causal"), "model.image_attention",
           f"unknown {m.image_attention!r}")
  if m.patch_type == "unet":
    levels = len(m.unet_channels)
    _require(2 ** (levels - 1) == m.patch_size, "model.unet_channels",
             f"{levels} levels downsample by {2 ** (levels - 1)}, which must equal "
             f"model.patch_size={m.patch_size}")
  vae_downsample = 2 ** (len(c.vae.channels) - 1)
  if not c.vae.path:
    _require(c.data.image_size // vae_downsample == m.latent_size, "model.latent_size",
             f"{m.latent_size} != data.image_size / VAE downsampling = "
             f"{c.data.image_size} / {vae_downsample}")
    _require(c.vae.latent_channels == m.latent_channels, "model.latent_channels",
             f"{m.latent_channels} != vae.latent_channels={c.vae.latent_channels}")
  image_len = patches_per_image(m) + 2  # BOI + patches + EOI
  _require(image_len <= c.data.seq_len, "data.seq_len",
           f"an image takes {image_len} positions (BOI + {patches_per_image(m)} patches + EOI) "
           f"but sequences hold only {c.data.seq_len}")
  _require(c.data.image_size % 8 == 0, "data.image_size", "must be a multiple of 8")
  _require(c.data.batch_size % c.train.grad_accum_steps == 0, "train.grad_accum_steps",
           f"must divide data.batch_size={c.data.batch_size}")
  _require(c.diffusion.objective in ("ddpm", "flow"), "diffusion.objective",
           f"unknown {c.diffusion.objective!r}")
  _require(c.diffusion.sampler in ("ddpm", "ddim"), "diffusion.sampler",
           f"unknown {c.diffusion.sampler!r}")
  strength = c.diffusion.get("strength", 1.0)
  _require(0.0 < strength <= 1.0, "diffusion.strength", f"{strength} must be in (0, 1]")
  _require(strength == 1.0 or is_editing(c),
           "diffusion.strength", f"{strength} < 1 starts each image from an input image, which "
           "only editing configs (editing.source) have; give it per call instead "
           "(tfjax-generate --strength, tfjax-eval --override=diffusion.strength=S)")
  image_cfg = c.diffusion.get("image_cfg_scale", 0.0)
  _require(image_cfg >= 0.0, "diffusion.image_cfg_scale", f"{image_cfg} must be >= 0 (0 = off)")
  _require(image_cfg == 0.0 or c.diffusion.cfg_scale > 0, "diffusion.image_cfg_scale",
           f"{image_cfg} > 0 splits classifier-free guidance, which diffusion.cfg_scale="
           f"{c.diffusion.cfg_scale} turns off")
  if "editing" in c:
    drop = c.editing.get("instruction_dropout", 0.0)
    _require(0.0 <= drop < 1.0, "editing.instruction_dropout", f"{drop} must be in [0, 1)")
  _require(0.0 <= c.data.caption_first_prob <= 1.0, "data.caption_first_prob", "must be in [0, 1]")
  for section in ("data", "editing"):  # both build shapes scenes (SceneOptions)
    if section in c:
      problem = scene_limits_error(*read_scene_limits(c[section]), section)
      if problem:
        raise ConfigError(problem)
  _require(c.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
  _require(c.model.vocab_size > EOI_ID, "model.vocab_size", "too small for the special tokens")
  return c
