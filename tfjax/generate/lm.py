"""LM mode: prefill a prompt into the KV cache, then sample token by token.

Each decoding step feeds one slot per row: the token the row just sampled, or
a padding slot (segment id 0, invisible to every query) for rows that have
stopped, so all rows share the cache's single length. A row stops after it has
fed a stop token (EOS, or BOI which hands over to diffusion); the loop ends
when every row has stopped or `max_new` steps ran. The whole loop is one
`jax.lax.while_loop` under `jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.config import PAD_ID
from tfjax.generate.context import Context
from tfjax.generate.sampling import SamplingParams, sample_tokens
from tfjax.model.cache import KVCache


def empty_cache(model_config: Any, batch: int, max_len: int) -> KVCache:
  """A cache in the model's compute dtype (what the keys are computed in)."""
  return KVCache.empty(model_config, batch, max_len, jnp.dtype(model_config.dtype))


def no_images(model_config: Any, batch: int) -> dict[str, jax.Array]:
  """Image inputs for a call with no image: no slot, or one unused slot.

  The linear patch layers take zero image slots; the U-Net's reshapes cannot,
  so it gets one slot marked invalid (its output is dropped by the model).
  """
  s, c = model_config.latent_size, model_config.latent_channels
  k = 0 if model_config.patch_type == "linear" else 1
  return dict(noisy_latents=jnp.zeros((batch, k, s, s, c), jnp.float32),
              timesteps=jnp.zeros((batch, k), jnp.float32),
              image_starts=jnp.zeros((batch, k), jnp.int32),
              image_valid=jnp.zeros((batch, k), bool))


def make_forward(model: Any) -> Callable:
  """jitted `(params, inputs: dict, cache | None) -> ModelOutput`."""

  @jax.jit
  def forward(params, inputs, cache=None):
    return model.apply({"params": params}, **inputs, cache=cache)

  return forward


def prefill(forward: Callable, params: Any, ctx: Context,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
  """Writes the whole context into `cache`; returns (last-slot logits [b, vocab], cache).

  The context is left-padded, so every row's last real slot is the last slot.
  """
  if ctx.length > cache.max_len:
    raise ValueError(f"the prompt takes {ctx.length} slots but the cache holds {cache.max_len}")
  out = forward(params, {k: jnp.asarray(v) for k, v in ctx.model_inputs().items()}, cache)
  return out.logits[:, -1], out.cache


@dataclasses.dataclass
class DecodeResult:
  tokens: np.ndarray      # int32 [batch, steps]: sampled tokens, PAD where a row had stopped
  active: np.ndarray      # bool [batch, steps]: which slots were real
  stop_token: np.ndarray  # int32 [batch]: the stop token a row fed, -1 if it ran out of steps
  logits: jax.Array       # [batch, vocab] logits after the last fed slot
  cache: KVCache


def make_decode(model: Any, model_config: Any, sampling: SamplingParams, max_new: int,
                stop_ids: Sequence[int] = (), banned_ids: Sequence[int] = ()) -> Callable:
  """jitted `(params, cache, logits, next_pos, active, rng[, row_banned]) -> dict` loop.

  Args (of the returned function):
    cache: KVCache with room for `max_new` more slots.
    logits: float32[batch, vocab] the prediction for each row's next token.
    next_pos: int32[batch] RoPE position of each row's next token.
    active: bool[batch] rows that decode (the others feed padding).
    row_banned: optional int32[batch] one more token id per row never to
      sample (e.g. BOI for a row that drew all the images it may), -1 = none.
  `banned_ids` are never sampled (e.g. BOI when only text is wanted).
  """
  stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
  banned = jnp.asarray(list(banned_ids), jnp.int32)

  @jax.jit
  def decode(params, cache, logits, next_pos, active, rng, row_banned=None):
    batch = logits.shape[0]
    if row_banned is None:
      row_banned = jnp.full((batch,), -1, jnp.int32)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None]
    images = no_images(model_config, batch)

    def cond(carry):
      i, _, _, _, active, *_ = carry
      return (i < max_new) & jnp.any(active)

    def body(carry):
      i, cache, logits, pos, active, out, out_active, stop_tok, rng = carry
      rng, key = jax.random.split(rng)
      if banned.size:
        logits = logits.at[:, banned].set(jnp.finfo(jnp.float32).min)
      logits = jnp.where(vocab_ids == row_banned[:, None], jnp.finfo(jnp.float32).min, logits)
      tok = jnp.where(active, sample_tokens(key, logits, sampling), PAD_ID)
      seg = active.astype(jnp.int32)[:, None]
      res = model.apply({"params": params}, tok[:, None], pos[:, None], seg,
                        jnp.zeros_like(seg), **images, cache=cache)
      out = out.at[:, i].set(tok)
      out_active = out_active.at[:, i].set(active)
      stopped = active & jnp.isin(tok, stop)
      stop_tok = jnp.where(stopped, tok, stop_tok)
      return (i + 1, res.cache, res.logits[:, 0], pos + active.astype(jnp.int32),
              active & ~stopped, out, out_active, stop_tok, rng)

    init = (jnp.zeros((), jnp.int32), cache, logits.astype(jnp.float32), next_pos, active,
            jnp.full((batch, max_new), PAD_ID, jnp.int32), jnp.zeros((batch, max_new), bool),
            jnp.full((batch,), -1, jnp.int32), rng)
    steps, cache, logits, _, _, out, out_active, stop_tok, _ = jax.lax.while_loop(
        cond, body, init)
    return dict(steps=steps, cache=cache, logits=logits, tokens=out, active=out_active,
                stop_token=stop_tok)

  return decode


def run_decode(decode: Callable, params: Any, cache: KVCache, logits: jax.Array,
               ctx: Context, active: np.ndarray, rng: jax.Array, max_new: int,
               row_banned: np.ndarray | None = None) -> DecodeResult:
  """Runs a `make_decode` loop and appends what it fed to `ctx`."""
  if ctx.length + max_new > cache.max_len:
    raise ValueError(f"decoding {max_new} tokens after {ctx.length} slots overflows the cache "
                     f"of {cache.max_len} (raise the cache size or lower sample.max_text_tokens)")
  res = decode(params, cache, logits, jnp.asarray(ctx.next_position()),
               jnp.asarray(active, bool), rng,
               None if row_banned is None else jnp.asarray(row_banned, jnp.int32))
  steps = int(res["steps"])
  tokens = np.asarray(res["tokens"])[:, :steps]
  fed = np.asarray(res["active"])[:, :steps]
  for j in range(steps):
    ctx.append_tokens(tokens[:, j:j + 1], fed[:, j])
  return DecodeResult(tokens=tokens, active=fed, stop_token=np.asarray(res["stop_token"]),
                      logits=res["logits"], cache=res["cache"])
