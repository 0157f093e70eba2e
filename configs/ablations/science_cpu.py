"""The benchmarks/SCIENCE.md sweep: the paper's comparisons at CPU scale on shapes.

  tfjax-sweep --config=configs/ablations/science_cpu.py --workdir=/tmp/science

  transfusion          configs/tiny_comparisons.py (bidirectional intra-image attention,
                       linear 2x2 patches)
  chameleon            configs/chameleon_tiny.py
  transfusion_causal   causal intra-image attention, linear patches
  transfusion_unet     U-Net patch encoder/decoder (2 levels = patch 2)
each at four token budgets.

Every run has the same transformer (configs/tiny_comparisons.py narrowed to dim 64, 2
layers, for a shared 2-core CPU) and sees the same number of training tokens
per budget; compute is 6ND for all.
"""
import ml_collections

BUDGETS = (102_400, 307_200, 921_600, 2_764_800)   # 100 .. 2700 steps of 1024 tokens


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "science_cpu"
  s.families = {
      "transfusion": {"config": "configs/tiny_comparisons.py", "overrides": ()},
      "chameleon": {"config": "configs/chameleon_tiny.py", "overrides": ()},
      "transfusion_causal": {"config": "configs/tiny_comparisons.py",
                             "overrides": ("model.image_attention=causal",)},
      "transfusion_unet": {"config": "configs/tiny_comparisons.py",
                           "overrides": ("model.patch_type=unet", "model.unet_channels=(32, 64)")},
  }
  # dim 64 x 2 layers: what a shared 2-core CPU trains in minutes.
  s.sizes = {"xxs": ("model.dim=64", "model.num_layers=2", "model.num_heads=2",
                     "model.num_kv_heads=2", "model.time_embed_dim=64")}
  s.budgets = BUDGETS
  s.common = (
      "data.num_train_scenes=2000", "data.num_eval_scenes=100", "data.num_text_docs=4000",
      "vae.channels=(16, 32, 32, 32)", "vae.mid_attention=False", "vae.train_steps=250",
      "vae.batch_size=8", "vae.num_train_images=2000", "vae.num_val_images=64",
      "vae.log_every=25", "vae.scale_images=256",
      "train.learning_rate=0.002", "train.end_learning_rate=0.0002", "train.log_every=25",
      "train.warmup_steps=20", "train.eval_batches=2",
      "data.batch_size=8",
      "diffusion.sample_steps=25",
  )
  s.eval = {"num_samples": 32, "seed": 0, "batch_size": 16}
  # (A, B): FLOPs B needs to match A's metric, over A's FLOPs.
  s.parity = (("chameleon", "transfusion"), ("transfusion_causal", "transfusion"),
              ("transfusion", "transfusion_unet"))
  # val_loss_diffusion: held-out denoising MSE (same batches and noise for every
  # run): a continuous image-side signal where the pixel checker reads ~0.
  s.metrics = {"shapes_accuracy": "higher", "caption_cider": "higher",
               "caption_scene_accuracy": "higher", "perplexity": "lower",
               "val_loss_diffusion": "lower"}
  return s
