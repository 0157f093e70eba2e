"""Transfusion 1.4B (Table 2 of the paper): 24 layers, dim 2048, 16 heads.

The paper's recipe: 256x256 images through a VAE with 8x downsampling and 8
latent channels (32x32x8 latents), 2x2 latent patches (256 per image), a
linear patch layer, Llama-2's 32K vocabulary, sequences of 4096, AdamW
(0.9, 0.95, 1e-8), lr 3e-4 with 4000 warm-up steps and cosine decay to 1.5e-5,
weight decay 0.1, clipping at 1.0, lambda = 5.

  tfjax-train --config=configs/transfusion_1_4b.py --workdir=DIR \
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
from tfjax.config import default_config


def get_config():
  c = default_config()
  c.name = "transfusion_1_4b"
  m = c.model
  m.num_layers = 24
  m.dim = 2048
  m.num_heads = 16
  m.num_kv_heads = 16
  m.vocab_size = 32000
  m.patch_size = 2
  m.latent_size = 32
  m.latent_channels = 8
  m.attention_impl = "auto"
  m.scan_layers = True
  m.remat_policy = "nothing_saveable"

  c.data.image_size = 256
  c.data.seq_len = 4096
  c.data.batch_size = 512
  c.data.max_images_per_seq = 16
  c.data.vocab_size = 32000
  c.vae.channels = (128, 256, 512, 512)

  t = c.train
  t.num_steps = 250000
  t.learning_rate = 3e-4
  t.end_learning_rate = 1.5e-5
  t.warmup_steps = 4000
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  return c
