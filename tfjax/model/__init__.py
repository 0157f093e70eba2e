"""The Transfusion model (Flax) and helpers to build and measure it."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tfjax.config import patches_per_image
from tfjax.model.cache import KVCache
from tfjax.model.transfusion import ModelOutput, Transfusion


def dummy_inputs(model_config: ml_collections.ConfigDict, batch: int = 1, seq: int | None = None,
                 max_images: int = 1) -> dict[str, jax.Array]:
  """Smallest valid inputs for `init` (shapes only matter)."""
  seq = seq or patches_per_image(model_config) + 2
  s = model_config.latent_size
  return dict(tokens=jnp.zeros((batch, seq), jnp.int32),
              positions=jnp.zeros((batch, seq), jnp.int32),
              segment_ids=jnp.ones((batch, seq), jnp.int32),
              image_ids=jnp.zeros((batch, seq), jnp.int32),
              noisy_latents=jnp.zeros((batch, max_images, s, s, model_config.latent_channels)),
              timesteps=jnp.zeros((batch, max_images)),
              image_starts=jnp.zeros((batch, max_images), jnp.int32),
              image_valid=jnp.zeros((batch, max_images), bool))


def init_params(model_config: ml_collections.ConfigDict, rng: jax.Array, boxed: bool = False):
  """Freshly initialised parameters (float32 master weights by default).

  With `boxed=True` the leaves keep their `nn.LogicallyPartitioned` boxes, from
  which `nn.get_partition_spec` reads the logical axis names.
  """
  inputs = dummy_inputs(model_config)
  # Jitted: eager init dispatches every op of every layer one by one.
  variables = jax.jit(lambda r: Transfusion(model_config).init(r, **inputs))(rng)
  params = variables["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(model_config: ml_collections.ConfigDict):
  """Boxed ShapeDtypeStructs of the parameters, without allocating them."""
  return jax.eval_shape(lambda r: init_params(model_config, r, boxed=True), jax.random.key(0))


def count_params(params) -> dict[str, int]:
  """Parameter counts split as transformer / embeddings / patch layers."""
  params = nn.unbox(params)
  counts = {"transformer": 0, "embeddings": 0, "patch": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = str(getattr(path[0], "key", path[0]))
    n = int(leaf.size)
    if top in ("embedding", "output"):
      counts["embeddings"] += n
    elif top in ("transformer", "final_norm"):
      counts["transformer"] += n
    else:  # patch_encoder, patch_decoder, timestep_embedding
      counts["patch"] += n
  counts["total"] = sum(counts.values())
  return counts


__all__ = ["Transfusion", "ModelOutput", "KVCache", "init_params", "abstract_params",
           "count_params", "dummy_inputs"]
