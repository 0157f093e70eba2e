"""Tiny AutoencoderKL for the CPU smoke run: 64x64 shapes -> 8x8x8 latents.

The recipe and its measurements are in `configs.common.tiny_vae` (shared with
configs/tiny.py, whose main job trains this VAE first).

  tfjax-vae train --config=configs/vae_tiny.py --workdir=/tmp/vae_tiny
"""
from configs.common import tiny_vae
from tfjax.config import default_config


def get_config():
  c = tiny_vae(default_config())
  c.name = "vae_tiny"
  c.data.image_size = 64
  return c
