"""Transfusion 1.4B (Table 2 of the paper): 24 layers, dim 2048, 16 heads.

The recipe itself (VAE latents, patches, vocabulary, optimiser) is
`tfjax.config.paper_config`. Point it at real data and a pretrained VAE:

  tfjax-train --config=configs/transfusion_1_4b.py --workdir=DIR \
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
from tfjax.config import paper_config


def get_config():
  # GPU default measured fastest (one H100: 45.1% MFU, 57,909 tokens/s, 57.7 GiB peak at 8 x 4096 rows;
  # benchmarks/RESULTS.md, Training).
  return paper_config("transfusion_1_4b", num_layers=24, dim=2048, num_heads=16,
                      remat_policy="save_all_names", device_microbatch=8)
