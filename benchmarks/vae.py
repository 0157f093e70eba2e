"""VAE throughput: encode and decode images/s at 256x256.

  python benchmarks/vae.py [--quick] [--config=configs/vae_f8c8.py] [--batch=32]
                           [--dtype=float32|bfloat16] [--out=result.json]

Builds the config's AutoencoderKL with random weights (throughput does not
depend on the values), jit-compiles encode (posterior mean) and decode, and
times `--iters` calls after one warm-up call. --quick uses the tiny widths
(configs/vae_tiny.py) and a batch of 2 so it runs on a CPU in seconds; the
image size stays 256. Prints a table, then the JSON on the last line.
"""
from __future__ import annotations

import os
import time

from absl import app, flags

from tfjax.bench.report import print_result
from tfjax.config import load_config_file

_QUICK = flags.DEFINE_bool("quick", False, "Tiny widths, batch 2, 2 iterations (CPU smoke run).")
_CONFIG = flags.DEFINE_string("config", "configs/vae_f8c8.py", "Config file with the vae section.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per call.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per direction.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: the config's vae.dtype).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")


def _time(fn, arg, iters: int) -> float:
  import jax
  jax.block_until_ready(fn(arg))   # compile + warm-up
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(arg)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def main(argv) -> None:
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tfjax.vae.autoencoder import AutoencoderKL, config_from_vae_section
  from tfjax.vae.io import LoadedVAE

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg_path = os.path.join(root, "configs/vae_tiny.py") if _QUICK.value else _CONFIG.value
  config = load_config_file(cfg_path)
  if _DTYPE.value:
    config.vae.dtype = _DTYPE.value
  batch = 2 if _QUICK.value else _BATCH.value
  iters = 2 if _QUICK.value else _ITERS.value
  arch = config_from_vae_section(config.vae)
  module = AutoencoderKL(arch)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  vae = LoadedVAE(module, params, 1.0, 0.0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, _SIZE.value, _SIZE.value, 3)),
                  jnp.float32)
  enc_s = _time(vae.encode, x, iters)
  z = vae.encode(x)
  dec_s = _time(vae.decode, z, iters)
  result = {
      "device": jax.devices()[0].device_kind, "config": os.path.basename(cfg_path),
      "dtype": config.vae.dtype, "batch": batch, "image_size": _SIZE.value,
      "latent_shape": list(z.shape[1:]),
      "params_m": sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) / 1e6,
      "encode_images_per_s_256": batch / enc_s, "decode_images_per_s_256": batch / dec_s,
  }
  if _SIZE.value != 256:   # keep the keys honest about the size they measured
    result[f"encode_images_per_s_{_SIZE.value}"] = result.pop("encode_images_per_s_256")
    result[f"decode_images_per_s_{_SIZE.value}"] = result.pop("decode_images_per_s_256")
  print_result(result, _OUT.value)


if __name__ == "__main__":
  app.run(main)
