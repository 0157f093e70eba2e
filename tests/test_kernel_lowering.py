"""The attention kernels' lowered programs are the recorded ones.

A subset of tools/kernel_lab/lowering.py's cases (one or more per kernel
module and pass, and the Hopper defaults the dispatch picks) is lowered on
the CPU and its normalised program's hash compared with
tools/kernel_lab/lowered_programs.json: a change to a kernel (a tile, an op,
a compiler setting) fails here; a move or rename of code does not. After an
intended kernel change, record all cases again:
`python tools/kernel_lab/lowered_programs.py --write tools/kernel_lab/lowered_programs.json`.
"""
import functools
import json
import os

import jax
import pytest

from tfjax.config.files import load_module

LAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "tools", "kernel_lab")
with open(os.path.join(LAB, "lowered_programs.json")) as f:
  RECORDED = json.load(f)

CASES = [
    "mosaic_gpu_fwd[0] d64 hq4 hkv2 L512",            # mosaic_gpu_fwd: GQA, 2 heads per CTA
    "mosaic_gpu_vjp[1] d128 hq2 hkv2 L384",           # vjp_dkv + vjp_dq, delta from XLA
    # api's choice on Hopper, fwd+bwd; 64: persistent dk/dv, dq with its own
    # delta; 128: dq from the dk/dv kernel's dS^T tiles (vjp_ds) or recomputing
    "hopper_default d64 seq_len4096",
    "hopper_default d64 seq_len8192",
    "hopper_default d128 seq_len4096",
    "hopper_default d128 seq_len8192",
    "triton bfloat16 d64 hq4 hkv1 L320 blocks128,64",  # triton fwd+bwd, MQA, padded
    "triton bfloat16 d64 hq4 hkv2 L256 blocksNone,None",  # triton's shipped tiles
    "triton forward-only d64",                         # triton KV-cache forward
    "triton_interpret float32 d64 hq4 hkv2 L256 blocks64,64",  # api on CPU, interpret mode
    "mosaic_tpu v5p bf16 d64 blocks128",               # mosaic_tpu for a v5p chip
]


@functools.cache
def _lowering():
  """tools/kernel_lab/lowering.py, loaded by its path (tools/ is no package)."""
  return load_module(os.path.join(LAB, "lowering.py"), "kernel_lab_")


@functools.cache
def _unavailable(platform: str) -> str | None:
  """Why programs for `platform` cannot be lowered as recorded here, or None."""
  if platform == "cpu":
    return None if jax.default_backend() == "cpu" else "recorded on the CPU backend"
  try:
    if platform == "tpu":
      from jax.experimental import topologies
      topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    else:
      jax.jit(lambda x: x + 1).trace(1.0).lower(lowering_platforms=(platform,))
  except Exception as e:  # noqa: BLE001 (libtpu missing, no lowering rules, ...)
    return f"cannot lower for {platform}: {type(e).__name__}: {str(e)[:200]}"
  return None


def test_subset_names_recorded_cases():
  assert set(CASES) <= set(RECORDED["cases"]), set(CASES) - set(RECORDED["cases"])


@pytest.mark.parametrize("name", CASES)
def test_lowered_program_is_the_recorded_one(name):
  if jax.__version__ != RECORDED["jax"]:
    pytest.skip(f"hashes recorded with JAX {RECORDED['jax']}, this is {jax.__version__}")
  platform, build = _lowering().cases()[name]
  if reason := _unavailable(platform):
    pytest.skip(reason)
  got, _ = _lowering().case_digest(build)
  assert got == RECORDED["cases"][name], (
      f"{name}: the kernel's lowered program changed. If intended, record again: python "
      "tools/kernel_lab/lowered_programs.py --write tools/kernel_lab/lowered_programs.json")
