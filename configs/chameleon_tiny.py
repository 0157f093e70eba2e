"""Tiny Chameleon baseline on the shapes dataset: configs/tiny_comparisons.py's transformer
trained on VQ-VAE image tokens under the LM loss.

Same data, tokenizer and transformer as configs/tiny_comparisons.py; images are 64x64 ->
an 8x8 grid of VQ codes = 64 tokens per image (Transfusion tiny: 16 patches),
the paper's 4:1 ratio of Chameleon image tokens to Transfusion patches.

  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep   (with Transfusion)
  python -m tfjax.cli.sweep ... (see configs/sweep_tiny.py)
"""
from configs import tiny_comparisons as tiny


def get_config():
  c = tiny.get_config()
  c.name = "chameleon_tiny"
  c.chameleon.enabled = True
  c.chameleon.text_vocab_size = 0       # image tokens start at data.vocab_size (512)
  c.vae.kind = "vq"
  c.vae.codebook_size = 512             # a small codebook: tiny data, tiny model
  c.vae.codebook_dim = 8
  c.model.vocab_size = c.data.vocab_size + c.vae.codebook_size
  c.model.patch_size = 1                # one VQ token per position
  c.model.qk_norm = True                # Chameleon's stability changes
  c.model.norm_placement = "chameleon"
  c.data.seq_len = 256                  # 64 image tokens + caption fit twice or more
  c.data.batch_size = 8                 # same 2048 tokens per step as tiny.py
  c.diffusion.loss_weight = 0.0         # no image slots: the objective is the LM loss
  c.diffusion.cfg_scale = 3.0           # CFG on logits
  return c
