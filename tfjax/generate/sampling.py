"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of `[batch, vocab]` logits; the decoding loops in `lm.py` call
them once per step inside `jit`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How text tokens are drawn. temperature 0 means greedy (argmax)."""
  temperature: float = 1.0
  top_k: int = 0        # 0 = no top-k filter
  top_p: float = 1.0    # 1 = no nucleus filter

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sample.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"sample.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sample.top_p must be in (0, 1], got {self.top_p}")

  @classmethod
  def from_config(cls, sample_config) -> "SamplingParams":
    return cls(temperature=float(sample_config.temperature), top_k=int(sample_config.top_k),
               top_p=float(sample_config.top_p))


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """float32[batch, vocab] logits with tokens outside top-k / top-p set to -inf.

  top-p keeps the smallest set of most likely tokens whose probability mass
  reaches `top_p` (the most likely token always survives).
  """
  logits = logits.astype(jnp.float32)
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each sorted token: a token is kept while that mass
    # is still below top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def sample_tokens(rng: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """int32[batch] next tokens from `[batch, vocab]` logits."""
  if params.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits.astype(jnp.float32) / params.temperature,
                           params.top_k, params.top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
