"""GPU sweeps of the paper's comparisons (issue 36; plan: benchmarks/science_gpu/PLAN.md)."""
