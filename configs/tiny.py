"""Tiny Transfusion on the built-in shapes dataset: the embedded main job.

Trains end to end (dataset, tokenizer, VAE, latents, transformer, samples,
report) on a 2-core CPU in about 26 minutes (benchmarks/RESULTS.md, "Main job"):

  tfjax-train --config=configs/tiny.py --workdir=/tmp/tfjax_tiny

What makes a 20-minute CPU model draw the asked-for colour and shape (each
measured with the shapes checker on 32 held-out captions, 3000 steps, one
H100 run per variant unless noted, all on one-object scenes after the first
point; noisy: two runs of one recipe differed by up to 20 points):
  - U-Net patch layers (the paper's finding for small models): linear
    patches 0-3% correct, U-Net 16% on one-object scenes of any size.
  - One object per scene, large only (data.max_objects, data.object_sizes):
    any size 16%, medium+large 47%, large 66%; two or three objects
    medium+large 16% / 6%. The full 1-3 object dataset needs a larger model
    and more steps (configs/transfusion_*.py, or this file on a GPU with
    data.max_objects=3 and more train.num_steps).
  - Image-caption pairs 4x the text-only tokens (data.text_image_ratio).
  - Learning rate 2e-3 (any size: 31% vs 16% at 1e-3; medium+large 50% vs
    47%); EMA 0.999 hurt this short run (34% vs 66%).
  - The paper's sampler: DDPM, 250 steps, CFG 5 (DDIM 50 / CFG 3 on the same
    checkpoint: 12% vs 19%).
  - Not cheaper: halving both step counts (VAE 1500 steps, 29.6 dB instead of
    32.45; transformer 1500) fits 15 minutes but drew 34% (shapes wrong,
    colours 88%); with 2000 transformer steps, 59% (2-core CPU, 2026-12-06;
    benchmarks/RESULTS.md "Main job on the 2-core CPU").
"""
from configs.common import tiny_vae
from tfjax.config import default_config


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
  m.scan_unroll = 4           # the scan unrolled, params stacked as scanned: ~10% fewer CPU s/step
  m.remat_policy = "none"
  m.patch_type = "unet"       # conv down/up blocks around the transformer (see above)
  m.unet_channels = (64, 128)
  m.patch_size = 2            # 8x8x8 latents -> 16 patches per image
  m.latent_size = 8
  m.time_embed_dim = 128

  c.data.image_size = 64
  c.data.vocab_size = 512
  c.data.num_train_scenes = 4000
  c.data.num_eval_scenes = 200
  c.data.max_objects = 1      # one large object per scene: learnable in the main job's 3000 CPU steps
  c.data.object_sizes = "large"
  c.data.text_image_ratio = 0.25
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.max_images_per_seq = 4

  tiny_vae(c)                 # 64x64x3 -> 8x8x8, 29.2 dB (see tfjax.config.tiny_vae)

  t = c.train
  t.num_steps = 3000
  t.learning_rate = 2e-3
  t.end_learning_rate = 1e-4
  t.warmup_steps = 200
  t.weight_decay = 0.0
  t.log_every = 50
  t.eval_every = 500
  t.sample_every = 0
  t.checkpoint_every = 500

  c.diffusion.sample_steps = 250  # the paper's sampler (also the default config's)
  c.diffusion.sampler = "ddpm"
  c.diffusion.cfg_scale = 5.0
  return c
