"""tfjax-edit-data: build the image-editing set and its latent cache.

  tfjax-edit-data --config=configs/edit_tiny.py \
      --config.data.dir=/tmp/tfjax_tiny/data --config.vae.path=/tmp/tfjax_tiny/vae

With editing.source=shapes it writes the shapes editing set (train, validation,
test) in the folder format to editing.dir (default DATA_DIR/editing); with
folder:PATH it reads your pairs + JSONL there. Either way it encodes both
images of every example with the VAE into editing.latents (default
DATA_DIR/editing_latents). Splits already built are kept; delete a directory
to rebuild it (e.g. after changing the VAE).
"""
from __future__ import annotations

import json
import logging

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import load_config, run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override any key with --config.KEY=VALUE.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Root of built data (default: the config's data.dir).")
_VAE = flags.DEFINE_string(
    "vae", None, "VAE directory for tfjax.vae.load (default: the config's vae.path).")
_PIXEL_PATCH = flags.DEFINE_bool(
    "pixel_patch", False, "Use the fixed PixelPatchEncoder stand-in instead of a VAE (tests).")
_IMAGES_ONLY = flags.DEFINE_bool(
    "images_only", False, "Write the shapes editing set in the folder format and stop (no VAE).")


def _encoder(config):
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.data.latents import PixelPatchEncoder
  if _PIXEL_PATCH.value:
    down = config.data.image_size // config.model.latent_size
    return PixelPatchEncoder(downsample=down, channels=config.model.latent_channels)
  path = _VAE.value or config.vae.path
  if not path:
    raise SystemExit("give --vae=PATH or --config.vae.path=PATH: the VAE the model was "
                     "pretrained with")
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.vae import load
  return load(path)


def _main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.data import editing_pipeline
  config = load_config(_CONFIG.value)
  if config.editing.source == "none":
    raise SystemExit("config key editing.source is 'none': set shapes or folder:PATH")
  if _IMAGES_ONLY.value:
    if config.editing.source != "shapes":
      raise SystemExit("--images_only applies to editing.source=shapes")
    print(json.dumps(editing_pipeline.build_editing_set(config, _DATA_DIR.value), indent=2))
    return
  report = editing_pipeline.build_editing_latents(config, _DATA_DIR.value, _encoder(config))
  print(json.dumps({"latents": editing_pipeline.latent_dir(config, _DATA_DIR.value),
                    "splits": {k: v["num_records"] for k, v in report.items()}}, indent=2))


def main():
  run(_main, __name__)


if __name__ == "__main__":
  main()
