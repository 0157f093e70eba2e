"""Tiny AutoencoderKL for the CPU smoke run: 64x64 shapes -> 8x8x8 latents.

Sized to train to >= 28 dB validation PSNR in about 2-3 minutes on 2 CPU
cores; GAN and perceptual terms off (no weights file), with a small MSE term
added to L1 because a short run is judged by PSNR.
"""
from tfjax.config import default_config


def get_config():
  c = default_config()
  c.name = "vae_tiny"
  c.data.image_size = 64
  v = c.vae
  v.kind = "kl"
  v.latent_channels = 8
  v.channels = (8, 16, 32, 32)    # 3 downsamplings: 64 -> 8
  v.blocks_per_level = 1
  v.norm_groups = 4
  v.mid_attention = True
  v.train_steps = 1500
  v.batch_size = 8
  v.learning_rate = 2e-3
  v.warmup_steps = 50
  v.adam_b1, v.adam_b2 = 0.9, 0.99
  v.num_train_images = 2048
  v.num_val_images = 128
  v.l2_weight = 1.0
  v.sample_posterior = False
  v.gan_weight = 0.0
  v.perceptual_weights = ""
  v.log_every = 50
  v.scale_images = 256
  return c
