"""XLA flags the trainer sets before the backend starts: GPU runs' and CPU runs'.

These are for several GPUs: the latency-hiding scheduler overlaps collectives
with compute, and all-gathers / reduce-scatters / all-reduces are combined into
large transfers and pipelined across the layer scan. On one H100 they neither
help nor hurt (benchmarks/RESULTS.md, Training). Not set: two flags some GPU
trainers publish, `xla_gpu_enable_triton_gemm=false` and
`xla_gpu_enable_while_loop_double_buffering=true`; with them the 0.37B step
on one H100 was 23% slower. A flag the user already put in XLA_FLAGS is left
as the user set it.

CPU: YNNPACK fusions off (`xla_cpu_experimental_ynn_fusion_type` empty), so
dots and convolutions run on XLA's own (Eigen) kernels. On the 2-core CPU the
tiny main job's train step costs about 10% fewer CPU seconds with them off
and spreads better over both cores (benchmarks/RESULTS.md, Main job). The flag
only changes CPU compilations; results differ from the YNNPACK ones by
float32 rounding.
"""
from __future__ import annotations

import importlib.util
import os

GPU_FLAGS = {
    # Overlap collectives and copies with compute (across GPUs; offload copies).
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": "134217728",
    "xla_gpu_all_gather_combine_threshold_bytes": "134217728",
    "xla_gpu_reduce_scatter_combine_threshold_bytes": "67108864",
}


CPU_FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
}


def flags_string(existing: str, wanted: dict[str, str]) -> str:
  """`existing` XLA_FLAGS plus every `wanted` entry it does not set."""
  present = {part.split("=")[0].lstrip("-") for part in existing.split()}
  added = [f"--{k}={v}" for k, v in wanted.items() if k not in present]
  return " ".join([existing.strip()] + added).strip()


def gpu_flags_string(existing: str) -> str:
  """`existing` XLA_FLAGS plus every GPU_FLAGS entry it does not set."""
  return flags_string(existing, GPU_FLAGS)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def _cuda_plugin_installed() -> bool:
  return any(_installed(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin",
                                     "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"))


def _cpu_run() -> bool:
  """True where JAX will compute on the CPU: JAX_PLATFORMS=cpu, or no CUDA or TPU
  plugin installed. CPU flags stay off elsewhere: they were measured only
  with JAX 0.10.2, and XLA refuses to start on a flag its version lacks."""
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return True
  return not (_cuda_plugin_installed() or _installed("libtpu"))


def set_cpu_flags(enabled: bool = True) -> None:
  """Adds CPU_FLAGS to XLA_FLAGS on CPU runs (call it before JAX starts its backends)."""
  if enabled and _cpu_run():
    os.environ["XLA_FLAGS"] = flags_string(os.environ.get("XLA_FLAGS", ""), CPU_FLAGS)


def set_gpu_flags(enabled: bool = True) -> None:
  """Adds GPU_FLAGS to XLA_FLAGS when a CUDA JAX plugin is installed (call it
  before JAX starts its backends; the flags are ignored on CPU runs)."""
  if not enabled or os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return
  if not _cuda_plugin_installed():
    return
  os.environ["XLA_FLAGS"] = gpu_flags_string(os.environ.get("XLA_FLAGS", ""))
