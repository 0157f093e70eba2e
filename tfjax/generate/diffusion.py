"""Diffusion mode: denoise one image per row after the context decoded so far.

With the prefix cache (the default) the context's keys and values were
computed once; every denoising step runs the model on the image's n patch
positions only, against that cache, and throws the returned cache away.
Without it (`use_cache=False`, for the benchmark and the tests) every step
recomputes the whole context plus the patches.

Classifier-free guidance runs the conditional and unconditional predictions as
one batch of 2 * batch rows. The unconditional context is what training shows
when it drops a caption (`tfjax.losses.drop_captions`): the image's BOI starts
a document of its own, so the row is BOI and the patches alone. The BOI sits at
the conditional context's last slot (the rest of the row is padding), so both
halves write their patches at the same cache length.

With `image_cfg_scale` > 0 (image editing, InstructPix2Pix) a third set of rows
holds the prompt without its text (the images alone, as training shows an
editing example whose instruction was dropped: `editing.instruction_dropout`),
and the images and the text are guided apart (`diffusion.dual_cfg_combine`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tfjax import diffusion
from tfjax.config import BOI_ID, PAD_ID
from tfjax.generate.context import Context
from tfjax.generate.lm import no_images
from tfjax.model.cache import KVCache


@dataclasses.dataclass(frozen=True)
class DiffusionParams:
  """How an image is sampled."""
  num_steps: int = 250
  sampler: str = "ddpm"      # ddpm | ddim (objective ddpm); flow uses Euler steps
  cfg_scale: float = 5.0     # <= 0: no guidance (conditional pass only); 1 = conditional
  objective: str = "ddpm"    # ddpm | flow, as trained (config diffusion.objective)
  num_timesteps: int = 1000
  clip_x0: float = 6.0       # clip predicted clean latents to [-v, v] (0 = off; ddpm only)
  x0_min_alpha_bar: float = 1e-3  # below this alpha_bar the x0 estimate is the prior mean, 0
  # Fraction of the reverse process run (diffusers' img2img `strength`): below
  # 1 the sampler starts from an init image noised to that fraction of the
  # schedule (SDEdit) and runs only the steps from there down.
  strength: float = 1.0
  # > 0: guide toward the prompt's images by this scale and toward its text by
  # cfg_scale (diffusers' image_guidance_scale); 0 = one scale for the whole prompt.
  image_cfg_scale: float = 0.0

  def __post_init__(self):
    if self.sampler not in ("ddpm", "ddim"):
      raise ValueError(f"diffusion.sampler must be ddpm or ddim, got {self.sampler!r}")
    if self.objective not in ("ddpm", "flow"):
      raise ValueError(f"diffusion.objective must be ddpm or flow, got {self.objective!r}")
    diffusion.sampling_timesteps(self.num_steps, self.num_timesteps)  # validates num_steps
    if not 0.0 < self.strength <= 1.0:
      raise ValueError(f"diffusion.strength must be in (0, 1], got {self.strength}")
    if self.image_cfg_scale < 0 or (self.image_cfg_scale > 0 and not self.guided):
      raise ValueError(f"diffusion.image_cfg_scale={self.image_cfg_scale} must be 0 (off) or "
                       f"> 0 with guidance on (diffusion.cfg_scale > 0, got {self.cfg_scale})")

  @property
  def guided(self) -> bool:
    return self.cfg_scale > 0

  @property
  def image_guided(self) -> bool:
    return self.image_cfg_scale > 0

  def timesteps(self) -> np.ndarray:
    """int32 model timesteps the sampler visits, most to least noisy: the
    schedule's `num_steps`, less those above `strength` of its range (t = 0 stays)."""
    ts = diffusion.sampling_timesteps(self.num_steps, self.num_timesteps)
    return ts[ts <= round(self.strength * (self.num_timesteps - 1))]

  def noised_init(self, rng: jax.Array, init: jax.Array) -> jax.Array:
    """`init` latents [b, h, w, c] noised to the first timestep the sampler visits."""
    t = jnp.full(init.shape[:1], float(self.timesteps()[0]))
    alphas = diffusion.cosine_alphas_cumprod(self.num_timesteps)
    x_t, _ = diffusion.add_noise(init[:, None], jax.random.normal(rng, init[:, None].shape),
                                 t[:, None], alphas, self.objective, self.num_timesteps)
    return x_t[:, 0]

  @classmethod
  def from_config(cls, config: Any) -> "DiffusionParams":
    d = config.diffusion
    return cls(num_steps=int(d.sample_steps), sampler=str(d.sampler),
               cfg_scale=float(d.cfg_scale), objective=str(d.objective),
               num_timesteps=int(d.num_timesteps),
               # configs saved before these keys existed get the defaults above
               clip_x0=float(config.sample.get("clip_x0", cls.clip_x0)),
               x0_min_alpha_bar=float(config.sample.get("x0_min_alpha_bar",
                                                        cls.x0_min_alpha_bar)),
               strength=float(d.get("strength", cls.strength)),
               image_cfg_scale=float(d.get("image_cfg_scale", cls.image_cfg_scale)))


