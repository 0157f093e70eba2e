"""configs/tiny.py as the paper comparisons measured it (benchmarks/SCIENCE.md).

The sweeps and ablations (configs/sweep_tiny.py, configs/chameleon_tiny.py,
configs/ablations/*.py) compare families on the full shapes data: 1-3
objects of every size, linear patches, text and image-caption tokens 1:1,
DDIM 50 / CFG 3 samples. configs/tiny.py has since moved to the recipe that
learns colour and shape within the main job's 3000 CPU steps (U-Net patches,
one large object); this file keeps the comparisons' baseline, and their
commands, unchanged.
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "tiny"
  c.model.patch_type = "linear"
  c.data.max_objects = 3
  c.data.object_sizes = "small,medium,large"
  c.data.text_image_ratio = 1.0
  c.train.learning_rate = 1e-3
  c.diffusion.sample_steps = 50
  c.diffusion.sampler = "ddim"
  c.diffusion.cfg_scale = 3.0
  return c
