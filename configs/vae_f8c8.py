"""The paper's VAE: 256x256x3 images -> 32x32x8 latents (8x downsampling).

Stable-Diffusion-sized AutoencoderKL with 8 latent channels, trained with
L1 + perceptual + 0.5 patch-GAN (after vae.gan_start_step) + 1e-6 KL. The
perceptual term needs a VGG weights file (no download at run time):

  tfjax-vae train --config=configs/vae_f8c8.py --workdir=DIR \\
      --config.vae.perceptual_weights=/path/vgg16_lpips.safetensors \\
      --config.data.image_text_source=shapes
"""
from tfjax.config import default_config


def get_config():
  c = default_config()
  c.name = "vae_f8c8"
  c.data.image_size = 256
  c.model.latent_size = 32
  c.model.latent_channels = 8
  v = c.vae
  v.kind = "kl"
  v.latent_channels = 8
  v.channels = (128, 256, 512, 512)
  v.blocks_per_level = 2
  v.norm_groups = 32
  v.mid_attention = True
  v.dtype = "float32"
  v.train_steps = 200000
  v.batch_size = 32
  v.learning_rate = 1e-4
  v.warmup_steps = 1000
  v.adam_b1, v.adam_b2 = 0.5, 0.9
  v.num_train_images = 100000
  v.num_val_images = 1000
  v.l1_weight = 1.0
  v.l2_weight = 0.0
  v.kl_weight = 1e-6
  v.perceptual_weight = 1.0
  v.gan_weight = 0.5
  v.gan_start_step = 50000
  v.log_every = 500
  v.scale_images = 2048
  return c
