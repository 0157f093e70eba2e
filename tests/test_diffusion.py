"""Noise schedule, noising with its limits, samplers, guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax.diffusion import (add_noise, cfg_combine, cosine_alphas_cumprod, ddim_step, ddpm_step,
                             dual_cfg_combine, flow_step, sample_timesteps, sampling_timesteps)


def test_cosine_schedule_endpoints_and_monotonic():
  ab = np.asarray(cosine_alphas_cumprod(1000))
  assert ab.shape == (1000,)
  assert ab[0] > 0.999 and ab[-1] < 1e-4
  assert np.all(np.diff(ab) < 0)
  # cosine shape: half the signal variance is gone near the middle of the schedule
  assert 0.4 < ab[499] < 0.6


def test_one_timestep_per_image_with_noise_limit():
  before = jnp.asarray(np.random.default_rng(0).random((64, 8)) < 0.3)
  t = np.asarray(sample_timesteps(jax.random.key(0), before, num_timesteps=1000,
                                  max_t_image_first=500))
  assert t.shape == (64, 8)
  assert np.all(t == np.floor(t)) and t.min() >= 0 and t.max() <= 999
  assert t[np.asarray(before)].max() <= 500
  assert t[~np.asarray(before)].max() > 800   # the others use the whole range
  unlimited = np.asarray(sample_timesteps(jax.random.key(0), before, num_timesteps=1000,
                                          max_t_image_first=-1))
  assert unlimited[np.asarray(before)].max() > 800


def test_add_noise_variance_and_target():
  ab = cosine_alphas_cumprod(1000)
  x0 = jnp.ones((1, 1, 16, 16, 8))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  xt, target = add_noise(x0, noise, jnp.array([[0.0]]), ab)
  np.testing.assert_allclose(xt, x0, atol=0.05)
  np.testing.assert_array_equal(target, noise)
  xt, _ = add_noise(x0, noise, jnp.array([[999.0]]), ab)
  np.testing.assert_allclose(xt, noise, atol=0.02)
  _, v = add_noise(x0, noise, jnp.array([[500.0]]), ab, objective="flow")
  np.testing.assert_allclose(v, noise - x0)


@pytest.mark.parametrize("step", [ddim_step, ddpm_step])
def test_samplers_recover_x0_with_the_true_noise(step):
  """Given the exact noise at every step, a full reverse pass returns x0."""
  ab = cosine_alphas_cumprod(1000)
  x0 = jax.random.normal(jax.random.key(2), (2, 1, 4, 4, 3))
  noise = jax.random.normal(jax.random.key(3), x0.shape)
  ts = sampling_timesteps(50)
  x = jnp.sqrt(ab[ts[0]]) * x0 + jnp.sqrt(1 - ab[ts[0]]) * noise
  rng = jax.random.key(4)
  for i, t in enumerate(ts):
    t_prev = ts[i + 1] if i + 1 < len(ts) else -1
    eps = (x - jnp.sqrt(ab[t]) * x0) / jnp.sqrt(1 - ab[t])   # oracle prediction
    rng, sub = jax.random.split(rng)
    x = step(sub, x, eps, jnp.asarray(t), jnp.asarray(t_prev), ab)
  np.testing.assert_allclose(x, x0, atol=1e-3)


def test_flow_euler_with_true_velocity_is_exact():
  x0 = jax.random.normal(jax.random.key(5), (1, 1, 4, 4, 3))
  noise = jax.random.normal(jax.random.key(6), x0.shape)
  x = noise
  ts = sampling_timesteps(10)
  for i, t in enumerate(ts):
    t_prev = ts[i + 1] if i + 1 < len(ts) else -1
    x = flow_step(None, x, noise - x0, jnp.asarray(float(t)), jnp.asarray(float(t_prev)))
  np.testing.assert_allclose(x, x0, atol=1e-5)


def test_cfg_scale_one_is_conditional():
  cond, uncond = jnp.ones(3), jnp.zeros(3)
  np.testing.assert_array_equal(cfg_combine(cond, uncond, 1.0), cond)
  np.testing.assert_array_equal(cfg_combine(cond, uncond, 3.0), 3 * cond)


def test_dual_guidance_scales_image_and_text_apart():
  cond, image_only, uncond = jnp.asarray([3.0]), jnp.asarray([1.0]), jnp.asarray([0.0])
  # uncond + 2 * (image - uncond) + 5 * (cond - image)
  np.testing.assert_allclose(dual_cfg_combine(cond, image_only, uncond, 5.0, 2.0), [12.0])
  np.testing.assert_allclose(dual_cfg_combine(cond, image_only, uncond, 1.0, 1.0), cond)
  np.testing.assert_allclose(dual_cfg_combine(cond, image_only, uncond, 4.0, 4.0),
                             cfg_combine(cond, uncond, 4.0))


def test_sampling_timesteps_bounds():
  ts = sampling_timesteps(250)
  assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 250 and np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError, match="diffusion.sample_steps"):
    sampling_timesteps(0)
