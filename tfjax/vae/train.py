"""Train the config's autoencoder and write the directory `tfjax.vae.load` reads.

Loss (paper, following LDM): L1 + perceptual + 0.5 * patch-GAN (after
`vae.gan_start_step`) + 1e-6 * KL, or for the VQ-VAE the codebook and
commitment terms in place of the KL. At the end the latent shift and scale are
measured on training images, PSNR/SSIM on the validation split, and an
input/reconstruction grid is written next to the weights.
"""
from __future__ import annotations

import io as _io
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from tfjax.data import shapes
from tfjax.vae import io, losses, metrics
from tfjax.vae.autoencoder import config_from_vae_section
from tfjax.vae.vq import codebook_usage


def vae_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Metadata (`tfjax_vae.json` minus measured values) for the config's VAE."""
  v = config.vae
  if v.kind not in ("kl", "vq"):
    raise ValueError(f"config key vae.kind: unknown {v.kind!r} (kl | vq)")
  return {"kind": v.kind, "architecture": config_from_vae_section(v).to_json(),
          "codebook_size": int(v.codebook_size), "codebook_dim": int(v.codebook_dim),
          "commitment_beta": float(v.commitment_beta), "image_size": image_size(config)}


def image_size(config: ml_collections.ConfigDict) -> int:
  return int(config.vae.image_size or config.data.image_size)


def load_images(config: ml_collections.ConfigDict, split: str, num: int) -> np.ndarray:
  """uint8 `[num, S, S, 3]` training images from `data.image_text_source`."""
  source = config.data.image_text_source
  if source == "shapes":
    # Imported here: the VAE room sits below data, and only training needs images.
    seed = int(config.vae.seed) + (0 if split == "train" else 1)
    return shapes.generate_split(split, num, image_size(config), seed,
                                 shapes.SceneOptions.from_config(config.data))[0]
  raise ValueError(f"config key data.image_text_source: VAE training supports 'shapes' "
                   f"here, got {source!r}; pass images to train_vae() or set vae.path")


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 `[b, H, W, 3]` -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


class _Steps:
  """The jitted generator and discriminator updates for one config."""

  def __init__(self, config: ml_collections.ConfigDict, module, perceptual):
    v = config.vae
    self.kind = v.kind
    self.module = module
    sched = optax.warmup_cosine_decay_schedule(
        0.0, v.learning_rate, max(1, min(v.warmup_steps, v.train_steps - 1)),
        max(v.train_steps, 2), end_value=0.1 * v.learning_rate)
    self.opt = optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adam(sched, b1=v.adam_b1, b2=v.adam_b2))
    self.disc = losses.PatchDiscriminator(v.disc_channels, v.disc_layers)
    self.disc_opt = optax.adam(sched, b1=0.5, b2=0.9)
    self.perceptual = perceptual
    self.sample_posterior = bool(v.sample_posterior)
    self.weights = {k: float(v[k]) for k in
                    ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "gan_weight")}
    self.gen_step = jax.jit(self._gen_step, static_argnums=(5,), donate_argnums=(0, 1))
    self.disc_step = jax.jit(self._disc_step, donate_argnums=(0, 1))

  def _gen_loss(self, params, disc_params, x, rng, use_gan):
    w = self.weights
    if self.kind == "kl":
      recon, post = self.module.apply({"params": params}, x,
                                       rng if self.sample_posterior else None)
      reg = w["kl_weight"] * losses.kl_per_element(post.kl(), x.shape[1:])
    else:
      recon, aux = self.module.apply({"params": params}, x)
      reg = aux["vq_loss"]
    l1 = losses.l1_loss(recon, x)
    total = w["l1_weight"] * l1 + w["l2_weight"] * losses.l2_loss(recon, x) + reg
    logs = {"l1": l1, "reg": reg, "psnr": jnp.mean(metrics.psnr(recon, x))}
    if self.perceptual is not None:
      net, pparams = self.perceptual
      p = losses.perceptual_loss(net, pparams, recon, x)
      total += w["perceptual_weight"] * p
      logs["perceptual"] = p
    if use_gan:
      g = losses.generator_gan_loss(self.disc.apply({"params": disc_params}, recon))
      total += w["gan_weight"] * g
      logs["gan_g"] = g
    logs["loss"] = total
    return total, (logs, recon)

  def _gen_step(self, params, opt_state, disc_params, x, rng, use_gan):
    grads, (logs, recon) = jax.grad(self._gen_loss, has_aux=True)(
        params, disc_params, x, rng, use_gan)
    updates, opt_state = self.opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, logs, recon

  def _disc_step(self, disc_params, disc_opt_state, x, recon):
    def loss_fn(dp):
      real = self.disc.apply({"params": dp}, x)
      fake = self.disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
      return losses.hinge_d_loss(real, fake)
    loss, grads = jax.value_and_grad(loss_fn)(disc_params)
    updates, disc_opt_state = self.disc_opt.update(grads, disc_opt_state, disc_params)
    return optax.apply_updates(disc_params, updates), disc_opt_state, loss