def _patch_call(x_t: jax.Array, t: jax.Array, rope_start: jax.Array, image_id: jax.Array,
                active: jax.Array, n: int) -> dict[str, jax.Array]:
  """Model inputs for the n patch positions of one image per row.

  x_t: [b, h, w, c]; t: float32[b]; rope_start, image_id: int32[b]; active: bool[b].
  """
  b = x_t.shape[0]
  seg = jnp.broadcast_to(active.astype(jnp.int32)[:, None], (b, n))
  return dict(tokens=jnp.full((b, n), PAD_ID, jnp.int32),
              positions=rope_start[:, None] + jnp.arange(n, dtype=jnp.int32)[None],
              segment_ids=seg, image_ids=seg * image_id[:, None],
              noisy_latents=x_t[:, None], timesteps=t[:, None],
              image_starts=jnp.zeros((b, 1), jnp.int32), image_valid=active[:, None])


def concat_caches(a: KVCache, b: KVCache) -> KVCache:
  """Rows of `a` then rows of `b` (same max_len and length)."""
  return KVCache(k=jnp.concatenate([a.k, b.k], 1), v=jnp.concatenate([a.v, b.v], 1),
                 segment_ids=jnp.concatenate([a.segment_ids, b.segment_ids], 0),
                 image_ids=jnp.concatenate([a.image_ids, b.image_ids], 0), length=a.length)


def uncond_prefix_cache(forward: Callable, params: Any, model_config: Any, empty: KVCache,
                        length: int) -> KVCache:
  """Cache whose rows hold only a BOI at slot length - 1 (a caption-dropped image)."""
  b = empty.segment_ids.shape[0]
  start = empty.replace(length=jnp.asarray(length - 1, jnp.int32))
  inputs = dict(tokens=jnp.full((b, 1), BOI_ID, jnp.int32), positions=jnp.zeros((b, 1), jnp.int32),
                segment_ids=jnp.ones((b, 1), jnp.int32), image_ids=jnp.zeros((b, 1), jnp.int32))
  return forward(params, {**inputs, **no_images(model_config, b)}, start).cache


def uncond_context(ctx: Context) -> Context:
  """The caption-dropped context: padding, then BOI at the last slot."""
  b, length = ctx.tokens.shape
  tokens = np.full((b, length), PAD_ID, np.int32)
  seg = np.zeros((b, length), np.int32)
  pos = np.zeros((b, length), np.int32)
  tokens[:, -1] = BOI_ID
  seg[:, -1] = 1
  _, i, h, w, c = ctx.latents.shape
  return Context(tokens=tokens, segment_ids=seg, image_ids=np.zeros_like(seg), positions=pos,
                 latents=np.zeros((b, i, h, w, c), np.float32),
                 image_starts=np.zeros((b, i), np.int32), image_valid=np.zeros((b, i), bool),
                 patch_size=ctx.patch_size)


