"""Tiny Transfusion on the built-in shapes dataset: the embedded main job.

Trains end to end (dataset, tokenizer, VAE, latents, transformer, samples,
report) on a 2-core CPU in under 20 minutes:

  tfjax-train --config=configs/tiny.py --workdir=/tmp/tfjax_tiny
"""
from tfjax.config import default_config, tiny_vae


def get_config():
  c = default_config()
  c.name = "tiny"
  m = c.model
  m.vocab_size = 512          # = data.vocab_size: a tokenizer trained on the shapes corpus
  m.dim = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.dtype = "float32"         # CPU: bf16 buys nothing and costs accuracy
  m.attention_impl = "xla"
  m.scan_layers = True
  m.remat_policy = "none"
  m.patch_size = 2            # 8x8x8 latents -> 16 patches per image
  m.latent_size = 8
  m.time_embed_dim = 128

  c.data.image_size = 64
  c.data.vocab_size = 512
  c.data.num_train_scenes = 4000
  c.data.num_eval_scenes = 200
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.max_images_per_seq = 4

  tiny_vae(c)                 # 64x64x3 -> 8x8x8, 29.2 dB (see tfjax.config.tiny_vae)

  t = c.train
  t.num_steps = 3000
  t.learning_rate = 1e-3
  t.end_learning_rate = 1e-4
  t.warmup_steps = 200
  t.weight_decay = 0.0
  t.log_every = 50
  t.eval_every = 500
  t.sample_every = 0
  t.checkpoint_every = 500

  c.diffusion.sample_steps = 50
  c.diffusion.sampler = "ddim"
  c.diffusion.cfg_scale = 3.0
  return c
