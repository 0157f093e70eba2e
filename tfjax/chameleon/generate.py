"""Chameleon sampling: images as token sequences, captions as ordinary text.

Text->image: the prompt is `BOS caption BOI`; the h*w codes are sampled one
by one from the logits restricted to the image-token range, with
classifier-free guidance on logits, `uncond + s * (cond - uncond)`, where the
unconditional row is `BOS BOI` (what an image-first document shows the model
before its caption). Conditional and unconditional rows decode as one batch
against one KV cache, fed the same sampled code. The codes are decoded by the
VQ-VAE.

Image->text: the image's codes enter as tokens, `BOS BOI codes EOI`, and text
is sampled with image tokens, BOI and EOI banned, until EOS (the same LM loop
as Transfusion captioning, `tfjax.generate.lm`); EOS may not be the first
token, which conditions on the image-first document layout.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.chameleon.tokens import image_token_offset
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID
from tfjax.generate import context as context_lib
from tfjax.generate import lm
from tfjax.generate.sampling import SamplingParams, sample_tokens
from tfjax.model import Transfusion


def _to_uint8(x: Any) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ChameleonGenerator:
  """A trained Chameleon-baseline model plus its tokenizer and VQ-VAE.

  Args:
    config: the full config (model, chameleon, diffusion.cfg_scale, sample).
    params: model parameters.
    tokenizer: `tfjax.data.tokenizer.Tokenizer`.
    vq: `tfjax.vae.LoadedVAE` of kind 'vq'.
  """

  def __init__(self, config: Any, params: Any, tokenizer: Any, vq: Any):
    self.config, self.params, self.tokenizer, self.vq = config, params, tokenizer, vq
    self.model = Transfusion(config.model)
    self.forward = lm.make_forward(self.model)
    self.offset = image_token_offset(config)
    self.codebook = int(vq.codebook_size)
    self.grid = int(config.model.latent_size)
    self.num_codes = self.grid * self.grid
    self.latent_shape = (self.grid, self.grid, int(config.model.latent_channels))
    self._loops: dict[Any, Any] = {}
    self._decoders: dict[Any, Any] = {}

  # ---- prompts -------------------------------------------------------------
  def _context(self, rows: list[list[int]], pad_multiple: int = 16) -> context_lib.Context:
    return context_lib.from_rows([[("tokens", r)] for r in rows], self.latent_shape, 1,
                                 pad_multiple=pad_multiple)

  def image_codes(self, images: np.ndarray) -> np.ndarray:
    """uint8 [b, H, W, 3] -> int32 [b, h, w] VQ codes."""
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    return np.asarray(self.vq.encode_tokens(x), np.int32)

  def decode_codes(self, codes: np.ndarray) -> np.ndarray:
    """int32 [b, h, w] -> uint8 [b, H, W, 3]."""
    return _to_uint8(self.vq.decode_tokens(jnp.asarray(codes, jnp.int32)))

  # ---- text -> image -------------------------------------------------------
  def _image_loop(self, batch: int, cfg_scale: float, sampling: SamplingParams):
    key = (batch, cfg_scale, sampling)
    if key in self._loops:
      return self._loops[key]
    model, offset, k, n = self.model, self.offset, self.codebook, self.num_codes
    guided = cfg_scale > 0
    images = lm.no_images(self.config.model, 2 * batch if guided else batch)

    @jax.jit
    def loop(params, cache, logits, next_pos, rng):
      rows = logits.shape[0]

      def body(i, carry):
        cache, logits, pos, codes, rng = carry
        rng, key = jax.random.split(rng)
        lg = logits[:, offset:offset + k].astype(jnp.float32)  # image-token range only
        if guided:
          cond, uncond = lg[:batch], lg[batch:]
          lg = uncond + cfg_scale * (cond - uncond)
        code = sample_tokens(key, lg, sampling)                 # [batch]
        tok = jnp.concatenate([code, code]) if guided else code
        ones = jnp.ones((rows, 1), jnp.int32)
        res = model.apply({"params": params}, (tok + offset)[:, None], pos[:, None], ones,
                          jnp.zeros_like(ones), **images, cache=cache)
        return res.cache, res.logits[:, 0], pos + 1, codes.at[:, i].set(code), rng

      init = (cache, logits, next_pos, jnp.zeros((batch, n), jnp.int32), rng)
      return jax.lax.fori_loop(0, n, body, init)[3]

    self._loops[key] = loop
    return loop

  def sample_codes(self, captions: Sequence[str], rng: jax.Array, *,
                   cfg_scale: float | None = None,
                   sampling: SamplingParams | None = None) -> np.ndarray:
    """int32 [len(captions), h, w] codes, one image per caption."""
    cfg_scale = float(self.config.diffusion.cfg_scale if cfg_scale is None else cfg_scale)
    sampling = sampling or SamplingParams.from_config(self.config.sample)
    b = len(captions)
    rows = [[BOS_ID] + self.tokenizer.encode(c) + [BOI_ID] for c in captions]
    if cfg_scale > 0:
      rows += [[BOS_ID, BOI_ID]] * b
    ctx = self._context(rows)
    cache = lm.empty_cache(self.config.model, len(rows), ctx.length + self.num_codes)
    logits, cache = lm.prefill(self.forward, self.params, ctx, cache)
    codes = self._image_loop(b, cfg_scale, sampling)(
        self.params, cache, logits, jnp.asarray(ctx.next_position()), rng)
    return np.asarray(codes).reshape(b, self.grid, self.grid)

  # The Transfusion Generator's interface (what tfjax.eval.suite calls): an
  # image's "latents" are its codes.
  def text_to_image(self, captions: Sequence[str], rng: jax.Array, **kw) -> np.ndarray:
    """int32 [len(captions), h, w] codes; `decode_latents` makes pixels."""
    return self.sample_codes(captions, rng, **kw)

  def decode_latents(self, codes: np.ndarray) -> np.ndarray:
    """int32 [b, h, w] codes -> uint8 [b, H, W, 3]."""
    return self.decode_codes(codes)

  # ---- image -> text -------------------------------------------------------
  def image_to_text(self, images: Sequence[np.ndarray], rng: jax.Array, *,
                    sampling: SamplingParams | None = None,
                    max_new: int | None = None) -> list[str]:
    """One caption per uint8 [H, W, 3] image."""
    sampling = sampling or SamplingParams.from_config(self.config.sample)
    max_new = int(max_new or self.config.sample.max_text_tokens)
    codes = self.image_codes(np.stack(images)).reshape(len(images), -1)
    rows = [[BOS_ID, BOI_ID] + [int(c) + self.offset for c in r] + [EOI_ID] for r in codes]
    ctx = self._context(rows)
    cache = lm.empty_cache(self.config.model, len(rows), ctx.length + max_new)
    logits, cache = lm.prefill(self.forward, self.params, ctx, cache)
    # After EOI a document either ends (caption-first: most training documents)
    # or continues with the caption (image-first). Captioning asks for the
    # second: the first token may not be EOS. (Transfusion's clean-image
    # timestep carries that signal; a token sequence has no other.)
    logits = logits.at[:, EOS_ID].set(jnp.finfo(jnp.float32).min)
    key = (sampling, max_new)
    if key not in self._decoders:
      banned = [BOI_ID, EOI_ID, PAD_ID] + list(range(self.offset, self.offset + self.codebook))
      self._decoders[key] = lm.make_decode(self.model, self.config.model, sampling, max_new,
                                           stop_ids=(EOS_ID,), banned_ids=banned)
    res = lm.run_decode(self._decoders[key], self.params, cache, logits, ctx,
                        np.ones(len(rows), bool), rng, max_new)
    out = []
    for r in range(len(rows)):
      toks = [int(t) for t, a in zip(res.tokens[r], res.active[r]) if a and t != EOS_ID]
      out.append(self.tokenizer.decode(toks).strip())
    return out
