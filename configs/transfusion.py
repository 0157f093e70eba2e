"""Transfusion at a Table 2 size of the paper: `--config=configs/transfusion.py:SIZE`.

SIZE is one of 160m, 370m, 760m, 1_4b, 7b. The recipe: 256x256 images through
a VAE with 8x downsampling and 8 latent channels (32x32x8 latents), 2x2 latent
patches (256 per image) through a linear layer, Llama 2's 32K vocabulary,
sequences of 4096, AdamW (0.9, 0.95, 1e-8), lr 3e-4 with 4000 warm-up steps
and cosine decay to 1.5e-5, weight decay 0.1, clipping at 1.0, lambda = 5; the
LM head runs in chunks of 1024 positions over the scored text only. Point it
at real data and a pretrained VAE:

  tfjax-train --config=configs/transfusion.py:760m --workdir=DIR \\
      --config.data.tokenizer=/path/to/llama2/tokenizer.model \\
      --config.vae.path=/path/to/vae --config.data.image_text_source=tfds:coco_captions
"""
import ml_collections

from tfjax.config import ConfigError, default_config

# Per size: the transformer, and the GPU settings measured fastest on one H100
# (remat_policy, device_microbatch; unnamed: nothing_saveable, 0).
SIZES = {
    "160m": dict(num_layers=16, dim=768, num_heads=12),
    # GPU default measured fastest (one H100: 33.4% MFU, 164,757 tokens/s, 27.3 GiB peak at 16 x 4096 rows;
    # benchmarks/RESULTS.md, Training).
    "370m": dict(num_layers=24, dim=1024, num_heads=16,
                 remat_policy="save_attention", device_microbatch=16),
    # GPU default measured fastest (one H100: 38.3% MFU, 88,045 tokens/s, 27.2 GiB peak at 8 x 4096 rows;
    # benchmarks/RESULTS.md, Training).
    "760m": dict(num_layers=24, dim=1536, num_heads=24,
                 remat_policy="save_attention", device_microbatch=8),
    # GPU default measured fastest (one H100: 45.1% MFU, 57,909 tokens/s, 57.7 GiB peak at 8 x 4096 rows;
    # benchmarks/RESULTS.md, Training).
    "1_4b": dict(num_layers=24, dim=2048, num_heads=16,
                 remat_policy="save_all_names", device_microbatch=8),
    "7b": dict(num_layers=32, dim=4096, num_heads=32),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's recipe at size `arg` (the text after ':' in --config)."""
  if arg not in SIZES:
    raise ConfigError(f"configs/transfusion.py needs a size: --config=configs/transfusion.py:SIZE "
                      f"with SIZE one of {', '.join(SIZES)} (got {arg!r})")
  size = dict(SIZES[arg])
  remat_policy = size.pop("remat_policy", "nothing_saveable")
  device_microbatch = size.pop("device_microbatch", 0)
  c = default_config()
  c.name = f"transfusion_{arg}"
  c.model.update(**size, num_kv_heads=size["num_heads"],
                 vocab_size=32000, patch_size=2, latent_size=32, latent_channels=8,
                 attention_impl="auto", scan_layers=True, remat_policy=remat_policy,
                 lm_head_chunk=1024)
  c.data.update(image_size=256, seq_len=4096, batch_size=512, max_images_per_seq=16,
                vocab_size=32000)
  c.vae.channels = (128, 256, 512, 512)
  c.train.update(num_steps=250000, learning_rate=3e-4, end_learning_rate=1.5e-5,
                 warmup_steps=4000, weight_decay=0.1, grad_clip=1.0,
                 device_microbatch=device_microbatch)
  return c