def _full_call(ctx_inputs: dict[str, jax.Array], x_t: jax.Array, t: jax.Array,
               rope_start: jax.Array, image_id: jax.Array, active: jax.Array,
               n: int) -> tuple[dict[str, jax.Array], jax.Array]:
  """Inputs for context + patches in one uncached pass; and each row's new image slot."""
  patch = _patch_call(x_t, t, rope_start, image_id, active, n)
  length = ctx_inputs["tokens"].shape[1]
  out = {k: jnp.concatenate([ctx_inputs[k], patch[k]], 1)
         for k in ("tokens", "positions", "segment_ids", "image_ids")}
  slot = jnp.sum(ctx_inputs["image_valid"], axis=1).astype(jnp.int32)  # new image's slot
  b, i = ctx_inputs["image_valid"].shape
  lat = jnp.concatenate([ctx_inputs["noisy_latents"], jnp.zeros_like(x_t)[:, None]], 1)
  rows = jnp.arange(b)
  out["noisy_latents"] = lat.at[rows, slot].set(x_t)
  out["timesteps"] = jnp.zeros((b, i + 1), jnp.float32).at[rows, slot].set(t)
  out["image_starts"] = jnp.concatenate(
      [ctx_inputs["image_starts"], jnp.zeros((b, 1), jnp.int32)], 1).at[rows, slot].set(length)
  out["image_valid"] = jnp.concatenate(
      [ctx_inputs["image_valid"], jnp.zeros((b, 1), bool)], 1).at[rows, slot].set(active)
  return out, slot


def make_denoiser(model: Any, n: int, use_cache: bool) -> Callable:
  """`(params, prefix, x_t [b,h,w,c], t [b], rope_start, image_id, active) -> prediction`.

  `prefix` is a KVCache (use_cache) or the context's model inputs (not); the
  prediction is the model's epsilon (or velocity) for the new image, [b, h, w, c].
  """

  def predict(params, prefix, x_t, t, rope_start, image_id, active):
    if use_cache:
      out = model.apply({"params": params},
                        **_patch_call(x_t, t, rope_start, image_id, active, n), cache=prefix)
      return out.image_out[:, 0]
    inputs, slot = _full_call(prefix, x_t, t, rope_start, image_id, active, n)
    out = model.apply({"params": params}, **inputs)
    return out.image_out[jnp.arange(x_t.shape[0]), slot]

  return predict


def combine_prefixes(*prefixes: Any) -> Any:
  """One prefix holding each prefix's rows in turn (conditional first, unconditional last)."""
  if isinstance(prefixes[0], KVCache):
    return functools.reduce(concat_caches, prefixes)
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0), *prefixes)


def guided_from_combined(predict: Callable, params: Any, prefix: Any, x_t: jax.Array,
                         t: jax.Array, rope_start: jax.Array, image_id: jax.Array,
                         active: jax.Array, cfg_scale: float,
                         image_only: tuple[jax.Array, jax.Array] | None = None,
                         image_cfg_scale: float = 0.0) -> jax.Array:
  """CFG prediction from a `combine_prefixes` prefix, every branch in one model call.

  The prefix's rows: conditional, then (with `image_only` = its rows' RoPE start
  and image id, int32[b] each) the text-free prompt, then unconditional.
  """
  ones = jnp.ones_like(image_id)
  # Unconditional rows: the image follows its BOI at RoPE position 0.
  ropes, ids = [rope_start, ones], [image_id, ones]
  if image_only is not None:
    ropes.insert(1, image_only[0])
    ids.insert(1, image_only[1])
  k = len(ropes)
  tile = lambda a: jnp.concatenate([a] * k, 0)
  out = predict(params, prefix, tile(x_t), tile(t), jnp.concatenate(ropes),
                jnp.concatenate(ids), tile(active))
  parts = jnp.split(out, k, axis=0)
  if image_only is None:
    return diffusion.cfg_combine(parts[0], parts[1], cfg_scale)
  return diffusion.dual_cfg_combine(*parts, cfg_scale, image_cfg_scale)


def guided_prediction(predict: Callable, params: Any, cond_prefix: Any, uncond_prefix: Any,
                      x_t: jax.Array, t: jax.Array, rope_start: jax.Array,
                      image_id: jax.Array, active: jax.Array, cfg_scale: float) -> jax.Array:
  """CFG prediction, conditional and unconditional rows in one model call."""
  return guided_from_combined(predict, params, combine_prefixes(cond_prefix, uncond_prefix),
                              x_t, t, rope_start, image_id, active, cfg_scale)


