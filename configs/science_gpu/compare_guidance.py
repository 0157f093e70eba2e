"""Each family at its own guidance scale: compare.py's 1.3e15 runs, each
model scored at CFG 1.5, 3, 5 and 7.

compare_paper_sampler.py found that one shared scale ranks the families by
how each bears it: CFG 5 broke Chameleon's samples (0 of 128 right, against
16 at CFG 3) and gained Transfusion two prompts. Here every model is scored
with the sweeps' sampler (DDIM 50) at four scales on the same weights (the
sweep's `eval.variants`): the headline `shapes_accuracy` at CFG 3, as in
compare.py, so each record sits beside its twin there, and
`shapes_accuracy_cfgN` at the others. The verdict compares each family at
its best scale. The runs train exactly as compare.py's (same names, configs
and seeds).

  bash benchmarks/science_gpu.sh compare_guidance [RUN ...]     (device tool; PLAN.md)
  tfjax-sweep --config=configs/science_gpu/compare_guidance.py --workdir=/tmp/cg \
      --report_only --results_dir=benchmarks/science_gpu/runs/compare_guidance
"""
from configs.science_gpu import common, compare

# 1.3e15 FLOPs: compare.py's largest budget with both seeds stored.
BUDGETS = (common.BUDGETS[4],)
SCALES = {"cfg1_5": 1.5, "cfg5": 5.0, "cfg7": 7.0}


def get_config():
  timing = dict(common.LARGE_DATA_TIMING)
  timing["run_overhead_s"] += 20.0  # three more DDIM 50 evaluations, ~6-7 s each
  variants = {name: (f"diffusion.cfg_scale={scale}",) for name, scale in SCALES.items()}
  return common.sweep("science_gpu_compare_guidance", compare.FAMILIES, budgets=BUDGETS,
                      parity=(("chameleon", "transfusion"),), extra_common=common.LARGE_DATA,
                      eval_samples=128, timing=timing, eval_variants=variants)
