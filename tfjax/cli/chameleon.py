"""tfjax-chameleon: the Chameleon baseline end to end from a config.

  tfjax-chameleon --config=configs/chameleon_tiny.py --workdir=/tmp/chameleon_tiny
  tfjax-chameleon --config=configs/chameleon_tiny.py --workdir=DIR --stages=eval

Stages: data (dataset + tokenizer), vq (VQ-VAE training, or vae.path), tokens
(VQ codes of the images), train (LM loss over text and image tokens), eval
(tfjax.eval.suite: text->image with CFG on logits, captioning, text
perplexity -> WORKDIR/eval).
Finished stages are reused and training resumes from WORKDIR/checkpoints.
"""
from __future__ import annotations

import json
import logging

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import check_workdir, load_config, quiet_orbax, run

config_flags.DEFINE_config_file("config", None, "Chameleon config file (e.g. "
                                "configs/chameleon_tiny.py); override keys with "
                                "--config.section.key=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: data, VQ-VAE, checkpoints, eval.")
flags.DEFINE_list("stages", "data,vq,tokens,train,eval", "Stages to run, in order.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _run(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.jobs import chameleon
  quiet_orbax()
  check_workdir(FLAGS.workdir)
  out = chameleon.run(load_config(FLAGS.config), FLAGS.workdir, stages=FLAGS.stages)
  if "eval" in out:
    print(json.dumps({k: out["eval"].get(k) for k in (
        "shapes_accuracy", "caption_cider", "caption_scene_accuracy", "perplexity")}))


def main():
  run(_run, __name__)


if __name__ == "__main__":
  main()