def _random_crop(images: np.ndarray, crop: int, step: int, rng: np.random.Generator
                 ) -> np.ndarray:
  """One `crop` x `crop` window per image `[b, crop, crop, 3]`, its corner on the
  latent grid (multiples of `step`), so a crop sees what the full image would."""
  size = images.shape[1]
  if crop == size:
    return images
  ys = rng.integers(0, (size - crop) // step + 1, len(images)) * step
  xs = rng.integers(0, (size - crop) // step + 1, len(images)) * step
  return np.stack([im[y:y + crop, x:x + crop] for im, y, x in zip(images, ys, xs)])


def _batched(fn: Callable[[np.ndarray], Any], data: np.ndarray, batch: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(data[i:i + batch])) for i in range(0, len(data), batch)])


def evaluate(vae: io.LoadedVAE, images: np.ndarray, batch: int = 32
             ) -> tuple[dict[str, float], np.ndarray]:
  """PSNR/SSIM (and VQ codebook usage) of `vae` on uint8 `images`; returns
  (metrics, reconstructions in [-1, 1])."""
  x = to_float(images)
  recon = _batched(lambda b: vae.decode(vae.encode(b)), x, batch)
  out = {"psnr": float(np.mean(_batched(lambda i: metrics.psnr(recon[i], x[i]),
                                        np.arange(len(x)), batch))),
         "ssim": float(np.mean(_batched(lambda i: metrics.ssim(recon[i], x[i]),
                                        np.arange(len(x)), batch)))}
  if vae.kind == "vq":
    ids = _batched(vae.encode_tokens, x, batch)
    out.update(codebook_usage(jnp.asarray(ids), vae.codebook_size))
  return out, recon


def measure_scale_shift(vae: io.LoadedVAE, images: np.ndarray, batch: int = 32
                        ) -> tuple[float, float]:
  """shift = mean and scale = 1 / std of posterior-mean latents over `images`."""
  z = _batched(vae.encode, to_float(images), batch).astype(np.float64)
  return float(1.0 / max(z.std(), 1e-6)), float(z.mean())


def _png(grid: np.ndarray) -> bytes:
  buf = _io.BytesIO()
  Image.fromarray(grid).save(buf, format="PNG")
  return buf.getvalue()


