"""tfjax-train: train a Transfusion model from a config, every stage included.

  tfjax-train --config=configs/tiny.py --workdir=/tmp/tiny
  tfjax-train --config=configs/transfusion_160m.py --workdir=/mnt/runs/160m \
      --config.train.num_steps=1000 --stages=train

Without --stages it runs the embedded main job (dataset, tokenizer, VAE,
latents, training, samples, report), skipping whatever already exists in the
workdir; a workdir holding a checkpoint resumes from it. SIGTERM or SIGINT
saves a checkpoint and ends the command with exit status 75 (run it again to
resume); a user mistake exits 2 (tfjax/cli/common.py lists the statuses).
"""
from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import check_workdir, load_config, quiet_orbax, run
from tfjax.train.xla_flags import set_cpu_flags, set_gpu_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); override keys "
                                "with --config.section.key=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: data, VAE, checkpoints, metrics, report.")
flags.DEFINE_list("stages", "data,vae,latents,train,samples,report",
                  "Stages to run, in order; finished ones are skipped anyway.")
flags.DEFINE_integer("num_samples", 32, "Held-out captions and images the samples stage "
                     "generates from and scores.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize: auto = when a launcher's cluster "
                  "variables are present.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _run(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  quiet_orbax()
  check_workdir(FLAGS.workdir)
  config = load_config(FLAGS.config)
  set_gpu_flags(config.train.get("xla_gpu_flags", True))  # before JAX starts its backends
  set_cpu_flags(config.train.get("xla_cpu_flags", True))
  # Local: JAX loads after the flags parse (--help answers at once) and after the
  # XLA flags are set (no import may start a backend before that).
  from tfjax.jobs import transfusion  # pylint: disable=g-import-not-at-top
  from tfjax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.distributed)
  transfusion.run(config, FLAGS.workdir, stages=FLAGS.stages,  # logs "stage seconds"
                  num_samples=FLAGS.num_samples)


def main():
  run(_run, __name__)


if __name__ == "__main__":
  main()
