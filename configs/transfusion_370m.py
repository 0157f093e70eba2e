"""Transfusion 0.37B (Table 2 of the paper): 24 layers, dim 1024, 16 heads.

The recipe itself (VAE latents, patches, vocabulary, optimiser) is
`tfjax.config.paper_config`. Point it at real data and a pretrained VAE:

  tfjax-train --config=configs/transfusion_370m.py --workdir=DIR \
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
from tfjax.config import paper_config


def get_config():
  # GPU default measured fastest (one H100: 33.4% MFU, 164,757 tokens/s, 27.3 GiB peak at 16 x 4096 rows;
  # benchmarks/RESULTS.md, Training).
  return paper_config("transfusion_370m", num_layers=24, dim=1024, num_heads=16,
                      remat_policy="save_attention", device_microbatch=16)
