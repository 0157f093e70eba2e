"""Latent job throughput: images/s from WebDataset JPEG shards into the latent
cache, beside the VAE's encode-only figure (benchmarks/vae.py) in one process.

  python benchmarks/data_latents.py [--quick] [--config=configs/vae_f8c8.py] [--batch=32]
                                    [--images=4096] [--shards=8] [--threads=16] [--out=r.json]

Writes `--images` JPEGs (shapes scenes with noise, 4:3, shorter side
`--source_size`, quality 90: what img2dataset's keep_ratio resize gives) into
`--shards` tar shards in a temporary directory, builds the config's
AutoencoderKL with random weights, and measures, at `--size` pixels:

  encode_images_per_s   jitted encode of one device-resident batch (vae.py's figure)
  prepare_images_per_s  JPEG decode + RGB + resize + crop on `--threads` host threads
  job_images_per_s      `tfjax-data latents`' job end to end (read, prepare, encode on
                        every local device, write bf16 ArrayRecord), after a warm-up
                        job on one shard compiled the programs
  job_vs_encode         job_images_per_s / (encode_images_per_s * local devices)

--quick: the tiny VAE, 64 images of 64 pixels in 2 shards, batch 8 (a CPU smoke
run). Prints a table, then the JSON on the last line.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import tarfile
import tempfile
import time

from absl import app, flags

from tfjax.bench.report import print_result
from tfjax.config import load_config_file

_QUICK = flags.DEFINE_bool("quick", False, "Tiny VAE, 64 small images (CPU smoke run).")
_CONFIG = flags.DEFINE_string("config", "configs/vae_f8c8.py", "Config file with the vae section.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per VAE call (data.latents_batch_size).")
_IMAGES = flags.DEFINE_integer("images", 4096, "Images in the shard set.")
_SHARDS = flags.DEFINE_integer("shards", 8, "Tar shards.")
_SIZE = flags.DEFINE_integer("size", 256, "Model image side (data.image_size).")
_SOURCE = flags.DEFINE_integer("source_size", 288, "Shorter side of the JPEGs in the shards.")
_THREADS = flags.DEFINE_integer("threads", 16, "Preparation threads (data.prepare_threads).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed encode-only calls.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")


def _jpegs(num: int, short: int, threads: int) -> list[bytes]:
  """`num` noisy 4:3 JPEGs (shapes scenes), encoded on `threads` threads."""
  import numpy as np
  from PIL import Image

  from tfjax.data import shapes
  base, _, _ = shapes.generate_split("train", min(num, 64), short, 0)
  long = short * 4 // 3

  def one(i: int) -> bytes:
    rng = np.random.default_rng(i)
    img = np.empty((short, long, 3), np.uint8)
    img[:] = base[i % len(base)][0, 0]
    off = (long - short) // 2
    img[:, off:off + short] = base[i % len(base)]
    noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(one, range(num)))


def _write_shards(out_dir: str, jpegs: list[bytes], num_shards: int, start: int = 0) -> None:
  os.makedirs(out_dir, exist_ok=True)
  per = -(-len(jpegs) // num_shards)
  for s in range(num_shards):
    with tarfile.open(os.path.join(out_dir, f"{start + s:05d}.tar"), "w") as tar:
      for j in range(s * per, min(len(jpegs), (s + 1) * per)):
        for ext, data in (("jpg", jpegs[j]), ("txt", f"a picture number {j}".encode())):
          info = tarfile.TarInfo(f"{j:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


def main(argv) -> None:
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tfjax.config import default_config
  from tfjax.data import latent_job, prepare
  from tfjax.vae.autoencoder import AutoencoderKL, config_from_vae_section
  from tfjax.vae.io import LoadedVAE

  quick = _QUICK.value
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg_path = os.path.join(root, "configs/vae_tiny.py") if quick else _CONFIG.value
  vae_config = load_config_file(cfg_path)
  batch = 8 if quick else _BATCH.value
  num = 64 if quick else _IMAGES.value
  num_shards = 2 if quick else _SHARDS.value
  size = 64 if quick else _SIZE.value
  source = 72 if quick else _SOURCE.value
  threads = min(4, _THREADS.value) if quick else _THREADS.value
  iters = 2 if quick else _ITERS.value

  module = AutoencoderKL(config_from_vae_section(vae_config.vae))
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  vae = LoadedVAE(module, params, 1.0, 0.0)

  # Encode only, as benchmarks/vae.py: one batch already on the device.
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
  jax.block_until_ready(vae.encode(x))
  t = time.perf_counter()
  for _ in range(iters):
    z = vae.encode(x)
  jax.block_until_ready(z)
  encode_s = (time.perf_counter() - t) / iters

  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    jpegs = _jpegs(num + batch, source, threads)
    make_s = time.perf_counter() - t
    _write_shards(os.path.join(tmp, "warm"), jpegs[num:], 1)
    _write_shards(os.path.join(tmp, "wds"), jpegs[:num], num_shards)

    policy = prepare.ImagePolicy(size=size, min_size=size // 2)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      t = time.perf_counter()
      list(pool.map(lambda b: prepare.prepare_image(b, policy), jpegs[:num]))
      prepare_s = time.perf_counter() - t

    c = default_config()
    c.data.update(image_size=size, latents_batch_size=batch, prepare_threads=threads)
    c.data.image_text_source = f"webdataset:{tmp}/warm/*.tar"
    latent_job.run_latent_job(c, vae, os.path.join(tmp, "warm_out"), process_index=0,
                              process_count=1, progress=False)
    c.data.image_text_source = f"webdataset:{tmp}/wds/*.tar"
    t = time.perf_counter()
    report = latent_job.run_latent_job(c, vae, os.path.join(tmp, "out"), process_index=0,
                                       process_count=1, progress=False)
    job_s = time.perf_counter() - t
  written = sum(report["written"].values())
  assert written == num and report["complete"], report
  devices = jax.local_device_count()
  result = {
      "device": jax.devices()[0].device_kind, "local_devices": devices,
      "config": os.path.basename(cfg_path), "dtype": vae_config.vae.dtype, "batch": batch,
      "image_size": size, "source_jpeg": f"{source * 4 // 3}x{source}", "images": num,
      "shards": num_shards, "threads": threads, "cpus": os.cpu_count(),
      "encode_images_per_s": batch / encode_s,
      "prepare_images_per_s": num / prepare_s,
      "job_images_per_s": written / job_s,
      "job_vs_encode": written / job_s / (batch / encode_s * devices),
      "shard_set_write_s": make_s,
  }
  print_result(result, _OUT.value)


if __name__ == "__main__":
  app.run(main)
