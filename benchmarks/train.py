"""Training throughput: tokens/s, step time and MFU of the sharded train step.

Runs the real train step (model, loss, AdamW, donation) on random packed
batches of a config at a chosen sequence length, over every local device, and
prints a JSON line last: {"tokens_per_s", "step_time_s", "mfu", "peak_memory_gib", ...}.
MFU counts model FLOPs as `tfjax/train/flops.py` defines them.

  python benchmarks/train.py --config=configs/transfusion_370m.py --seq_len=4096 \
      --batch_size=8 --config.model.remat_policy=nothing_saveable
  python benchmarks/train.py --config=configs/transfusion_370m.py --profile  # + time by part
  python benchmarks/train.py --quick        # tiny model on CPU, seconds
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tfjax.batch import Batch, batch_spec
from tfjax.config import validate
from tfjax.model import count_params, init_params
from tfjax.train import mesh as mesh_lib
from tfjax.train import profile as profile_lib
from tfjax.train.flops import peak_tflops, step_flops
from tfjax.train.optimizer import make_optimizer
from tfjax.train.state import create_train_state, state_shardings
from tfjax.train.step import jit_train_step, make_loss_fn
from tfjax.train.synthetic import synthetic_batch
from tfjax.train.xla_flags import set_cpu_flags, set_gpu_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file to benchmark.")
flags.DEFINE_integer("seq_len", 0, "Sequence length (0 = the config's data.seq_len).")
flags.DEFINE_integer("batch_size", 0, "Global batch (0 = the config's data.batch_size).")
flags.DEFINE_integer("doc_len", 0, "Packed document length (0 = seq_len / 4).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("quick", False, "Tiny model, short sequences: a CPU smoke run.")
flags.DEFINE_bool("profile", False, "Trace 3 more steps with jax.profiler and print the "
                  "step's time by part (attention, projections, MLP, head, ...).")
flags.DEFINE_string("profile_dir", "", "Where the trace goes (default: a temporary folder).")
flags.DEFINE_bool("text_only", False, "Batches without images (text documents only).")
flags.DEFINE_bool("xla_gpu_flags", True, "Set the trainer's XLA GPU flags "
                  "(tfjax/train/xla_flags.py), as tfjax-train does.")
flags.DEFINE_bool("xla_cpu_flags", True, "Set the trainer's XLA CPU flags "
                  "(tfjax/train/xla_flags.py), as tfjax-train does.")
flags.DEFINE_string("extra_xla_flags", "", "More XLA flags for this run (A/B of one flag).")
FLAGS = flags.FLAGS


def run(config, steps: int, warmup: int, doc_len: int, text_only: bool = False,
        profile_dir: str = "") -> dict:
  validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = make_optimizer(config.train)
  _, shardings = state_shardings(config, mesh, tx, init_params)
  state = create_train_state(config, mesh, tx, init_params)
  m = config.model
  spec = batch_spec(config.data.batch_size, config.data.seq_len,
                    config.data.max_images_per_seq, (m.latent_size, m.latent_size,
                                                     m.latent_channels))
  step_fn = jit_train_step(make_loss_fn(config), tx, config.train, mesh, shardings, spec,
                           config.mesh)
  locals_ = [synthetic_batch(config, i, doc_len=doc_len) for i in range(2)]
  batches = [Batch.from_dict(mesh_lib.global_batch(b, mesh_lib.batch_sharding(mesh, config.mesh)))
             for b in locals_]
  with mesh_lib.activate(mesh, config.mesh):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
      state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
      state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics)
    step_time = (time.perf_counter() - t0) / steps
    # CPU seconds per step: on a shared CPU machine, a load-independent measure.
    cpu_time = (time.process_time() - c0) / steps
    breakdown = None
    if profile_dir:
      traced = 3
      with jax.profiler.trace(profile_dir):
        t0 = time.perf_counter()
        for i in range(traced):
          state, metrics = step_fn(state, batches[i % 2])
        jax.block_until_ready(metrics)
        wall = time.perf_counter() - t0
      hlo = step_fn.lower(state, batches[0]).compile().as_text()
      breakdown = profile_lib.step_breakdown(profile_dir, hlo, "train_step", traced, wall)
      profile_lib.print_unattributed(profile_dir, hlo, "train_step")
  flops = np.mean([step_flops(m, b["segment_ids"], b["image_ids"],
                              text_loss_mask=b["text_loss_mask"]) for b in locals_])
  tokens = np.mean([(b["segment_ids"] != 0).sum() for b in locals_])
  dev = jax.devices()[0]
  peak = peak_tflops(dev.device_kind, config.train.peak_tflops)
  memory = dev.memory_stats() or {}
  if breakdown:
    print(profile_lib.format_table(breakdown))
  return dict(
      config=config.name, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
      doc_len=doc_len, attention_impl=m.attention_impl, dtype=m.dtype,
      remat=m.remat_policy, lm_head_chunk=m.get("lm_head_chunk", 0), text_only=text_only,
      params=count_params(state.params),
      peak_memory_gib=memory.get("peak_bytes_in_use", 0) / 2**30,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      devices=len(jax.devices()), device_kind=dev.device_kind, jax=jax.__version__,
      python=platform.python_version(), compile_s=round(compile_s, 2),
      loss=float(metrics["loss"]), tflops_per_device=flops / step_time / len(jax.devices()) / 1e12,
      peak_tflops=peak, cpu_s_per_step=cpu_time, tokens_per_s=tokens / step_time,
      step_time_s=step_time,
      mfu=flops / (step_time * len(jax.devices()) * peak * 1e12) if peak else 0.0,
      profile={name: round(ms, 3) for name, ms, _ in breakdown} if breakdown else None)


def main(argv):
  del argv
  if FLAGS.extra_xla_flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS.extra_xla_flags}".strip()
  if FLAGS.profile:
    # Command buffers (CUDA graphs) report their kernels under the graph's
    # launch, not the HLO op each came from: off while tracing.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()
  set_gpu_flags(FLAGS.xla_gpu_flags)
  set_cpu_flags(FLAGS.xla_cpu_flags)
  config = FLAGS.config
  if FLAGS.quick:
    config.model.dim, config.model.num_layers = 64, 2
    config.model.num_heads = config.model.num_kv_heads = 4
    config.data.seq_len, config.data.batch_size = 128, 8
  if FLAGS.seq_len:
    config.data.seq_len = FLAGS.seq_len
  if FLAGS.batch_size:
    config.data.batch_size = FLAGS.batch_size
  elif config.train.get("device_microbatch", 0) and not FLAGS.quick:
    # One micro-step of the config's GPU default: its rows on every device.
    config.data.batch_size = config.train.device_microbatch * jax.local_device_count()
  config.train.grad_accum_steps = 1
  config.train.device_microbatch = 0
  if FLAGS.text_only:
    config.data.max_images_per_seq = 0
  doc_len = FLAGS.doc_len or config.data.seq_len // 4
  steps = 3 if FLAGS.quick else FLAGS.steps
  warmup = 1 if FLAGS.quick else FLAGS.warmup
  profile_dir = ""
  if FLAGS.profile:
    profile_dir = FLAGS.profile_dir or tempfile.mkdtemp(prefix="tfjax_trace_")
    # The table needs the compiled HLO's metadata: a second compile of the
    # step, which the persistent cache turns into a lookup.
    jax.config.update("jax_compilation_cache_dir", os.path.join(profile_dir, "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  result = run(config, steps, warmup, doc_len, FLAGS.text_only, profile_dir)
  print(f"| {result['config']} | remat {result['remat']} | head chunk {result['lm_head_chunk']} "
        f"| batch {result['batch_size']} x {result['seq_len']} | {result['tokens_per_s']:,.0f} "
        f"tokens/s | {result['step_time_s']:.4f} s | MFU {100 * result['mfu']:.1f}% "
        f"| peak {result['peak_memory_gib']:.1f} GiB |")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
