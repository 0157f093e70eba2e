"""The mode-switching decoder: any mix of text and images in, text and images out.

LM mode samples tokens until a row emits BOI (or EOS, or runs out of tokens).
Rows that emitted BOI switch to diffusion mode together: n patches of noise are
appended and denoised against the prefix cache, the finished image is written
into the cache as clean patches, EOI is appended and LM mode resumes. An input
image (image-to-text) is encoded by the VAE and enters as clean patches
(timestep 0) wrapped in BOI/EOI. Prompts of different lengths are batched by
left padding (see `context.py`).

Modes: "auto" (the model decides when to draw), "image" (BOI is appended to
the prompt and one image is drawn: text-to-image) and "text" (BOI is never
sampled: captioning and plain text).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID, patches_per_image
from tfjax.generate import context as context_lib
from tfjax.generate import diffusion as diff
from tfjax.generate import lm
from tfjax.generate.sampling import SamplingParams
from tfjax.model import Transfusion

log = logging.getLogger(__name__)

MODES = ("auto", "image", "text")

# Compiled functions shared by every Generator of the same model architecture
# (params are arguments, never baked in): a second load of a model, or an
# export of it, reuses the compilations of the first.
_COMPILED: dict[Any, Any] = {}


def _shared(key: Any, make):
  if key not in _COMPILED:
    _COMPILED[key] = make()
  return _COMPILED[key]


@dataclasses.dataclass(frozen=True)
class Latents:
  """A prompt image already in the model's latent space (scaled), [h, w, c]."""
  array: np.ndarray


# A prompt item: text, a uint8 [H, W, 3] image, or latents.
PromptItem = Union[str, np.ndarray, Latents]


@dataclasses.dataclass
class Generation:
  """One row's output: the items generated after the prompt, in order."""
  segments: list[dict[str, Any]]  # {"type": "text", "text", "tokens"} | {"type": "image", "latents"}
  tokens: list[int]               # every token id generated (BOI/EOI/EOS included)

  @property
  def text(self) -> str:
    return "".join(s["text"] for s in self.segments if s["type"] == "text")

  @property
  def images(self) -> list[np.ndarray]:
    return [s["latents"] for s in self.segments if s["type"] == "image"]


LONG_PROMPT = ("error", "truncate")


def fit_prompt(row: list[tuple[str, Any]], limit: int, image_slots: int, index: int,
               policy: str = "error") -> list[tuple[str, Any]]:
  """A prompt row of at most `limit` positions, as ("tokens", ids) / ("image", latents).

  The model never saw sequences longer than data.seq_len: past them it draws
  noise. policy "error" refuses a longer prompt; "truncate" cuts text tokens
  from the end of its last text items and warns. ("text", ids) items (the
  prompt's text) become ("tokens", ids); an image takes `image_slots`.
  """
  if policy not in LONG_PROMPT:
    raise ValueError(f"long_prompt must be one of {LONG_PROMPT}, got {policy!r}")
  length = sum(image_slots if kind == "image" else len(v) for kind, v in row)
  excess = length - limit
  why = (f"prompt {index} takes {length} positions, but the model was trained on sequences "
         f"leaving {limit} for a prompt (config key data.seq_len, less room for the output)")
  if excess > 0 and policy == "error":
    raise ValueError(f"{why}: shorten it, or pass --long_prompt=truncate")
  out = []
  for kind, v in reversed(row):
    if kind == "text" and excess > 0:
      cut = min(excess, len(v))
      excess, v = excess - cut, v[:len(v) - cut]
      if not v:
        continue
    out.append(("tokens" if kind == "text" else kind, v))
  if excess > 0:
    raise ValueError(f"{why}, and its images alone do not fit")
  if length > limit:
    log.warning("%s: its text was cut to fit", why)
  return out[::-1]


