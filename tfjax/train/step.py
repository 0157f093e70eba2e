"""The pure train and eval steps, and their jitted, sharded forms.

`train_step(state, batch)` computes the Transfusion loss (LM + lambda * DDPM,
see tfjax/losses.py), its gradient (accumulated over micro-batches by a scan
when train.grad_accum_steps > 1), one AdamW update and the EMA update. It is a
pure function of its inputs: the step's randomness is derived from the state's
run key and step number, so a resumed run repeats the uninterrupted one
bit for bit.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from tfjax.batch import Batch
from tfjax.losses import transfusion_loss
from tfjax.model.transfusion import Transfusion
from tfjax.train import mesh as mesh_lib
from tfjax.train.optimizer import learning_rate_schedule
from tfjax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _combine_metrics(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Micro-batch metrics [accum] -> one value: counts add up, the rest average."""
  return {k: (v.sum(0) if k.startswith("num_") else v.mean(0)) for k, v in stacked.items()}


def loss_and_grad(params: Any, batch: Batch, rng: jax.Array, *, loss_fn: LossFn,
                  accum_steps: int) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """(loss, metrics, grads), averaging over `accum_steps` micro-batches.

  Micro-batch i takes rows i, i + accum, i + 2 * accum, ...: splitting the
  batch axis as [rows / accum, accum] keeps each device's rows on that device.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return loss, metrics, grads

  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)
  micro = jax.tree_util.tree_map(split, batch)
  keys = jax.random.split(rng, accum_steps)

  def body(grad_sum, xs):
    mb, key = xs
    (loss, metrics), grads = grad_fn(params, mb, key)
    return jax.tree_util.tree_map(jnp.add, grad_sum, grads), (loss, metrics)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  grad_sum, (losses, metrics) = jax.lax.scan(body, zeros, (micro, keys))
  grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grad_sum)
  return losses.mean(), _combine_metrics(metrics), grads


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               tx: optax.GradientTransformation,
               train: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Returns the new state and scalar float32 metrics."""
  loss, metrics, grads = loss_and_grad(state.params, batch, state.step_rng(), loss_fn=loss_fn,
                                       accum_steps=int(train.grad_accum_steps))
  with jax.named_scope("optimizer"):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if train.ema_decay > 0:
      d = train.ema_decay
      ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema, params)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["lr"] = learning_rate_schedule(train)(state.step)
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, rng: jax.Array, *,
              loss_fn: LossFn) -> dict[str, jax.Array]:
  """Validation metrics for one batch (no update)."""
  loss, metrics = loss_fn(params, batch, rng)
  metrics = dict(metrics)
  metrics["loss"] = loss
  return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def batch_shardings(mesh: Mesh, mesh_config: ml_collections.ConfigDict, spec: Batch) -> Batch:
  """Every Batch field is sharded on its leading (batch) axis."""
  s = mesh_lib.batch_sharding(mesh, mesh_config)
  return jax.tree_util.tree_map(lambda _: s, spec)


def make_loss_fn(config: ml_collections.ConfigDict, model: Any | None = None,
                 training: bool = True) -> LossFn:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` bound to the model and config.

  The eval variant turns caption dropout off, so validation loss measures the
  conditional model.
  """
  model = Transfusion(config.model) if model is None else model
  if not training:
    config = config.copy_and_resolve_references()
    config.diffusion.caption_dropout = 0.0
  return functools.partial(transfusion_loss, model=model, config=config)


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                   train: ml_collections.ConfigDict, mesh: Mesh, state_shardings: TrainState,
                   batch_spec: Batch, mesh_config: ml_collections.ConfigDict
                   ) -> Callable[[TrainState, Batch], Any]:
  """The train step jitted with explicit shardings and the state donated."""
  fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx, train=train)
  return jax.jit(fn, in_shardings=(state_shardings,
                                   batch_shardings(mesh, mesh_config, batch_spec)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,))


def jit_eval_step(loss_fn: LossFn, mesh: Mesh, param_shardings: Any, batch_spec: Batch,
                  mesh_config: ml_collections.ConfigDict) -> Callable[[Any, Batch, jax.Array], Any]:
  fn = functools.partial(eval_step, loss_fn=loss_fn)
  return jax.jit(fn, in_shardings=(param_shardings,
                                   batch_shardings(mesh, mesh_config, batch_spec),
                                   mesh_lib.replicated(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
