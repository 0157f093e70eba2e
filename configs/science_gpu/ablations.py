"""The paper's Transfusion ablations on the GPU, each against one baseline at
equal training FLOPs (tfjax/train/flops.py: U-Net convolutions included):

  causal          causal attention inside images (Table 5: bidirectional wins)
  unet            U-Net patch layers, 2 levels of 64/128 channels (Table 7)
  no_noise_limit  no noise cap for images before their caption (Table 8)
  patch1, patch4  latent patch 1 (64 positions per image) and 4 (4); the
                  baseline is patch 2 (Figure 6 direction)
  flow            rectified flow instead of DDPM (its val_loss_diffusion is a
                  velocity error: compare it by the pixel checker and captions)

  tfjax-sweep --config=configs/science_gpu/ablations.py --workdir=/tmp/abl --list
  bash benchmarks/science_gpu.sh ablations [RUN ...]        (device tool; PLAN.md)
  tfjax-sweep --config=configs/science_gpu/ablations.py --workdir=/tmp/abl --report_only \
      --results_dir=benchmarks/science_gpu/runs/ablations,benchmarks/science_gpu/runs/compare_pilot

The baseline `transfusion` is compare_pilot.py's family at the same budgets
and seeds (the same config, on the sweeps' 10k scenes): its runs are read
from the pilot's results. Two budgets (8e13 and 5.1e14 FLOPs), 2 seeds.
"""
from configs.science_gpu import common

BASE = "configs/tiny_comparisons.py"


def get_config():
  fam = lambda *over: {"config": BASE, "overrides": tuple(over)}
  return common.sweep("science_gpu_ablations", {
      "transfusion": fam(),
      "causal": fam("model.image_attention=causal"),
      "unet": fam("model.patch_type=unet", "model.unet_channels=(64, 128)"),
      "no_noise_limit": fam("diffusion.max_t_image_first=-1"),
      "patch1": fam("model.patch_size=1"),
      "patch4": fam("model.patch_size=4"),
      "flow": fam("diffusion.objective=flow"),
  }, budgets=(common.BUDGETS[1], common.BUDGETS[3]),
      parity=(("causal", "transfusion"), ("transfusion", "unet"),
              ("no_noise_limit", "transfusion"), ("transfusion", "patch1"),
              ("transfusion", "patch4"), ("transfusion", "flow")))
