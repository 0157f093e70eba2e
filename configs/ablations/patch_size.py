"""Ablation: latent patch size 1, 2, 4, 8 (the paper's Table 5 / Figure 6 axis).

  tfjax-sweep --config=configs/ablations/patch_size.py --workdir=DIR

8x8 latents give 64, 16, 4 and 1 patches per image: fewer positions per image
(cheaper) against coarser image vectors.
"""
import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "ablation_patch_size"
  s.families = {f"patch{k}": {"config": "configs/tiny_comparisons.py",
                              "overrides": (f"model.patch_size={k}",)} for k in (1, 2, 4, 8)}
  s.sizes = {"xs": ()}
  s.budgets = (204_800, 614_400)
  s.common = ("train.learning_rate=0.002", "diffusion.sample_steps=25")
  s.eval = {"num_samples": 48, "seed": 0, "batch_size": 16}
  s.parity = ("patch2", "patch4")
  s.metrics = {"shapes_accuracy": "higher", "caption_cider": "higher", "perplexity": "lower"}
  return s