class Generator:
  """A model ready to generate on one device.

  Args:
    config: the full resolved config (model, diffusion and sample sections).
    params: the model's parameters (float32 or bfloat16 leaves).
    tokenizer: a `tfjax.data.tokenizer.Tokenizer` (needed for text prompts/outputs).
    vae: an object with `encode(images [-1, 1]) -> z`, `decode(z) -> images`,
      `scale`, `shift` (`tfjax.vae.LoadedVAE`); needed for pixel images.
  """

  def __init__(self, config: Any, params: Any, tokenizer: Any = None, vae: Any = None):
    self.config, self.params, self.tokenizer, self.vae = config, params, tokenizer, vae
    self.model_config = config.model
    self.model = Transfusion(config.model)
    self._arch = config.model.to_json_best_effort(sort_keys=True)
    self.forward = _shared((self._arch, "forward"), lambda: lm.make_forward(self.model))
    self.num_patches = patches_per_image(config.model)
    s, c = config.model.latent_size, config.model.latent_channels
    self.latent_shape = (s, s, c)

  # ---- prompts -------------------------------------------------------------
  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [b, H, W, 3] -> scaled latents float32 [b, h, w, c]."""
    if self.vae is None:
      raise ValueError("an image prompt needs a VAE (the model directory has no vae/)")
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    z = self.vae.encode(x)
    return np.asarray((z - self.vae.shift) * self.vae.scale, np.float32)

  def decode_latents(self, latents: np.ndarray) -> np.ndarray:
    """Scaled latents [b, h, w, c] -> uint8 [b, H, W, 3]."""
    if self.vae is None:
      raise ValueError("decoding images needs a VAE (the model directory has no vae/)")
    z = jnp.asarray(latents, jnp.float32) / self.vae.scale + self.vae.shift
    x = np.asarray(self.vae.decode(z), np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)

  def _row(self, items: Sequence[PromptItem]) -> list[tuple[str, Any]]:
    row: list[tuple[str, Any]] = [("tokens", [BOS_ID])]
    for item in items:
      if isinstance(item, str):
        if self.tokenizer is None:
          raise ValueError("a text prompt needs a tokenizer (the model directory has none)")
        row.append(("text", self.tokenizer.encode(item)))
      elif isinstance(item, Latents):
        row += [("tokens", [BOI_ID]), ("image", item.array), ("tokens", [EOI_ID])]
      else:
        latents = self.encode_images(np.asarray(item)[None])[0]
        row += [("tokens", [BOI_ID]), ("image", latents), ("tokens", [EOI_ID])]
    return row

  # ---- decoding ------------------------------------------------------------
  def _decoder(self, sampling: SamplingParams, max_new: int, mode: str):
    stops = (EOS_ID,) if mode == "text" else (EOS_ID, BOI_ID)
    banned = (BOI_ID, EOI_ID, PAD_ID) if mode == "text" else (EOI_ID, PAD_ID)
    return _shared((self._arch, "decode", sampling, max_new, mode), lambda: lm.make_decode(
        self.model, self.model_config, sampling, max_new, stop_ids=stops, banned_ids=banned))

  def _sampler(self, dp: diff.DiffusionParams, use_cache: bool):
    return _shared((self._arch, "sample", dp, use_cache),
                   lambda: diff.make_sampler(self.model, dp, self.num_patches, use_cache))

  def denoise(self, ctx: context_lib.Context, cache: Any, active: np.ndarray, rng: jax.Array,
              dp: diff.DiffusionParams, use_cache: bool = True,
              init_latents: np.ndarray | None = None,
              image_ctx: context_lib.Context | None = None) -> np.ndarray:
    """Latents [b, h, w, c] of one new image per active row, after `ctx`.

    `cache` holds exactly `ctx` (ignored when `use_cache` is False).
    `init_latents` [b, h, w, c]: where the sampler starts when `dp.strength` < 1.
    `image_ctx`: `ctx` without its text and as long (`dp.image_cfg_scale` > 0).
    """
    b = ctx.batch
    rope = jnp.asarray(ctx.next_position())
    image_id = jnp.asarray(ctx.num_images() + 1)
    rng, init_rng = jax.random.split(rng)
    if dp.strength < 1.0:
      if init_latents is None or tuple(np.shape(init_latents)) != (b, *self.latent_shape):
        raise ValueError(f"diffusion.strength={dp.strength} < 1 starts from an init image: pass "
                         f"init_latents [{b}, {', '.join(map(str, self.latent_shape))}] "
                         f"(got {None if init_latents is None else np.shape(init_latents)})")
      x_init = dp.noised_init(init_rng, jnp.asarray(init_latents, jnp.float32))
    else:
      x_init = jax.random.normal(init_rng, (b, *self.latent_shape), jnp.float32)
    image_only = None
    if dp.image_guided:
      if image_ctx is None or image_ctx.tokens.shape != ctx.tokens.shape:
        raise ValueError(f"diffusion.image_cfg_scale={dp.image_cfg_scale} guides on the prompt "
                         "without its text: pass image_ctx, as long as ctx")
      if use_cache:
        _, prefix = lm.prefill(self.forward, self.params, image_ctx,
                               lm.empty_cache(self.model_config, b, cache.max_len))
      else:
        prefix = {k: jnp.asarray(v) for k, v in image_ctx.model_inputs().items()}
      image_only = (prefix, jnp.asarray(image_ctx.next_position()),
                    jnp.asarray(image_ctx.num_images() + 1))
    if use_cache:
      cond = cache
      uncond = None
      if dp.guided:
        uncond = diff.uncond_prefix_cache(
            self.forward, self.params, self.model_config,
            lm.empty_cache(self.model_config, b, cache.max_len), ctx.length)
    else:
      as_jnp = lambda c: {k: jnp.asarray(v) for k, v in c.model_inputs().items()}
      cond = as_jnp(ctx)
      uncond = as_jnp(diff.uncond_context(ctx)) if dp.guided else None
    out = self._sampler(dp, use_cache)(self.params, cond, uncond, rope, image_id,
                                       jnp.asarray(active, bool), rng, x_init, image_only)
    return np.asarray(out, np.float32)

  def generate(self, prompts: Sequence[Sequence[PromptItem]], *, rng: jax.Array,
               mode: str = "auto", sampling: SamplingParams | None = None,
               diffusion_params: diff.DiffusionParams | None = None,
               max_text_tokens: int | None = None, max_images: int = 1,
               use_cache: bool = True, pad_multiple: int = 16,
               long_prompt: str = "error",
               init_latents: np.ndarray | None = None) -> list[Generation]:
    """Generates for a batch of prompts (each a list of text / image items).

    Args:
      rng: PRNG key; the same key and prompts give the same outputs.
      mode: "auto", "image" or "text" (see the module docstring).
      sampling: token sampling (default: the config's sample section).
      diffusion_params: image sampling (default: the config's diffusion section).
      max_text_tokens: tokens per LM stretch (default sample.max_text_tokens).
      max_images: images per row at most (mode "auto").
      use_cache: reuse the prefix KV cache while denoising (False: recompute).
      pad_multiple: left-pad prompts to a multiple of this (fewer recompiles).
      long_prompt: a prompt longer than the trained sequence length
        (data.seq_len, less the room for the output) is refused ("error") or
        has its text cut from the end, with a warning ("truncate").
      init_latents: [batch, h, w, c] latents each row's image starts from
        when the diffusion strength is below 1 (mode "image": image-to-image, editing).
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sampling = sampling or SamplingParams.from_config(self.config.sample)
    dp = diffusion_params or diff.DiffusionParams.from_config(self.config)
    if dp.strength < 1.0 and mode != "image":
      raise ValueError(f"diffusion.strength={dp.strength} < 1 (start from an init image) needs "
                       f'mode="image", one image per row; got mode={mode!r}')
    if dp.image_guided and mode != "image":
      raise ValueError(f"diffusion.image_cfg_scale={dp.image_cfg_scale} > 0 (guidance on the "
                       f'prompt\'s images apart from its text) needs mode="image"; got {mode!r}')
    max_new = int(max_text_tokens or self.config.sample.max_text_tokens)
    # What the prompt must leave room for within the trained length: the
    # image (BOI + patches + EOI) or at least one new token.
    room = self.num_patches + 2 if mode == "image" else 1
    raw = [self._row(p) for p in prompts]
    rows = [fit_prompt(r, int(self.config.data.seq_len) - room, self.num_patches, i, long_prompt)
            for i, r in enumerate(raw)]
    if mode == "image":
      rows = [r + [("tokens", [BOI_ID])] for r in rows]
    ctx = context_lib.from_rows(rows, self.latent_shape, self.model_config.patch_size,
                                pad_multiple=pad_multiple)
    image_ctx = None
    if dp.image_guided:  # mode "image": checked above
      # The prompt without its text, as an editing example whose instruction
      # training dropped (editing.instruction_dropout): BOS, its images, BOI.
      image_ctx = context_lib.from_rows(
          [[it for it in r if it[0] != "text"] + [("tokens", [BOI_ID])] for r in raw],
          self.latent_shape, self.model_config.patch_size, min_length=ctx.length)
    b, n = ctx.batch, self.num_patches
    if mode == "image":
      budget = n + 2
    elif mode == "text":
      budget = max_new
    else:
      budget = (max_images + 1) * max_new + max_images * (n + 1)
    max_len = -(-(ctx.length + budget) // pad_multiple) * pad_multiple
    cache = lm.empty_cache(self.model_config, b, max_len)
    logits, cache = lm.prefill(self.forward, self.params, ctx, cache)

    outputs = [Generation(segments=[], tokens=[]) for _ in range(b)]
    finished = np.zeros(b, bool)
    made = np.zeros(b, np.int32)
    want_image = np.full(b, mode == "image")
    while True:
      if not want_image.any():
        active = ~finished
        if mode == "image" or not active.any():
          break
        rng, key = jax.random.split(rng)
        res = lm.run_decode(self._decoder(sampling, max_new, mode), self.params, cache, logits,
                            ctx, active, key, max_new,
                            row_banned=np.where(made >= max_images, BOI_ID, -1))
        cache, logits = res.cache, res.logits
        for r in np.nonzero(active)[0]:
          toks = [int(t) for t, a in zip(res.tokens[r], res.active[r]) if a]
          outputs[r].tokens += toks
          text_toks = [t for t in toks if t not in (EOS_ID, BOI_ID)]
          if text_toks:
            text = self.tokenizer.decode(text_toks) if self.tokenizer else ""
            outputs[r].segments.append({"type": "text", "text": text, "tokens": text_toks})
        want_image = active & (res.stop_token == BOI_ID)
        finished |= active & ~want_image
        continue
      rng, key = jax.random.split(rng)
      latents = self.denoise(ctx, cache, want_image, key, dp, use_cache, init_latents, image_ctx)
      rope, image_id = ctx.next_position(), ctx.num_images() + 1
      cache = diff.write_image(self.forward, self.params, cache, jnp.asarray(latents),
                               jnp.asarray(rope), jnp.asarray(image_id),
                               jnp.asarray(want_image), n)
      ctx.append_image(latents, want_image)
      eoi = np.where(want_image, EOI_ID, PAD_ID).astype(np.int32)[:, None]
      step = self.forward(self.params, dict(
          tokens=jnp.asarray(eoi), positions=jnp.asarray(ctx.next_position()[:, None]),
          segment_ids=jnp.asarray(want_image.astype(np.int32)[:, None]),
          image_ids=jnp.zeros((b, 1), jnp.int32), **lm.no_images(self.model_config, b)), cache)
      cache, logits = step.cache, step.logits[:, 0]
      ctx.append_tokens(eoi, want_image)
      for r in np.nonzero(want_image)[0]:
        outputs[r].segments.append({"type": "image", "latents": latents[r]})
        outputs[r].tokens.append(EOI_ID)
      made += want_image
      if mode == "image":
        finished |= want_image
      want_image = np.zeros(b, bool)
    self.last_context = ctx
    return outputs

  # ---- conveniences --------------------------------------------------------
  def text_to_image(self, captions: Sequence[str], rng: jax.Array, **kw) -> np.ndarray:
    """Latents [len(captions), h, w, c], one image per caption."""
    outs = self.generate([[c] for c in captions], rng=rng, mode="image", **kw)
    return np.stack([o.images[0] for o in outs])

  def image_to_text(self, images: Sequence[Any], rng: jax.Array, **kw) -> list[str]:
    """One caption per image (uint8 [H, W, 3] or `Latents`)."""
    outs = self.generate([[im] for im in images], rng=rng, mode="text", **kw)
    return [o.text.strip() for o in outs]
