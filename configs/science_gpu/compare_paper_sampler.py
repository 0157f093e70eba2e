"""compare.py's runs sampled the paper's way: does the sampler decide the verdict?

compare.py scores text-to-image with DDIM 50 steps and CFG 3 (every GPU
sweep's sampler); the paper's controlled comparison (its sections 4.1-4.2)
samples 250 DDPM steps with CFG 5 for both families. The runs here train
exactly as compare.py's (same names, configs and seeds; only the sampling
keys differ, which training does not read), at its largest budget with both
seeds stored, so each record sits beside its compare.py twin. Each run is
also scored with compare.py's sampler (metric shapes_accuracy_sweep_sampler),
so the two samplers meet on the same weights too.

  bash benchmarks/science_gpu.sh compare_paper_sampler [RUN ...]     (device tool; PLAN.md)
  tfjax-sweep --config=configs/science_gpu/compare_paper_sampler.py --workdir=/tmp/cps \
      --report_only --results_dir=benchmarks/science_gpu/runs/compare_paper_sampler
"""
from configs.science_gpu import common, compare

# 1.3e15 FLOPs: compare.py's largest budget with both seeds stored.
BUDGETS = (common.BUDGETS[4],)


def get_config():
  timing = dict(common.LARGE_DATA_TIMING)
  timing["run_overhead_s"] += 30.0  # 250 steps x 2 (CFG) for 128 prompts, ~5x DDIM 50's
  return common.sweep("science_gpu_compare_paper_sampler", compare.FAMILIES, budgets=BUDGETS,
                      parity=(("chameleon", "transfusion"),),
                      extra_common=common.LARGE_DATA + common.PAPER_SAMPLER, eval_samples=128,
                      timing=timing, eval_variants={"sweep_sampler": common.SWEEP_SAMPLER})
