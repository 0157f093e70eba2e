"""tfjax-compile: will this config fit on that pod? Compile it here and see.

Compiles the sharded train step ahead of time for a TPU topology on an
ordinary CPU machine (libtpu's topology descriptions, from `pip install
jax[tpu]`; no TPU needed) or for the local devices, and prints per-chip memory
(arguments, temporaries, total) against the chip's HBM.

  tfjax-compile --config=configs/transfusion_160m.py --topology=v5p:4x4x4 \
      --config.mesh.data=1 --config.mesh.fsdp=-1
  tfjax-compile --config=configs/transfusion_7b.py --topology=v5p:8x8x4 --markdown
  tfjax-compile --config=configs/tiny.py --topology=local    # e.g. on a GPU host

Exit status 0 when it fits (or HBM is unknown), 3 when it does not.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys

# libtpu takes a machine-wide lock unless told that several processes may load
# it; compiling for a topology needs no TPU, so share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import load_config, run

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); override keys "
                                "with --config.section.key=value.", lock_config=True)
flags.DEFINE_string("topology", "local", "A TPU topology such as v5p:8x8x8, v5e:16x16, "
                    "v4:4x4x4, or 'local' for this machine's devices.")
flags.DEFINE_bool("markdown", False, "Also print one Markdown table row (benchmarks/RESULTS.md).")
flags.DEFINE_bool("json", False, "Also print the report as one JSON line.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# libtpu's names for the TPU generations users know.
_ALIASES = {"v5p": "v5", "v5e": "v5litepod", "v6e": "v6e", "v4": "v4"}


def libtpu_name(topology: str) -> str:
  """"v5p:4x4x4" -> "v5:4x4x4" (libtpu's spelling); others pass through."""
  m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", topology)
  if not m:
    return topology
  return f"{_ALIASES.get(m.group(1), m.group(1))}:{m.group(2)}"


def _run(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.train.aot import compile_train_step, topology_devices
  config = load_config(FLAGS.config)
  if FLAGS.topology not in ("", "local"):
    # Only the topology's abstract devices are used: keep the runtime on CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  devices = topology_devices(libtpu_name(FLAGS.topology))
  _, report = compile_train_step(config, devices, topology=FLAGS.topology)
  print(report.table())
  if FLAGS.markdown:
    print(report.markdown_row())
  if FLAGS.json:
    out = dict(vars(report), total_bytes=report.total_bytes, fits=report.fits)
    print(json.dumps(out))
  sys.exit(3 if report.fits is False else 0)


def main():
  run(_run, __name__)


if __name__ == "__main__":
  main()
