"""Tiny Transfusion vs Chameleon sweep on shapes (CPU-sized): 2 budgets per family.

  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep_tiny

Both families use configs/tiny_comparisons.py's transformer shape (size overrides below),
the same data and tokenizer; Chameleon sees 64 VQ tokens per image where
Transfusion sees 16 latent patches. Compute = 6ND with the same N and D
accounting for both.
"""
import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "sweep_tiny"
  s.families = {
      "transfusion": {"config": "configs/tiny_comparisons.py", "overrides": ()},
      "chameleon": {"config": "configs/chameleon_tiny.py", "overrides": ()},
  }
  s.sizes = {"xs": ("model.dim=128", "model.num_layers=4", "model.num_heads=4",
                    "model.num_kv_heads=4")}
  s.budgets = (300_000, 900_000)           # training tokens (x 2048 tokens per step)
  s.common = (
      "data.num_train_scenes=4000", "data.num_eval_scenes=200", "data.num_text_docs=8000",
      "vae.train_steps=600", "vae.batch_size=16",
      "train.learning_rate=0.002", "train.end_learning_rate=0.0002", "train.log_every=25",
      "diffusion.sample_steps=25",
  )
  s.eval = {"num_samples": 48, "seed": 0, "batch_size": 16}
  s.parity = ("chameleon", "transfusion")  # FLOPs Transfusion needs to match Chameleon
  s.metrics = {"shapes_accuracy": "higher", "caption_cider": "higher",
               "caption_scene_accuracy": "higher", "perplexity": "lower"}
  return s