def clip_prediction(x_t: jax.Array, eps: jax.Array, t: jax.Array, alphas_cumprod: jax.Array,
                    limit: float, min_alpha_bar: float = 0.0) -> jax.Array:
  """eps consistent with the predicted clean latents clipped to [-limit, limit].

  At the cosine schedule's last timesteps sqrt(alpha_bar) is ~5e-5, so the
  x0 implied by an eps prediction (and every step built on it) multiplies the
  prediction's error by thousands; clipping x0 to the range unit-variance
  latents occupy, then re-deriving eps, keeps the first steps sane. Both DDPM
  (via x0) and DDIM (via x0 and eps) then step from the clipped estimate.

  Clipping alone is not enough: at t = 999 nearly every element of the x0
  estimate sits at +-limit, and the next step carries that sign pattern as a
  signal several times stronger than the true one, which the model then
  follows (measured on the tiny main job: final latents at 2.5x the data's
  standard deviation, saturated backgrounds no training image has). Where
  alpha_bar < min_alpha_bar the x0 estimate is replaced by the prior mean of
  standardised latents, 0, which is what x_t tells about x0 there.
  """
  ab = alphas_cumprod[jnp.clip(t, 0, alphas_cumprod.shape[0] - 1)]
  x0 = jnp.clip(diffusion.predict_x0(x_t, eps, ab), -limit, limit)
  x0 = jnp.where(ab < min_alpha_bar, 0.0, x0)
  return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def make_sampler(model: Any, params_d: DiffusionParams, n: int, use_cache: bool) -> Callable:
  """jitted `(params, cond_prefix, uncond_prefix, rope_start, image_id, active, rng, x_init,
  image_only=None)` -> clean latents [b, h, w, c], the whole reverse process in one `fori_loop`.

  `uncond_prefix` is ignored (pass None) when guidance is off; `image_only`
  (needed with `params_d.image_guided`) is the text-free prompt's (prefix,
  RoPE start int32[b], image id int32[b]).
  """
  predict = make_denoiser(model, n, use_cache)
  ts = params_d.timesteps()
  ts_prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
  alphas = diffusion.cosine_alphas_cumprod(params_d.num_timesteps)
  step = diffusion.ddim_step if params_d.sampler == "ddim" else diffusion.ddpm_step

  def sample(params, cond_prefix, uncond_prefix, rope_start, image_id, active, rng, x_init,
             image_only=None):
    b = x_init.shape[0]
    branch = None
    # Combined once, outside the loop: every step reads the same k * b rows.
    if not params_d.guided:
      prefix = cond_prefix
    elif not params_d.image_guided:
      prefix = combine_prefixes(cond_prefix, uncond_prefix)
    else:
      if image_only is None:
        raise ValueError("diffusion.image_cfg_scale > 0 needs the text-free prompt (image_only)")
      prefix = combine_prefixes(cond_prefix, image_only[0], uncond_prefix)
      branch = tuple(image_only[1:])

    def body(i, carry):
      x, rng = carry
      rng, key = jax.random.split(rng)
      t, t_prev = jnp.asarray(ts)[i], jnp.asarray(ts_prev)[i]
      tb = jnp.full((b,), t, jnp.float32)
      if params_d.guided:
        pred = guided_from_combined(predict, params, prefix, x, tb, rope_start, image_id,
                                    active, params_d.cfg_scale, branch,
                                    params_d.image_cfg_scale)
      else:
        pred = predict(params, prefix, x, tb, rope_start, image_id, active)
      if params_d.objective == "flow":
        x = diffusion.flow_step(key, x, pred, t, t_prev, params_d.num_timesteps)
      else:
        if params_d.clip_x0 > 0:
          pred = clip_prediction(x, pred, t, alphas, params_d.clip_x0,
                                 params_d.x0_min_alpha_bar)
        x = step(key, x, pred, t, t_prev, alphas)
      return x, rng

    x, _ = jax.lax.fori_loop(0, len(ts), body, (x_init, rng))
    return x

  return jax.jit(sample)


def write_image(forward: Callable, params: Any, cache: KVCache, latents: jax.Array,
                rope_start: jax.Array, image_id: jax.Array, active: jax.Array,
                n: int) -> KVCache:
  """The cache with a finished image appended as clean patches (timestep 0)."""
  inputs = _patch_call(latents, jnp.zeros(latents.shape[:1], jnp.float32), rope_start,
                       image_id, active, n)
  return forward(params, inputs, cache).cache
