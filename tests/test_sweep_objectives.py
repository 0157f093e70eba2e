"""The flow-matching variant the sweeps compare: generation integrates the
rectified-flow ODE with the model's velocity (not a DDPM/DDIM update)."""
import jax
import jax.numpy as jnp
import numpy as np

from tfjax import diffusion
from tfjax.config import default_config
from tfjax.generate import diffusion as diff
from tfjax.model import Transfusion, init_params


def test_flow_sampler_is_euler_on_model_velocity():
  m = default_config().model
  m.vocab_size, m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 16, 16, 1, 2, 2, 32
  m.latent_size, m.latent_channels, m.patch_size, m.time_embed_dim = 4, 2, 2, 8
  m.dtype, m.attention_impl, m.remat_policy, m.scan_layers = "float32", "xla", "none", False
  model = Transfusion(m)
  params = init_params(m, jax.random.key(0))
  n = 4
  prefix = {"tokens": jnp.array([[1, 3]]), "positions": jnp.array([[0, 1]]),
            "segment_ids": jnp.ones((1, 2), jnp.int32), "image_ids": jnp.zeros((1, 2), jnp.int32),
            "noisy_latents": jnp.zeros((1, 0, 4, 4, 2)), "timesteps": jnp.zeros((1, 0)),
            "image_starts": jnp.zeros((1, 0), jnp.int32),
            "image_valid": jnp.zeros((1, 0), bool)}
  rope, image_id, active = jnp.array([2]), jnp.array([1]), jnp.array([True])
  x_init = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))
  dp = diff.DiffusionParams(num_steps=3, cfg_scale=0.0, objective="flow", num_timesteps=1000)
  got = diff.make_sampler(model, dp, n, use_cache=False)(
      params, prefix, None, rope, image_id, active, jax.random.key(2), x_init)
  predict = jax.jit(diff.make_denoiser(model, n, use_cache=False))
  x = x_init
  ts = diffusion.sampling_timesteps(3, 1000)
  for t, t_prev in zip(ts, list(ts[1:]) + [-1]):
    v = predict(params, prefix, x, jnp.full((1,), float(t)), rope, image_id, active)
    x = x - (t - max(t_prev, 0)) / 999.0 * v
  np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-4, atol=1e-4)


def test_unet_patches_accept_text_only_calls():
  """LM decoding and the unconditional CFG prefix call the model with no image
  slots; the U-Net ablation must run there as the linear layers do."""
  m = default_config().model
  m.vocab_size, m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 16, 16, 1, 2, 2, 32
  m.latent_size, m.latent_channels, m.patch_size, m.time_embed_dim = 4, 2, 2, 8
  m.patch_type, m.unet_channels = "unet", (4, 8)
  m.dtype, m.attention_impl, m.remat_policy, m.scan_layers = "float32", "xla", "none", False
  params = init_params(m, jax.random.key(0))
  out = Transfusion(m).apply(
      {"params": params}, jnp.array([[1, 5, 6]]), jnp.arange(3)[None],
      jnp.ones((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 0, 4, 4, 2)),
      jnp.zeros((1, 0)), jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0), bool))
  assert out.logits.shape == (1, 3, 16) and out.image_out.shape == (1, 0, 4, 4, 2)
