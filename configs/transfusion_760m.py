"""Transfusion 0.76B (Table 2 of the paper): 24 layers, dim 1536, 24 heads.

The recipe itself (VAE latents, patches, vocabulary, optimiser) is
`tfjax.config.paper_config`. Point it at real data and a pretrained VAE:

  tfjax-train --config=configs/transfusion_760m.py --workdir=DIR \
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
from tfjax.config import paper_config


def get_config():
  # GPU default measured fastest (one H100: 38.3% MFU, 88,045 tokens/s, 27.2 GiB peak at 8 x 4096 rows;
  # benchmarks/RESULTS.md, Training).
  return paper_config("transfusion_760m", num_layers=24, dim=1536, num_heads=24,
                      remat_policy="save_attention", device_microbatch=8)