def train_vae(config: ml_collections.ConfigDict, workdir: str,
              images: np.ndarray | None = None, val_images: np.ndarray | None = None) -> str:
  """Train the config's VAE into `workdir/vae` and return that path.

  Does nothing when `vae.path` names a VAE (returned as is) or when
  `workdir/vae` is already complete.

  Args:
    config: a full tfjax config (the `vae` and `data` sections are read).
    workdir: run directory.
    images, val_images: uint8 `[n, S, S, 3]`; default: drawn from
      `data.image_text_source` (`vae.num_train_images`, `vae.num_val_images`).
  """
  v = config.vae
  if v.path:
    io.load(v.path)  # fail now, naming the path, if it is not a VAE
    logging.info("vae: using %s (vae.path); no training", v.path)
    return v.path
  out = os.path.join(workdir, "vae")
  if io.is_complete(out):
    logging.info("vae: %s is complete; skipping training", out)
    return out
  if os.path.exists(out):   # fail before training, not after
    raise FileExistsError(f"{out} exists but is not a complete VAE directory; delete it")
  meta = vae_meta(config)
  if images is None:
    images = load_images(config, "train", int(v.num_train_images))
  if val_images is None:
    val_images = load_images(config, "validation", int(v.num_val_images))
  perceptual = None
  if v.perceptual_weights:
    perceptual = losses.load_perceptual(v.perceptual_weights)
    logging.info("vae: perceptual loss on (%s)", v.perceptual_weights)
  else:
    logging.info("vae: perceptual loss OFF (config key vae.perceptual_weights is empty)")
  use_gan_ever = v.gan_weight > 0 and v.gan_start_step < v.train_steps
  logging.info("vae: patch-GAN %s", f"on from step {v.gan_start_step}" if use_gan_ever
               else "OFF (vae.gan_weight = 0 or vae.gan_start_step >= vae.train_steps)")

  module = io.build_module(meta)
  steps = _Steps(config, module, perceptual)
  rng = jax.random.key(int(v.seed))
  rng, init_rng, disc_rng = jax.random.split(rng, 3)
  size = images.shape[1]
  x0 = jnp.zeros((1, int(v.train_crop) or size, int(v.train_crop) or size, 3), jnp.float32)
  params = jax.jit(module.init)(init_rng, x0)["params"]
  opt_state = steps.opt.init(params)
  disc_params = steps.disc.init(disc_rng, x0)["params"] if use_gan_ever else {}
  disc_opt_state = steps.disc_opt.init(disc_params)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  logging.info("vae: %s, %d params, %d train / %d val images of %dx%d, %d steps of batch %d",
               v.kind, n_params, len(images), len(val_images), size, size, v.train_steps,
               v.batch_size)

  np_rng = np.random.default_rng(int(v.seed))
  down = io.AutoencoderConfig.from_json(meta["architecture"]).downsample
  crop = int(v.train_crop) or size
  if crop % down or crop > size:
    raise ValueError(f"config key vae.train_crop: {crop} must be a multiple of the "
                     f"downsampling factor {down} and at most the image size {size}")
  start = time.time()
  for step in range(int(v.train_steps)):
    idx = np_rng.integers(0, len(images), int(v.batch_size))
    batch = to_float(_random_crop(images[idx], crop, down, np_rng))
    flip = np_rng.random(len(idx)) < 0.5
    batch[flip] = batch[flip][:, :, ::-1]
    rng, step_rng = jax.random.split(rng)
    use_gan = use_gan_ever and step >= v.gan_start_step
    x = jnp.asarray(batch)
    params, opt_state, logs, recon = steps.gen_step(params, opt_state, disc_params, x,
                                                    step_rng, use_gan)
    if use_gan:
      disc_params, disc_opt_state, d_loss = steps.disc_step(disc_params, disc_opt_state, x, recon)
      logs = {**logs, "gan_d": d_loss}
    if (step + 1) % int(v.log_every) == 0 or step + 1 == v.train_steps:
      logs = {k: float(val) for k, val in logs.items()}
      logging.info("vae step %d/%d (%.1fs): %s", step + 1, v.train_steps, time.time() - start,
                   " ".join(f"{k}={val:.4g}" for k, val in sorted(logs.items())))

  vae = io.LoadedVAE(module, params, 1.0, 0.0, v.kind)
  if v.kind == "kl":
    vae.scale, vae.shift = measure_scale_shift(vae, images[:int(v.scale_images)], v.batch_size)
  scores, recon = evaluate(vae, val_images, int(v.batch_size))
  scores["train_seconds"] = time.time() - start
  logging.info("vae: validation %s; latent scale %.4g shift %.4g",
               " ".join(f"{k}={val:.4g}" for k, val in scores.items()), vae.scale, vae.shift)
  grid = metrics.image_grid(to_float(val_images[:16]), recon[:16])
  meta.update(scale=vae.scale, shift=vae.shift, metrics=scores,
              downsample=vae.downsample, latent_channels=vae.latent_channels)
  return io.save(out, meta, params, {"recon_grid.png": _png(grid)})
