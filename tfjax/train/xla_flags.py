"""XLA flags the trainer sets for GPU runs, before the backend starts.

The single-GPU ones make the step's schedule and GEMMs better; the collective
ones (combining and pipelining all-gathers / reduce-scatters, which the
latency-hiding scheduler then overlaps with compute) matter across GPUs. The
same set the large JAX GPU trainers publish for Hopper. A flag the user already
put in XLA_FLAGS is left as the user set it.
"""
from __future__ import annotations

import os

GPU_FLAGS = {
    # Overlap collectives and copies with compute (across GPUs; offload copies).
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # GEMMs through cuBLAS rather than Triton-generated kernels.
    "xla_gpu_enable_triton_gemm": "false",
    # The layer scan's collectives double-buffered across iterations.
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": "134217728",
    "xla_gpu_all_gather_combine_threshold_bytes": "134217728",
    "xla_gpu_reduce_scatter_combine_threshold_bytes": "67108864",
}


def gpu_flags_string(existing: str) -> str:
  """`existing` XLA_FLAGS plus every GPU_FLAGS entry it does not set."""
  present = {part.split("=")[0].lstrip("-") for part in existing.split()}
  added = [f"--{k}={v}" for k, v in GPU_FLAGS.items() if k not in present]
  return " ".join([existing.strip()] + added).strip()


def set_gpu_flags(enabled: bool = True) -> None:
  """Adds GPU_FLAGS to XLA_FLAGS when a CUDA JAX plugin is installed (call it
  before JAX starts its backends; the flags are ignored on CPU runs)."""
  if not enabled or os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return
  import importlib.util

  def installed(name):
    try:
      return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
      return False
  if not any(installed(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin",
                                    "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")):
    return
  os.environ["XLA_FLAGS"] = gpu_flags_string(os.environ.get("XLA_FLAGS", ""))
