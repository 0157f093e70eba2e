"""The benchmarks/SCIENCE.md sweep: the paper's comparisons at CPU scale on shapes.

  tfjax-sweep --config=configs/ablations/science_cpu.py --workdir=/tmp/science

  transfusion          configs/tiny.py (bidirectional intra-image attention,
                       linear 2x2 patches), two token budgets
  chameleon            configs/chameleon_tiny.py, the same two budgets
  transfusion_causal   causal intra-image attention, linear patches
  transfusion_unet     U-Net patch encoder/decoder (2 levels = patch 2)

Every run has configs/tiny.py's transformer (dim 128, 4 layers) and sees the
same number of training tokens per budget; compute is 6ND for all.
"""
import ml_collections

BUDGETS = (204_800, 614_400)   # 100 and 300 steps of 2048 tokens


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "science_cpu"
  s.families = {
      "transfusion": {"config": "configs/tiny.py", "overrides": ()},
      "chameleon": {"config": "configs/chameleon_tiny.py", "overrides": ()},
      "transfusion_causal": {"config": "configs/tiny.py",
                             "overrides": ("model.image_attention=causal",),
                             "budgets": BUDGETS[-1:]},
      "transfusion_unet": {"config": "configs/tiny.py",
                           "overrides": ("model.patch_type=unet", "model.unet_channels=(64, 128)"),
                           "budgets": BUDGETS[-1:]},
  }
  s.sizes = {"xs": ()}
  s.budgets = BUDGETS
  s.common = (
      "data.num_train_scenes=2000", "data.num_eval_scenes=100", "data.num_text_docs=4000",
      "vae.train_steps=400", "vae.batch_size=16", "vae.num_train_images=2000",
      "vae.num_val_images=64", "vae.log_every=50",
      "train.learning_rate=0.002", "train.end_learning_rate=0.0002", "train.log_every=25",
      "train.warmup_steps=20", "train.eval_batches=2",
      "diffusion.sample_steps=25",
  )
  s.eval = {"num_samples": 48, "perplexity_batches": 8}
  s.parity = ("chameleon", "transfusion")  # FLOPs Transfusion needs to match Chameleon
  s.metrics = {"shapes_accuracy": "higher", "caption_cider": "higher",
               "caption_scene_accuracy": "higher", "perplexity": "lower"}
  return s
