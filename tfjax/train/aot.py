"""Ahead-of-time compilation of the sharded train step for a device topology.

`compile_train_step(config, devices)` lowers and compiles the real train step
(model, loss, AdamW, donation) for a mesh over `devices`, which may be real
local devices or the abstract devices of a TPU topology description (no TPU
needed), and reports per-chip memory against the chip's HBM.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
from jax.experimental import topologies
from jax.sharding import Mesh
import ml_collections

from tfjax.batch import batch_spec
from tfjax.config import validate
from tfjax.model import init_params
from tfjax.train import mesh as mesh_lib
from tfjax.train.checks import apply_device_microbatch, validate_train
from tfjax.train.flops import dense_step_flops, peak_tflops
from tfjax.train.optimizer import make_optimizer
from tfjax.train.state import state_shardings
from tfjax.train.step import batch_shardings, jit_train_step, make_loss_fn

GiB = 1024 ** 3

# HBM per chip in bytes, matched against device_kind (first match wins).
HBM_BYTES = (
    ("TPU v6 lite", 32 * GiB),
    ("TPU v5 lite", 16 * GiB),
    ("TPU v5p", 95 * GiB),
    ("TPU v5", 95 * GiB),
    ("TPU v4", 32 * GiB),
    ("H200", 141 * 10 ** 9),
    ("H100", 80 * 10 ** 9),
    ("A100", 80 * 10 ** 9),
)


def hbm_bytes(device_kind: str) -> int:
  for name, size in HBM_BYTES:
    if name.lower() in device_kind.lower():
      return size
  return 0


def topology_devices(topology: str) -> list[Any]:
  """Devices of `topology`: "v5p:4x4x4"-style TPU names, or "local" for jax.devices().

  TPU names are passed to jax.experimental.topologies.get_topology_desc (needs
  libtpu, i.e. `pip install jax[tpu]`; no TPU hardware). "v5p" is spelled
  "v5" there; "v5e" is "v5litepod", "v6e" is "v6e".
  """
  if topology in ("", "local"):
    return list(jax.devices())
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # noqa: BLE001 - re-raised with the flag to fix
    raise ValueError(f"--topology={topology}: not a TPU topology libtpu knows "
                     f"(e.g. v5p:4x4x4, v5e:8x8, v4:4x4x4; is jax[tpu] installed?): {e}") from e
  return list(desc.devices)


@dataclasses.dataclass
class CompileReport:
  config: str
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  params: int
  global_batch: int
  seq_len: int
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  flops_per_step: float
  peak_tflops: float

  @property
  def total_bytes(self) -> int:
    """Peak per-chip footprint: arguments + temporaries + outputs not aliased
    to (donated) arguments + code."""
    return (self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool | None:
    return None if not self.hbm_bytes else self.total_bytes <= self.hbm_bytes

  def table(self) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    rows = [("config", self.config), ("topology", f"{self.topology} ({self.num_devices} x "
                                      f"{self.device_kind})"),
            ("mesh (data, fsdp, tensor)", f"{self.mesh['data']} x {self.mesh['fsdp']} x "
                                          f"{self.mesh['tensor']}"),
            ("parameters", f"{self.params / 1e9:.3f} B"),
            ("global batch x seq", f"{self.global_batch} x {self.seq_len}"),
            ("compile time", f"{self.compile_seconds:.1f} s"),
            ("arguments / chip", gib(self.argument_bytes)),
            ("temporaries / chip", gib(self.temp_bytes)),
            ("outputs (not donated) / chip", gib(self.output_bytes - self.alias_bytes)),
            ("total / chip", gib(self.total_bytes)),
            ("HBM / chip", gib(self.hbm_bytes) if self.hbm_bytes else "unknown"),
            ("fits", {True: "yes", False: "NO", None: "?"}[self.fits])]
    if self.peak_tflops:
      step_s = self.flops_per_step / (self.num_devices * self.peak_tflops * 1e12)
      rows.append(("step time at 100% MFU", f"{step_s:.3f} s"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)

  def markdown_row(self) -> str:
    return (f"| {self.config} | {self.topology} | {self.mesh['data']}x{self.mesh['fsdp']}x"
            f"{self.mesh['tensor']} | {self.global_batch}x{self.seq_len} | "
            f"{self.argument_bytes / GiB:.2f} | {self.temp_bytes / GiB:.2f} | "
            f"{self.total_bytes / GiB:.2f} | {self.hbm_bytes / GiB:.1f} | "
            f"{'yes' if self.fits else 'NO'} | {self.compile_seconds:.0f} s |")


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any],
                       topology: str = "local") -> tuple[Any, CompileReport]:
  """(compiled executable, report) for the config's train step on `devices`."""
  validate(config)
  apply_device_microbatch(config, len(devices))
  validate_train(config, len(devices))
  mesh: Mesh = mesh_lib.make_mesh(config.mesh, devices)
  tx = make_optimizer(config.train)
  abstract_state, shardings = state_shardings(config, mesh, tx, init_params)
  m = config.model
  spec = batch_spec(config.data.batch_size, config.data.seq_len, config.data.max_images_per_seq,
                    (m.latent_size, m.latent_size, m.latent_channels))
  b_shard = batch_shardings(mesh, config.mesh, spec)
  abstract_batch = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), spec, b_shard)
  step = jit_train_step(make_loss_fn(config), tx, config.train, mesh, shardings, spec,
                        config.mesh)
  t0 = time.time()
  with mesh_lib.activate(mesh, config.mesh):
    compiled = step.lower(abstract_state, abstract_batch).compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  kind = devices[0].device_kind
  n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_state.params))
  report = CompileReport(
      config=config.name, topology=topology, device_kind=kind, num_devices=len(devices),
      mesh=dict(mesh.shape), params=n_params, global_batch=config.data.batch_size,
      seq_len=config.data.seq_len, compile_seconds=seconds,
      argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
      output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
      alias_bytes=int(getattr(mem, "alias_size_in_bytes", 0)),
      temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
      code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
      hbm_bytes=hbm_bytes(kind),
      flops_per_step=dense_step_flops(m, config.data.batch_size, config.data.seq_len),
      peak_tflops=peak_tflops(kind, config.train.peak_tflops))
  return compiled, report
