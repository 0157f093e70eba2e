"""The cosine noise schedule (Nichol & Dhariwal, 2021), defined once."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008,
                          max_beta: float = 0.999) -> jnp.ndarray:
  """alpha_bar[t] for t = 0 .. T-1: the signal fraction after t+1 noising steps.

  alpha_bar(u) = cos(((u + s) / (1 + s)) * pi / 2)^2, normalised to 1 at u=0;
  betas derived from consecutive ratios are clipped at `max_beta` so the last
  step stays finite. Decreasing from ~1 (t=0) to ~0 (t=T-1).
  """
  def f(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.array([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
                    for i in range(num_timesteps)], np.float64)
  return jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)


def signal_noise(alphas_cumprod: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) for integer timesteps t of any shape."""
  ab = alphas_cumprod[jnp.clip(t.astype(jnp.int32), 0, alphas_cumprod.shape[0] - 1)]
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
