"""Ablations: intra-image attention (bidirectional vs causal) x patch layers
(linear vs U-Net), the paper's Table 4.

  tfjax-sweep --config=configs/ablations/attention_patches.py --workdir=DIR
"""
import ml_collections

UNET = ("model.patch_type=unet", "model.unet_channels=(64, 128)")


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "ablation_attention_patches"
  s.families = {
      "linear_bidirectional": {"config": "configs/tiny_comparisons.py", "overrides": ()},
      "linear_causal": {"config": "configs/tiny_comparisons.py",
                        "overrides": ("model.image_attention=causal",)},
      "unet_bidirectional": {"config": "configs/tiny_comparisons.py", "overrides": UNET},
      "unet_causal": {"config": "configs/tiny_comparisons.py",
                      "overrides": UNET + ("model.image_attention=causal",)},
  }
  s.sizes = {"xs": ()}
  s.budgets = (204_800, 614_400)
  s.common = ("train.learning_rate=0.002", "diffusion.sample_steps=25")
  s.eval = {"num_samples": 48, "seed": 0, "batch_size": 16}
  s.parity = ("linear_causal", "linear_bidirectional")
  s.metrics = {"shapes_accuracy": "higher", "caption_cider": "higher", "perplexity": "lower"}
  return s
