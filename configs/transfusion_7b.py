"""Transfusion 7B (Table 2 of the paper): 32 layers, dim 4096, 32 heads.

The recipe itself (VAE latents, patches, vocabulary, optimiser) is
`tfjax.config.paper_config`. Point it at real data and a pretrained VAE:

  tfjax-train --config=configs/transfusion_7b.py --workdir=DIR \
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
from tfjax.config import paper_config


def get_config():
  return paper_config("transfusion_7b", num_layers=32, dim=4096, num_heads=32)
