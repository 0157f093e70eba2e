"""The comparison's pilot (H100, 2026-12-07): compare.py's families on the
sweeps' 10k training scenes, budgets 3.2e13 to 5.1e14 FLOPs (16x), 2 seeds.
Kept for its stored runs: the ablations' `transfusion` baseline, and the
overfitting that moved the comparison to 100k scenes.

  tfjax-sweep --config=configs/science_gpu/compare_pilot.py --workdir=/tmp/pilot --report_only \
      --results_dir=benchmarks/science_gpu/runs/compare_pilot
"""
from configs.science_gpu import common, compare


def get_config():
  return common.sweep("science_gpu_compare_pilot", compare.FAMILIES, budgets=common.BUDGETS[:4],
                      parity=(("chameleon", "transfusion"),))
