"""Ablations of the objective: noise limiting on/off, lambda, caption-first
ratio, and DDPM vs rectified flow (the paper's future-work extension).

  tfjax-sweep --config=configs/ablations/objective.py --workdir=DIR
"""
import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "ablation_objective"
  s.families = {
      "ddpm": {"config": "configs/tiny_comparisons.py", "overrides": ()},
      "no_noise_limit": {"config": "configs/tiny_comparisons.py",
                         "overrides": ("diffusion.max_t_image_first=-1",)},
      "lambda1": {"config": "configs/tiny_comparisons.py", "overrides": ("diffusion.loss_weight=1.0",)},
      "lambda20": {"config": "configs/tiny_comparisons.py", "overrides": ("diffusion.loss_weight=20.0",)},
      "caption_first_half": {"config": "configs/tiny_comparisons.py",
                            "overrides": ("data.caption_first_prob=0.5",)},
      "flow": {"config": "configs/tiny_comparisons.py",
               "overrides": ("diffusion.objective=flow", "diffusion.sampler=ddim")},
  }
  s.sizes = {"xs": ()}
  s.budgets = (204_800, 614_400)
  s.common = ("train.learning_rate=0.002", "diffusion.sample_steps=25")
  s.eval = {"num_samples": 48, "seed": 0, "batch_size": 16}
  s.parity = ("ddpm", "flow")
  s.metrics = {"shapes_accuracy": "higher", "caption_cider": "higher", "perplexity": "lower"}
  return s
