"""AutoencoderKL / VQ-VAE: shapes, posterior, losses, metrics, save/load."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import tfjax.vae
from tfjax.config import default_config
from tfjax.vae import io, losses, metrics
from tfjax.vae.autoencoder import AutoencoderConfig, AutoencoderKL, Posterior
from tfjax.vae.train import train_vae
from tfjax.vae.vq import codebook_usage


@pytest.mark.parametrize("channels,latent,size", [
    ((8, 16), 4, 16), ((8, 16), 4, 48), ((8, 16, 16), 8, 32), ((8, 8, 16, 16), 16, 64)])
def test_encode_decode_shapes(channels, latent, size):
  cfg = AutoencoderConfig(channels=channels, blocks_per_level=1, latent_channels=latent,
                          norm_groups=4)
  model = AutoencoderKL(cfg)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  f = cfg.downsample
  post = jax.eval_shape(lambda p, x: model.apply(p, x, method=model.encode), params, x)
  assert post.mean.shape == (2, size // f, size // f, latent)
  z = jax.ShapeDtypeStruct(post.mean.shape, jnp.float32)
  out = jax.eval_shape(lambda p, z: model.apply(p, z, method=model.decode), params, z)
  assert out.shape == (2, size, size, 3)


def test_non_square_and_flux_layout_run():
  cfg = AutoencoderConfig(channels=(8, 16), blocks_per_level=1, latent_channels=4,
                          norm_groups=4, use_quant_conv=False, use_post_quant_conv=False)
  model = AutoencoderKL(cfg)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 24, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)   # jit: eager init is slow on CPU
  assert "quant_conv" not in params["params"]
  recon, post = jax.jit(model.apply)(params, x, jax.random.key(1))
  assert recon.shape == x.shape and post.mean.shape == (1, 8, 12, 4)
  assert np.isfinite(np.asarray(recon)).all()


def test_posterior_kl():
  zero = jnp.zeros((2, 2, 2, 3))
  assert np.allclose(Posterior(zero, zero).kl(), 0.0)
  post = Posterior(jnp.ones((1, 2, 2, 3)), zero)
  assert np.allclose(post.kl(), 0.5 * 12)


def test_bad_norm_groups_names_key():
  with pytest.raises(ValueError, match="vae.norm_groups"):
    AutoencoderConfig(channels=(12, 16), norm_groups=8).check()


def test_metrics():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  assert np.all(np.asarray(metrics.psnr(x, x)) > 90)
  assert np.allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  noisy = x + 0.1
  # shift of 0.1 in [-1,1] is 0.05 in [0,1]: PSNR = -10 log10(0.0025) ~ 26 dB (before clipping)
  assert 24 < float(metrics.psnr(noisy, x).mean()) < 30
  assert float(metrics.ssim(x * 0.2, x).mean()) < 0.9
  grid = metrics.image_grid(np.asarray(x), np.asarray(noisy), per_row=2)
  assert grid.shape == (32, 32, 3) and grid.dtype == np.uint8


def _write_vgg_like(path, with_lin=True):
  rng = np.random.default_rng(0)
  w = {}
  # conv 0, relu 1, conv 2, relu 3, pool 4, conv 5, relu 6 -> taps after conv 2 and conv 5
  for i, (cin, cout) in {0: (3, 4), 2: (4, 4), 5: (4, 6)}.items():
    w[f"features.{i}.weight"] = rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32)
    w[f"features.{i}.bias"] = np.zeros(cout, np.float32)
  if with_lin:
    w["lin0.model.1.weight"] = np.abs(rng.normal(size=(1, 4, 1, 1))).astype(np.float32)
    w["lin1.model.1.weight"] = np.abs(rng.normal(size=(1, 6, 1, 1))).astype(np.float32)
  safetensors.numpy.save_file(w, path)


def test_perceptual_loss(tmp_path):
  path = str(tmp_path / "vgg.safetensors")
  _write_vgg_like(path)
  net, params = losses.load_perceptual(path)
  assert net.taps == (False, True, True) and net.pools == (False, True, False)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  y = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  assert float(losses.perceptual_loss(net, params, x, x)) < 1e-6
  assert float(losses.perceptual_loss(net, params, x, y)) > 1e-3
  with pytest.raises(FileNotFoundError, match="vae.perceptual_weights"):
    losses.load_perceptual(str(tmp_path / "missing.safetensors"))


def test_patch_gan_losses():
  d = losses.PatchDiscriminator(channels=8, num_layers=2)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.jit(d.init)(jax.random.key(0), x)
  logits = jax.jit(d.apply)(params, x)
  assert logits.ndim == 4 and logits.shape[-1] == 1
  assert float(losses.hinge_d_loss(jnp.ones(3) * 2, -jnp.ones(3) * 2)) == 0.0
  assert float(losses.generator_gan_loss(jnp.ones(3))) == -1.0


def test_codebook_usage():
  u = codebook_usage(jnp.asarray([[0, 1], [1, 1]]), 4)
  assert u["codebook_usage"] == 0.5
  assert 1.0 < u["codebook_perplexity"] < 2.0


def _tiny_config(kind="kl"):
  c = default_config()
  v = c.vae
  v.kind = kind
  v.channels = (8, 16)
  v.latent_channels = 4
  v.norm_groups = 4
  v.codebook_size = 64
  v.train_steps = 3
  v.batch_size = 4
  v.log_every = 1
  v.scale_images = 8
  return c


def _images(n, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_train_vq_with_gan_and_perceptual_roundtrips_tokens(tmp_path):
  c = _tiny_config("vq")
  c.vae.perceptual_weights = str(tmp_path / "vgg.safetensors")
  _write_vgg_like(c.vae.perceptual_weights, with_lin=False)
  c.vae.gan_start_step = 0   # one compile of the GAN step only
  c.vae.disc_channels = 8
  c.vae.disc_layers = 2
  path = train_vae(c, str(tmp_path), _images(8), _images(4, seed=1))
  meta = json.load(open(os.path.join(path, io.META_FILE)))
  assert 0 < meta["metrics"]["codebook_usage"] <= 1
  assert meta["metrics"]["codebook_perplexity"] >= 1
  vae = tfjax.vae.load(path)
  assert vae.kind == "vq" and vae.codebook_size == 64
  x = _images(2, seed=2).astype(np.float32) / 127.5 - 1
  ids = vae.encode_tokens(x)
  assert ids.shape == (2, 8, 8) and ids.dtype == jnp.int32
  assert int(ids.min()) >= 0 and int(ids.max()) < 64
  img = vae.decode_tokens(ids)
  assert img.shape == (2, 16, 16, 3)
  # continuous path = discrete path: encode gives the code vectors of the ids
  assert np.allclose(vae.decode(vae.encode(x)), img, atol=1e-5)
  # a code image decodes to pixels whose codes are the same ids (codes are
  # stable under the decoder/encoder round trip for the code vectors themselves)
  z = vae.encode(x)
  module = vae.module
  again = module.apply({"params": vae.params}, z, method=lambda m, z: m._lookup(z))
  assert np.array_equal(np.asarray(again), np.asarray(ids))


def test_train_save_load_skip(tmp_path):
  c = _tiny_config("kl")
  path = train_vae(c, str(tmp_path), _images(8), _images(4, seed=1))
  assert io.is_complete(path) and os.path.isfile(os.path.join(path, "recon_grid.png"))
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  vae = tfjax.vae.load(path)
  assert (vae.downsample, vae.latent_channels) == (2, 4)
  assert vae.scale > 0 and np.isfinite(vae.shift)
  x = _images(3, seed=3).astype(np.float32) / 127.5 - 1
  z = vae.encode(x)
  assert z.shape == (3, 8, 8, 4) and vae.decode(z).shape == (3, 16, 16, 3)
  mtime = os.path.getmtime(os.path.join(path, io.PARAMS_FILE))
  assert train_vae(c, str(tmp_path)) == path   # complete: no training, no data needed
  assert os.path.getmtime(os.path.join(path, io.PARAMS_FILE)) == mtime
  with pytest.raises(ValueError, match="multiple"):
    vae.encode(np.zeros((1, 15, 15, 3), np.float32))


def test_load_bad_path_names_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="vae.path"):
    tfjax.vae.load(str(tmp_path))


def test_random_crop_is_latent_aligned():
  from tfjax.vae.train import _random_crop
  images = np.arange(2 * 64 * 64 * 3, dtype=np.int64).reshape(2, 64, 64, 3)
  crops = _random_crop(images, 32, 8, np.random.default_rng(0))
  assert crops.shape == (2, 32, 32, 3)
  for img, crop in zip(images, crops):
    y, x = np.argwhere((img[..., 0] == crop[0, 0, 0]))[0]
    assert y % 8 == 0 and x % 8 == 0
    assert np.array_equal(img[y:y + 32, x:x + 32], crop)
