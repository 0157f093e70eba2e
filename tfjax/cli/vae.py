"""tfjax-vae: train, use and import image autoencoders.

  tfjax-vae train  --config=configs/vae_tiny.py --workdir=DIR
      train the config's VAE (vae.kind kl | vq) into DIR/vae, with PSNR/SSIM on
      the validation split and DIR/vae/recon_grid.png; skipped when complete
  tfjax-vae encode --config=configs/vae_tiny.py --vae=DIR/vae --out=latents.npy
                   [--images=images.npy] [--num_images=256]
      encode uint8 [n, H, W, 3] images (default: the validation split) to
      unscaled posterior-mean latents (VQ: also code ids in OUT_ids.npy) and
      print reconstruction PSNR/SSIM
  tfjax-vae import --diffusers=HF_DIR --workdir=DIR
      convert a diffusers AutoencoderKL directory (config.json +
      diffusion_pytorch_model.safetensors) into the tfjax VAE directory DIR/vae

Any config key can be overridden: --config.vae.train_steps=100.
"""
from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags
import numpy as np

from tfjax.cli.common import check_workdir, load_config, run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override any key with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "train/import: run directory; the VAE is written to WORKDIR/vae.")
_VAE = flags.DEFINE_string(
    "vae", None, "encode: VAE directory (tfjax or diffusers; default: the config's vae.path).")
_IMAGES = flags.DEFINE_string(
    "images", None, "encode: .npy file of uint8 [n, H, W, 3] images (default: validation split).")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 256, "encode: validation images to draw when --images is not given.")
_OUT = flags.DEFINE_string("out", None, "encode: output .npy file for the latents.")
_DIFFUSERS = flags.DEFINE_string(
    "diffusers", None, "import: diffusers AutoencoderKL directory to convert.")

COMMANDS = ("train", "encode", "import")


def _train(config) -> None:
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.vae.io import META_FILE
  from tfjax.vae.train import train_vae
  path = train_vae(config, check_workdir(_WORKDIR.value))
  with open(os.path.join(path, META_FILE)) as f:
    print(json.dumps({"path": path, **json.load(f).get("metrics", {})}, indent=2))


def _encode(config) -> None:

  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.vae import load
  from tfjax.vae.train import evaluate, load_images, to_float
  path = _VAE.value or config.vae.path
  if not path:
    raise SystemExit("encode: give --vae=DIR (or the config key vae.path)")
  if not _OUT.value:
    raise SystemExit("encode: --out=FILE.npy is required")
  vae = load(path)
  if _IMAGES.value:
    images = np.load(_IMAGES.value)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise SystemExit(f"encode: {_IMAGES.value} must hold uint8 [n, H, W, 3], got "
                       f"{images.dtype} {images.shape}")
  else:
    images = load_images(config, "validation", _NUM_IMAGES.value)
  batch = int(config.vae.batch_size)
  x = to_float(images)
  latents = np.concatenate([np.asarray(vae.encode(x[i:i + batch]))
                            for i in range(0, len(x), batch)])
  np.save(_OUT.value, latents)
  if vae.kind == "vq":
    ids = np.concatenate([np.asarray(vae.encode_tokens(x[i:i + batch]))
                          for i in range(0, len(x), batch)])
    np.save(os.path.splitext(_OUT.value)[0] + "_ids.npy", ids)
  scores, _ = evaluate(vae, images, batch)
  print(json.dumps({"out": _OUT.value, "latents_shape": list(latents.shape),
                    "scale": vae.scale, "shift": vae.shift, **scores}, indent=2))


def _import() -> None:
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.vae import diffusers_import, io
  if not (_DIFFUSERS.value and _WORKDIR.value):
    raise SystemExit("import: --diffusers=DIR and --workdir=DIR are required")
  if not os.path.isdir(_DIFFUSERS.value):
    raise SystemExit(f"import: --diffusers={_DIFFUSERS.value}: no such directory")
  arch, params, scale, shift = diffusers_import.load_diffusers(_DIFFUSERS.value)
  meta = {"kind": "kl", "architecture": arch.to_json(), "scale": scale, "shift": shift,
          "downsample": arch.downsample, "latent_channels": arch.latent_channels,
          "source": os.path.abspath(_DIFFUSERS.value)}
  out = io.save(os.path.join(_WORKDIR.value, "vae"), meta, params)
  print(json.dumps({"path": out, **meta}, indent=2))


def _main(argv) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"usage: tfjax-vae {{{'|'.join(COMMANDS)}}} --config=... "
                     f"(got {argv[1:]})")
  if argv[1] == "import":
    _import()
    return
  config = load_config(_CONFIG.value)
  {"train": _train, "encode": _encode}[argv[1]](config)


def main() -> None:
  run(_main, __name__)


if __name__ == "__main__":
  main()
