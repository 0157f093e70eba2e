"""Transfusion vs Chameleon at equal training FLOPs (the paper's Table 3 /
Figure 5 direction), on the GPU: 6 budgets spanning 100x, 2 seeds, on 100k
training scenes (compare_pilot.py ran the first 4 budgets on 10k, where
Chameleon overfit), each run scored on 128 held-out prompts.

  tfjax-sweep --config=configs/science_gpu/compare.py --workdir=/tmp/compare --list
  bash benchmarks/science_gpu.sh compare [RUN ...]          (device tool; PLAN.md)
  tfjax-sweep --config=configs/science_gpu/compare.py --workdir=/tmp/compare --report_only \
      --results_dir=benchmarks/science_gpu/runs/compare

  transfusion  configs/tiny_comparisons.py: linear 2x2 patches over 8x8x8 KL-VAE
               latents (16 positions per image), bidirectional within images, DDPM
  chameleon    configs/chameleon_tiny.py: the same transformer on 8x8 VQ-VAE codes
               (64 tokens per image), QK-norm, Chameleon norm placement, LM loss only
Both at 8192 tokens per step; budgets are FLOPs (tfjax/train/flops.py: the
patch layers and Chameleon's larger output head included), so at one budget
Chameleon runs fewer steps.
"""
from configs.science_gpu import common

FAMILIES = {
    "transfusion": {"config": "configs/tiny_comparisons.py", "overrides": ()},
    "chameleon": {"config": "configs/chameleon_tiny.py", "overrides": ()},
}


def get_config():
  # 128 prompts: the shapes accuracy is the text-to-image verdict, and at 64
  # one prompt is 1.6 points (the pilot's seeds differed by up to 4.7).
  return common.sweep("science_gpu_compare", FAMILIES, parity=(("chameleon", "transfusion"),),
                      extra_common=common.LARGE_DATA, eval_samples=128,
                      timing=common.LARGE_DATA_TIMING)
