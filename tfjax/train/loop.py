"""`train(config, workdir)`: the training loop around the pure step.

Side effects live here: data iteration, checkpoints, metrics, samples and
signals. The loop resumes from WORKDIR/checkpoints when a checkpoint exists
(same data position, same randomness), evaluates every train.eval_every steps,
saves every train.checkpoint_every steps and at the end, and on SIGTERM or
SIGINT saves once more and returns (callers then raise `Preempted`:
tfjax/train/preemption.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfjax import checkpoints
from tfjax.batch import Batch, batch_spec
from tfjax.config import ConfigError, validate
from tfjax.data.pipeline import make_eval_iterator, make_train_iterator
from tfjax.model import hf_llama, init_params
from tfjax.paths import Paths
from tfjax.train import mesh as mesh_lib
from tfjax.train import pretrained
from tfjax.train.checkpoint import Checkpointer, DamagedCheckpoints, config_json
from tfjax.train.checks import apply_device_microbatch, validate_train
from tfjax.train.flops import peak_tflops
from tfjax.train.metrics import MetricsWriter, Throughput
from tfjax.train.optimizer import make_optimizer
from tfjax.train.preemption import EXIT_PREEMPTED, Preempted, StopSignals  # noqa: F401
from tfjax.train.state import TrainState, create_train_state, state_shardings
from tfjax.train.step import jit_eval_step, jit_train_step, make_loss_fn
from tfjax.train.synthetic import synthetic_dataset

log = logging.getLogger(__name__)

# (config, process_index, process_count) -> an iterator of numpy batch dicts.
DataFactory = Callable[[ml_collections.ConfigDict, int, int], Iterator[dict[str, np.ndarray]]]


@dataclasses.dataclass
class TrainResult:
  step: int
  state: TrainState
  preempted: bool
  last_metrics: dict[str, float]


def _default_train_data(config: ml_collections.ConfigDict, process_index: int,
                        process_count: int) -> Iterator[dict[str, np.ndarray]]:
  if config.train.synthetic_data:
    return iter(synthetic_dataset(config, config.data.shuffle_seed, process_index, process_count))
  return make_train_iterator(config, config.data.dir, process_index=process_index,
                             process_count=process_count)


def _default_eval_data(config: ml_collections.ConfigDict, process_index: int,
                       process_count: int) -> Iterator[dict[str, np.ndarray]] | None:
  if config.train.synthetic_data:
    return iter(synthetic_dataset(config, 10 ** 6 + config.data.shuffle_seed, process_index,
                                  process_count))
  return make_eval_iterator(config, config.data.dir, process_index=process_index,
                            process_count=process_count)


def _restore_params_from(path: str, abstract_state: TrainState, config, fresh: Any) -> Any:
  """Parameters (EMA when kept) of another run's checkpoint or an export, for
  fine-tuning, on this run's shardings; or `fresh` (the new init) with an
  hf_llama checkpoint's text side."""
  if hf_llama.checkpoint_dir(path) is not None:
    return pretrained.load_hf_llama_params(config, fresh)
  if checkpoints.is_export(path):
    return checkpoints.load_export_params(path, abstract_state.params)
  try:
    params, _ = checkpoints.restore_params(path, config=config, like=abstract_state.params)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config key train.init_from: no checkpoint found in {path}") from e
  except ValueError as e:
    raise ValueError(f"config key train.init_from: {e}") from e
  return params


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of config with every path key absolute (tfjax.paths: data.dir
  relative to workdir), for use in this process, never stored; an hf_llama
  init_from checked against config.model and naming data.tokenizer."""
  config = Paths.from_command_line(config, workdir).resolved_config()
  pretrained.resolve_hf_llama(config)
  return config


def raise_if_preempted(result: "TrainResult", workdir: str) -> None:
  """Ends a command whose training a signal stopped (after its save)."""
  if result.preempted:
    raise Preempted(f"pre-empted at step {result.step}: checkpoint saved in "
                    f"{os.path.join(workdir, 'checkpoints')}; run the same command again to "
                    f"resume (exit status {EXIT_PREEMPTED})")


def train(config: ml_collections.ConfigDict, workdir: str, *,
          train_data: DataFactory | None = None, eval_data: DataFactory | None = None,
          sample_fn: Callable[[TrainState, int], None] | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          devices: list[Any] | None = None) -> TrainResult:
  """Trains (or resumes) the Transfusion model of `config` in `workdir`.

  Args:
    config: a full config (see tfjax/config/defaults.py); validated here.
    workdir: checkpoints/, metrics.jsonl, tensorboard/, config.json go here.
    train_data, eval_data: data factories; default to tfjax.data (or the
      synthetic batches when train.synthetic_data).
    sample_fn: called every train.sample_every steps with the state (sample grids).
    on_step: called after every step with the step number (tests use it to
      interrupt a run at a chosen step).
    devices: the devices of the mesh (default all).
  Returns:
    The final step, state, whether a SIGTERM cut the run short, and the last
    logged metrics.
  """
  validate(config)
  tc = config.train
  os.makedirs(workdir, exist_ok=True)
  config = resolve_paths(config, workdir)
  paths = Paths.from_command_line(config, workdir)  # what is stored: see portable_config
  apply_device_microbatch(config, len(jax.devices() if devices is None else devices))
  tc = config.train
  validate_train(config, len(jax.devices() if devices is None else devices))
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  tx = make_optimizer(tc)
  abstract_state, shardings = state_shardings(config, mesh, tx, init_params)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_json(paths.portable_config()), f, indent=2)

  pi, pc = jax.process_index(), jax.process_count()
  data_iter = (train_data or _default_train_data)(config, pi, pc)
  ckpt = Checkpointer(paths.checkpoints, tc)
  event = ""
  try:
    found = ckpt.restore(abstract_state, iterator=data_iter)
  except DamagedCheckpoints:
    if not tc.restart:
      ckpt.close()
      raise
    found, event = None, "restart"
  if found is None and not event and ckpt.damaged_steps():
    if not tc.restart:
      ckpt.close()
      raise DamagedCheckpoints(
          f"{ckpt.directory} holds no checkpoint, but {ckpt.damaged_dir}/ holds damaged ones "
          f"({', '.join(ckpt.damaged_steps())}): put back an older copy of the checkpoints, "
          f"or pass --config.train.restart=true to start over from step 0")
    event = "restart"
  if event:
    log.warning("train.restart: every checkpoint in %s is damaged; starting over from step 0",
                ckpt.directory)
  if found is not None:
    step, state = found
    if step > tc.num_steps:
      ckpt.close()
      raise ConfigError(
          f"config key train.num_steps={tc.num_steps} is below the checkpoint's step {step} "
          f"in {ckpt.directory}: raise it to train on, or leave the train stage out "
          f"(--stages) to use the run as it is")
    log.info("resumed from step %d in %s", step, workdir)
  else:
    state = create_train_state(config, mesh, tx, init_params)
    if tc.init_from:
      params = _restore_params_from(tc.init_from, abstract_state, config, state.params)
      # The EMA starts where training starts: from the loaded weights, not the
      # random init (whose trace would take ~1/(1-decay) steps to fade). A
      # jitted copy keeps the shardings and gives the EMA buffers of its own,
      # since the train step donates both trees.
      ema = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p))(params) if state.ema else {}
      state = state.replace(params=params, ema=ema)
    step = 0

  spec = batch_spec(config.data.batch_size, config.data.seq_len, config.data.max_images_per_seq,
                    (config.model.latent_size,) * 2 + (config.model.latent_channels,))
  loss_fn = make_loss_fn(config)
  step_fn = jit_train_step(loss_fn, tx, tc, mesh, shardings, spec, config.mesh)
  eval_fn = jit_eval_step(make_loss_fn(config, training=False), mesh, shardings.params, spec,
                          config.mesh)
  b_sharding = mesh_lib.batch_sharding(mesh, config.mesh)
  # Each process sees only its rows: measure its share against its devices,
  # and scale the rates to the whole job.
  throughput = Throughput(config.model, len(mesh.local_devices),
                          peak_tflops(mesh.devices.flat[0].device_kind, tc.peak_tflops),
                          num_processes=pc)
  writer = MetricsWriter(workdir, int(tc.num_steps), start_step=step, event=event)
  last: dict[str, float] = {}
  val: dict[str, float] = {}
  preempted = False

  def put(local: dict[str, np.ndarray]) -> Batch:
    return Batch.from_dict(mesh_lib.global_batch(local, b_sharding))

  def evaluate() -> dict[str, float]:
    it = (eval_data or _default_eval_data)(config, pi, pc)
    if it is None:
      return {}
    sums: dict[str, float] = {}
    n = 0
    key = jax.random.key(tc.seed + 1)
    with mesh_lib.activate(mesh, config.mesh):
      for i in range(int(tc.eval_batches)):
        try:
          local = next(it)
        except StopIteration:
          break
        m = jax.device_get(eval_fn(state.params, put(local), jax.random.fold_in(key, i)))
        for k, v in m.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {k: v / n for k, v in sums.items()} if n else {}

  def save(force: bool = False) -> None:
    ckpt.save(step, state, iterator=data_iter, config=stored_config,
              metrics={f"val_{k}": v for k, v in val.items()} if val else None, force=force)

  stored_config = paths.portable_config()
  window_start, window_steps, window_stats = None, 0, []
  # A log step's metrics are fetched after the next step is dispatched, so the
  # device never waits on the host for them; `window_start` moves to the moment
  # they arrive, i.e. when the device finished that step.
  pending = None

  def flush() -> None:
    nonlocal pending, window_start, last
    if pending is None:
      return
    log_step, device_metrics, stats, steps = pending
    pending = None
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    if steps:
      # Throughput of the average step in the window: stats summed over its
      # batches divided by their total time.
      metrics.update(throughput(now - window_start, *(np.concatenate(s) for s in zip(*stats))))
      metrics["step_time"] = (now - window_start) / steps
    window_start = now
    last = writer.write(log_step, metrics)

  # The handler stays until the last save is written (close() waits for it):
  # a second signal must not cut that wait short.
  with StopSignals(defer=True) as preemption:
    try:
      while step < tc.num_steps:
        local = next(data_iter)
        batch = put(local)
        with mesh_lib.activate(mesh, config.mesh):
          state, metrics = step_fn(state, batch)
        step += 1
        flush()
        if window_start is None:
          # The first step after (re)start includes compilation: time from its end.
          jax.block_until_ready(metrics)
          window_start, window_steps, window_stats = time.perf_counter(), 0, []
        else:
          window_steps += 1
          window_stats.append((local["segment_ids"], local["image_ids"], local["image_valid"],
                               local["text_loss_mask"]))
        is_last = step == tc.num_steps or preemption.requested
        if step % tc.log_every == 0 or is_last:
          pending = (step, metrics, window_stats, window_steps)
          window_steps, window_stats = 0, []
        side_work = (is_last or on_step is not None or preemption.requested
                     or (tc.eval_every and step % tc.eval_every == 0)
                     or (sample_fn is not None and tc.sample_every
                         and step % tc.sample_every == 0)
                     or (tc.checkpoint_every and step % tc.checkpoint_every == 0))
        if side_work:
          flush()
        side_start = time.perf_counter()
        if tc.eval_every and (step % tc.eval_every == 0 or is_last):
          val = evaluate()
          if val:
            writer.write(step, val, prefix="val_")
        if sample_fn is not None and tc.sample_every and step % tc.sample_every == 0:
          sample_fn(state, step)
        if on_step is not None:
          on_step(step, last)
        if preemption.requested:
          preempted = True
          break
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
          save()
        # Evaluation, samples and saves are not training time.
        if window_start is not None:
          window_start += time.perf_counter() - side_start
      flush()
      save(force=True)
    finally:
      # Also on a crash: let in-flight async saves finish, close the files.
      ckpt.close()
      writer.close()
  if preempted:
    log.warning("stopped at step %d by %s; checkpoint saved in %s", step,
                signal.Signals(preemption.signum).name, workdir)
  return TrainResult(step=step, state=state, preempted=preempted, last_metrics=last)
