"""The device mesh and the logical-axis sharding rules, both from config.mesh.

The mesh has three named axes: `data` (pure data parallelism), `fsdp`
(data parallelism with parameters and optimizer state sharded) and `tensor`
(Megatron-style tensor parallelism). Model parameters carry logical axis names
(`embed`, `mlp`, `heads`, ...); `config.mesh.rules` maps those names onto mesh
axes, so one model definition serves every parallelism layout.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tfjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes, resolving one -1 to the remaining devices.

  Raises:
    ConfigError naming the `mesh.*` key when the sizes cannot tile the devices.
  """
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config key mesh.{free[1]}: only one mesh axis may be -1 (got {free})")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"config key mesh.{a}: size must be positive or -1, got {s}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      others = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s != -1)
      raise ConfigError(
          f"config keys {others}: these axes use {fixed} devices, which does not divide "
          f"the {num_devices} devices available (mesh.{free[0]} = -1 takes the rest)")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config key mesh.data: mesh {sizes} uses {fixed} devices but {num_devices} are "
        "available (set mesh.data=-1 to fill)")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor")."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    # Topology-aware placement knows only some device kinds; fall back to
    # the plain order (correct, possibly slower interconnect use).
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def rules(mesh_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """config.mesh.rules as the tuple-of-pairs form flax expects."""
  out = []
  for pair in mesh_config.rules:
    if len(pair) != 2:
      raise ConfigError(f"config key mesh.rules: entry {pair!r} is not (logical_name, mesh_axes)")
    name, axes = pair
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ConfigError(f"config key mesh.rules: {name!r} maps to unknown mesh axis {a!r}; "
                          f"mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      mesh_config: ml_collections.ConfigDict) -> Any:
  """NamedShardings for a tree holding `nn.LogicallyPartitioned` leaves.

  Leaves without logical annotations are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(mesh_config))


def batch_sharding(mesh: Mesh, mesh_config: ml_collections.ConfigDict) -> NamedSharding:
  """Shards the leading (batch) dimension over the mesh axes config.mesh.rules
  give the logical "batch" axis (the same rule the model's activations follow)."""
  axes = nn.logical_to_mesh_axes(("batch",), rules(mesh_config))[0]
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, mesh_config: ml_collections.ConfigDict) -> Iterator[Mesh]:
  """Makes `mesh` and the logical rules current, so activation sharding
  constraints inside the model (`nn.with_logical_constraint`) take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(mesh_config)):
    yield mesh


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global sharded arrays.

  `local` holds this process's rows ([global_batch / process_count, ...]); on
  one host that is the whole batch.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
