"""Forward noising of training images: one timestep per image.

Two objectives share this file's interface:
  ddpm: integer t in [0, T), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, target eps.
  flow: continuous t in [0, 1], x_t = (1 - t) x0 + t eps, target v = eps - x0
        (rectified flow); the model sees t * T so one timestep embedding serves both.
Images before their caption are noised at most to `max_t_image_first` (in
DDPM steps; the flow objective uses the same fraction of its range).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tfjax.diffusion.schedule import signal_noise


def sample_timesteps(rng: jax.Array, image_before_caption: jax.Array, *, num_timesteps: int,
                     max_t_image_first: int, objective: str = "ddpm") -> jax.Array:
  """float32[batch, max_images] model timesteps in [0, T).

  For ddpm the values are integers; images before their caption draw from
  [0, max_t_image_first] when `max_t_image_first >= 0`.
  """
  u = jax.random.uniform(rng, image_before_caption.shape)
  limit = jnp.full(image_before_caption.shape, float(num_timesteps))
  if max_t_image_first >= 0:
    limit = jnp.where(image_before_caption, float(max_t_image_first + 1), limit)
  if objective == "ddpm":
    return jnp.floor(u * limit).astype(jnp.float32)
  return u * (limit - 1.0)


def add_noise(x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
              alphas_cumprod: jax.Array, objective: str = "ddpm",
              num_timesteps: int = 1000) -> tuple[jax.Array, jax.Array]:
  """Noise clean latents; returns (x_t, regression target).

  Args:
    x0, noise: [batch, max_images, h, w, c].
    timesteps: [batch, max_images] model timesteps in [0, T).
  """
  if objective == "ddpm":
    a, s = signal_noise(alphas_cumprod, timesteps)
    a, s = a[..., None, None, None], s[..., None, None, None]
    return a * x0 + s * noise, noise
  t = (timesteps / (num_timesteps - 1))[..., None, None, None]
  return (1.0 - t) * x0 + t * noise, noise - x0
