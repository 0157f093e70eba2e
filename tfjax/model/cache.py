"""Key/value cache for decoding: the prefix is computed once and reused.

A fixed-size buffer per layer. Slots not yet written have segment id 0, which
the Transfusion mask treats as padding, so the same mask code serves training
(no cache) and decoding (cache). Rows of a batch may hold prompts of different
lengths by left-padding with segment id 0.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  k: jax.Array            # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array            # [layers, batch, max_len, kv_heads, head_dim]
  segment_ids: jax.Array  # int32 [batch, max_len], 0 = empty slot
  image_ids: jax.Array    # int32 [batch, max_len]
  length: jax.Array       # int32 scalar: slots [0, length) are written

  @classmethod
  def empty(cls, model_config: Any, batch: int, max_len: int,
            dtype: Any = jnp.bfloat16) -> "KVCache":
    head_dim = model_config.dim // model_config.num_heads
    shape = (model_config.num_layers, batch, max_len, model_config.num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               segment_ids=jnp.zeros((batch, max_len), jnp.int32),
               image_ids=jnp.zeros((batch, max_len), jnp.int32),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def write_ids(self, segment_ids: jax.Array, image_ids: jax.Array) -> "KVCache":
    """The cache with the ids of `[batch, s]` new positions written at `length`."""
    start = (0, self.length)
    return self.replace(
        segment_ids=jax.lax.dynamic_update_slice(self.segment_ids,
                                                 segment_ids.astype(jnp.int32), start),
        image_ids=jax.lax.dynamic_update_slice(self.image_ids, image_ids.astype(jnp.int32),
                                               start))
