"""Transfusion 0.16B (Table 2 of the paper): 16 layers, dim 768, 12 heads.

The recipe itself (VAE latents, patches, vocabulary, optimiser) is
`tfjax.config.paper_config`. Point it at real data and a pretrained VAE:

  tfjax-train --config=configs/transfusion_160m.py --workdir=DIR \
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
from tfjax.config import paper_config


def get_config():
  return paper_config("transfusion_160m", num_layers=16, dim=768, num_heads=12)
