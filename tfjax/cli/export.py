"""tfjax-export: a training run's checkpoint as a self-contained model directory.

  tfjax-export --workdir=RUN --out=DIR [--dtype=bfloat16|float32] [--step=N]

DIR gets params.safetensors (parameters only, EMA when the run kept one),
config.json, tokenizer/ and vae/; `tfjax.export.load_pretrained(DIR)` and
`tfjax-generate --model=DIR` read it on any single device.
"""
from __future__ import annotations

import json
import logging
import os

from absl import flags

from tfjax.cli.common import quiet_orbax, run

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (with checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Export directory to write (replaced if it exists).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Parameter dtype in the export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NO_EMA = flags.DEFINE_bool("raw_params", False, "Export the raw params even when EMA exists.")


def _main(argv) -> None:
  del argv
  if not _WORKDIR.value or not _OUT.value:
    raise SystemExit("--workdir and --out are required")
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.checkpoints import EXPORT_META
  from tfjax.export import export
  quiet_orbax(logging.ERROR)
  out = export(_WORKDIR.value, _OUT.value, _DTYPE.value, _STEP.value, not _NO_EMA.value)
  with open(os.path.join(out, EXPORT_META)) as f:
    print(json.dumps(json.load(f), indent=2))


def main() -> None:
  run(_main, __name__)


if __name__ == "__main__":
  main()
