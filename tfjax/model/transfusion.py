"""The Transfusion model: one transformer over text tokens and image patches.

Text positions are embedded by a lookup table; image positions by the patch
encoder applied to (noisy) latents with their timestep. The transformer's
output at text positions becomes next-token logits, at image positions the
patch decoder's noise (or velocity) prediction.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from tfjax.model.cache import KVCache
from tfjax.model.layers import RMSNorm
from tfjax.model.patch import TimestepEmbedding, patch_layers
from tfjax.model.transformer import Transformer
from tfjax.ops import key_ranges

# Decoding calls with at least this many new positions (an image being
# denoised) use the block-sparse kernel against the cache where one applies;
# shorter ones (LM steps) use the XLA path, which pads nothing.
KERNEL_MIN_QUERIES = 32


@flax.struct.dataclass
class ModelOutput:
  logits: jax.Array | None  # float32 [batch, seq, vocab]; None when not asked for
  image_out: jax.Array      # float32 [batch, max_images, h, w, c]
  cache: Any = None         # KVCache advanced past this call's positions, or None
  hidden: jax.Array | None = None  # [batch, seq, dim] final-normed, when logits are not made
  head: jax.Array | None = None    # [dim, vocab] output projection, when logits are not made


def patch_indices(image_starts: jax.Array, image_valid: jax.Array, num_patches: int,
                  seq_len: int) -> jax.Array:
  """int32[batch, max_images, num_patches] sequence index of every patch.

  Invalid image slots point one past the end so scatters drop them.
  """
  idx = image_starts[..., None] + jnp.arange(num_patches, dtype=jnp.int32)
  return jnp.where(image_valid[..., None], idx, seq_len)


class Transfusion(nn.Module):
  config: ml_collections.ConfigDict  # the `model` section of the config

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               image_ids: jax.Array, noisy_latents: jax.Array, timesteps: jax.Array,
               image_starts: jax.Array, image_valid: jax.Array,
               cache: KVCache | None = None, return_logits: bool = True) -> ModelOutput:
    """See the module docstring; shapes as in `tfjax.batch.Batch`.

    Args:
      tokens, positions, segment_ids, image_ids: int32 [batch, seq].
      noisy_latents: [batch, max_images, h, w, c] latents at `timesteps`.
      timesteps: float32 [batch, max_images] model timesteps in [0, T).
      image_starts, image_valid: [batch, max_images] where each image's patches sit.
      cache: decode against (and append to) a KV cache; None for training.
      return_logits: False returns the final hidden states and the output
        projection instead of logits, for a loss that applies the head in
        chunks (`tfjax.losses.chunked_lm_loss`).
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    batch, seq = tokens.shape
    embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (c.vocab_size, c.dim), jnp.dtype(c.param_dtype))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)

    encoder_cls, decoder_cls = patch_layers(c)
    t_emb = TimestepEmbedding(c.dim, c.time_embed_dim, jnp.dtype(c.param_dtype),
                              name="timestep_embedding")(timesteps)
    patches, skips = encoder_cls(c, name="patch_encoder")(noisy_latents.astype(jnp.float32), t_emb)
    idx = patch_indices(image_starts, image_valid, patches.shape[2], seq)
    rows = jnp.arange(batch)[:, None, None]
    x = x.at[rows, idx].set(patches.astype(dtype), mode="drop")
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    attn_image_ids = image_ids if c.image_attention == "bidirectional" else jnp.zeros_like(image_ids)
    if cache is None:
      h, _ = Transformer(c, name="transformer")(x, positions, segment_ids, attn_image_ids)
      new_cache = None
    else:
      written = cache.write_ids(segment_ids, attn_image_ids)
      ranges = None
      if seq >= KERNEL_MIN_QUERIES:  # denoising an image: intervals for the kernel
        k_start, k_end = key_ranges(written.segment_ids, written.image_ids)
        ranges = tuple(jax.lax.dynamic_slice_in_dim(r, cache.length, seq, axis=1)
                       for r in (k_start, k_end))
      h, (k, v) = Transformer(c, name="transformer")(
          x, positions, segment_ids, attn_image_ids, cache_kv=(cache.k, cache.v),
          cache_ctx=(cache.segment_ids, cache.image_ids, cache.length, ranges))
      start = (0, 0, cache.length, 0, 0)
      new_cache = written.replace(
          k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
          v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
          length=cache.length + seq)

    h = RMSNorm(c.norm_eps, dtype, jnp.dtype(c.param_dtype), name="final_norm")(h)
    if c.tie_embeddings:
      head = embedding.T
    else:
      head = self.param("output", nn.with_logical_partitioning(
          nn.initializers.normal(c.dim ** -0.5), ("embed", "vocab")),
                        (c.dim, c.vocab_size), jnp.dtype(c.param_dtype))
    patch_h = h[rows, jnp.minimum(idx, seq - 1)]  # [batch, max_images, P, dim]
    image_out = decoder_cls(c, name="patch_decoder")(patch_h.astype(jnp.float32), t_emb, skips)
    image_out = image_out.astype(jnp.float32)
    if not return_logits:
      return ModelOutput(logits=None, image_out=image_out, cache=new_cache, hidden=h,
                         head=head.astype(dtype))
    with jax.named_scope("lm_head"):
      logits = jnp.einsum("bsd,dv->bsv", h, head.astype(dtype),
                          preferred_element_type=jnp.float32)
    return ModelOutput(logits=logits, image_out=image_out, cache=new_cache)
