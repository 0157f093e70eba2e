"""TrainState: everything a training run carries from one step to the next.

The state is created directly in its sharded layout: `jax.eval_shape` gives
the (logically annotated) structure, the mesh rules turn the annotations into
shardings, and a jitted init with those `out_shardings` materialises each
parameter only on the devices that hold a shard of it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from tfjax.train import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """step int32[]; params/ema float32 trees; rng uint32[2] raw key data."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema: Any  # a params-shaped tree when train.ema_decay > 0, else {}

  def step_rng(self) -> jax.Array:
    """The key for this step: a pure function of the run seed and the step,
    so a resumed run draws exactly the noise the uninterrupted run would."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _boxed_state_fn(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    init_params: Callable[[ml_collections.ConfigDict, jax.Array], Any]
                    ) -> Callable[[], TrainState]:
  seed = int(config.train.seed)

  def init() -> TrainState:
    key = jax.random.key(seed)
    param_key, run_key = jax.random.split(key)
    params = init_params(config.model, param_key, boxed=True)
    # Optimizer moments and EMA mirror the parameters' logical boxes, so they
    # get the parameters' shardings.
    opt_state = tx.init(params)
    ema = jax.tree_util.tree_map(lambda x: x, params) if config.train.ema_decay > 0 else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(run_key), ema=ema)
  return init


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh,
                    tx: optax.GradientTransformation,
                    init_params: Callable[..., Any]) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state of ShapeDtypeStructs with sharding, sharding tree)."""
  boxed = jax.eval_shape(_boxed_state_fn(config, tx, init_params))
  shardings = mesh_lib.logical_shardings(boxed, mesh, config.mesh)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh,
                       tx: optax.GradientTransformation,
                       init_params: Callable[..., Any]) -> TrainState:
  """A freshly initialised TrainState laid out on `mesh` by config.mesh.rules."""
  _, shardings = state_shardings(config, mesh, tx, init_params)
  init = _boxed_state_fn(config, tx, init_params)
  with mesh_lib.activate(mesh, config.mesh):
    return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
