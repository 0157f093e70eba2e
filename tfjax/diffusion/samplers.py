"""Reverse-process steps: DDPM ancestral, DDIM, rectified-flow Euler, and CFG.

Every step maps the current latents and the model's prediction at timestep
`t` to the latents at `t_prev` (`t_prev = -1` means fully denoised).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sampling_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
  """int32[num_steps] evenly spaced training timesteps, from most to least noisy."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"diffusion.sample_steps={num_steps} must be in [1, {num_timesteps}]")
  ts = np.linspace(num_timesteps - 1, 0, num_steps).round().astype(np.int32)
  return ts


def _alpha_bar(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
  return jnp.where(t >= 0, alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def predict_x0(x_t: jax.Array, eps: jax.Array, ab_t: jax.Array) -> jax.Array:
  return (x_t - jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(ab_t)


def ddpm_step(rng: jax.Array, x_t: jax.Array, eps: jax.Array, t: jax.Array, t_prev: jax.Array,
              alphas_cumprod: jax.Array) -> jax.Array:
  """One ancestral step over a possibly respaced schedule (t -> t_prev)."""
  ab_t, ab_prev = _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_prev)
  beta = 1.0 - ab_t / ab_prev
  x0 = predict_x0(x_t, eps, ab_t)
  mean = (jnp.sqrt(ab_prev) * beta / (1.0 - ab_t)) * x0 + (
      jnp.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab_t)) * x_t
  var = beta * (1.0 - ab_prev) / (1.0 - ab_t)
  noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
  return mean + jnp.where(t_prev >= 0, jnp.sqrt(var), 0.0) * noise


def ddim_step(rng: jax.Array, x_t: jax.Array, eps: jax.Array, t: jax.Array, t_prev: jax.Array,
              alphas_cumprod: jax.Array) -> jax.Array:
  """One deterministic DDIM step (eta = 0); `rng` is unused, kept for a shared signature."""
  del rng
  ab_t, ab_prev = _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_prev)
  x0 = predict_x0(x_t, eps, ab_t)
  return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps


def flow_step(rng: jax.Array, x_t: jax.Array, velocity: jax.Array, t: jax.Array,
              t_prev: jax.Array, num_timesteps: int = 1000) -> jax.Array:
  """Euler step of the rectified-flow ODE from t to t_prev (model timesteps)."""
  del rng
  dt = (t - jnp.maximum(t_prev, 0)) / (num_timesteps - 1)
  return x_t - dt * velocity


def cfg_combine(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 = cond."""
  return uncond + scale * (cond - uncond)


def dual_cfg_combine(cond: jax.Array, image_only: jax.Array, uncond: jax.Array,
                     text_scale: float, image_scale: float) -> jax.Array:
  """Guidance on the prompt's images and its text apart (InstructPix2Pix, eq. 3):
  uncond + image_scale * (image_only - uncond) + text_scale * (cond - image_only).

  Equal scales give `cfg_combine(cond, uncond, scale)`.
  """
  return uncond + image_scale * (image_only - uncond) + text_scale * (cond - image_only)
