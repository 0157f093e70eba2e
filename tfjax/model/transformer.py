"""The Llama-style decoder stack shared by text and image positions.

`Transformer` runs `num_layers` pre-norm blocks (attention + SwiGLU), under
`nn.scan` when `config.scan_layers` (compile time independent of depth) and
rematerialised by the policy `config.remat_policy`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from tfjax import config as config_lib
from tfjax.model.layers import RMSNorm, SwiGLU, apply_rope, dense_init
from tfjax.ops import attention as attention_op
from tfjax.ops import attention_plan
from tfjax.ops import transfusion_mask, xla_attention
from tfjax.ops.kernels.api import cached_attention

# Activations a block names with `checkpoint_name`, each [batch, seq, ...]:
# the projections (q/k/v after RoPE, the attention output before and after
# its output projection) and the MLP's gate, up and down products.
ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "out_proj")
MLP_NAMES = ("mlp_gate", "mlp_up", "mlp_out")
# The pre-norm outputs feeding the projections and the MLP, [batch, seq, dim].
NORM_NAMES = ("attention_norm_out", "mlp_norm_out")


def _offload(names: tuple[str, ...]):
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")


# What the backward pass keeps from the forward; everything else is recomputed.
REMAT_POLICIES = {
    # Keep nothing: the backward reruns the whole block (least memory, +1 forward).
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    # Every named activation: only norms, RoPE and elementwise work are redone.
    "save_all_names": jax.checkpoint_policies.save_only_these_names(
        *ATTENTION_NAMES, *MLP_NAMES),
    # Every named activation and both norm outputs: the backward redoes only
    # RoPE's and the elementwise work's inputs it cannot read back.
    "save_all": jax.checkpoint_policies.save_only_these_names(
        *ATTENTION_NAMES, *MLP_NAMES, *NORM_NAMES),
    # The attention side (its kernel is the costliest thing to redo); the MLP
    # products, the largest activations, are recomputed.
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES),
    # Only q, k, v and the attention output.
    "save_qkv_attention": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out"),
    # As save_all_names, but held in pinned host memory between the passes.
    "offload_all_names": _offload(ATTENTION_NAMES + MLP_NAMES),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,  # remat everything (jax.checkpoint's default)
}


def _dtype(name: str) -> Any:
  return jnp.dtype(name)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE under the Transfusion mask."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               image_ids: jax.Array, layer_kv: tuple[jax.Array, jax.Array] | None,
               cache_ctx: tuple[jax.Array, jax.Array, jax.Array] | None, plan=None,
               mask: jax.Array | None = None):
    """x: [batch, seq, dim] -> ([batch, seq, dim], this call's (k, v) or None).

    With `layer_kv` (the cache buffer, [batch, max_len, kv_heads, head_dim]
    each) the queries attend to the buffer's written slots and to this call's
    own keys; `cache_ctx` = (cache segment ids, cache image ids, length) as
    they were before this call, plus the queries' key intervals into the
    buffer (or None) for the kernel path. The buffer is only read here: the caller
    writes the returned (k, v) [batch, seq, kv_heads, head_dim] into it once,
    so a denoising step that discards them copies nothing. `plan`: the
    kernel's attention plan of this batch, shared by all layers (or None);
    `mask`: the XLA path's Transfusion mask of this batch, likewise (or None).
    """
    c = self.config
    dtype, pdtype = _dtype(c.dtype), _dtype(c.param_dtype)
    head_dim = c.dim // c.num_heads
    wq = self.param("wq", dense_init(("embed", "heads", "head_dim")),
                    (c.dim, c.num_heads, head_dim), pdtype)
    wk = self.param("wk", dense_init(("embed", "kv_heads", "head_dim")),
                    (c.dim, c.num_kv_heads, head_dim), pdtype)
    wv = self.param("wv", dense_init(("embed", "kv_heads", "head_dim")),
                    (c.dim, c.num_kv_heads, head_dim), pdtype)
    wo = self.param("wo", dense_init(("heads", "head_dim", "embed"), fan_in_axes=(0, 1)),
                    (c.num_heads, head_dim, c.dim), pdtype)
    q = jnp.einsum("bsd,dhk->bshk", x, wq.astype(dtype))
    k = jnp.einsum("bsd,dhk->bshk", x, wk.astype(dtype))
    v = jnp.einsum("bsd,dhk->bshk", x, wv.astype(dtype))
    if c.qk_norm:
      q = RMSNorm(c.norm_eps, dtype, pdtype, axis_name="head_dim", name="q_norm")(q)
      k = RMSNorm(c.norm_eps, dtype, pdtype, axis_name="head_dim", name="k_norm")(k)
    q = checkpoint_name(apply_rope(q, positions, c.rope_theta), "query_proj")
    k = checkpoint_name(apply_rope(k, positions, c.rope_theta), "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
    if layer_kv is None:
      with jax.named_scope("attention_core"):
        out = attention_op(q, k, v, segment_ids, image_ids, impl=c.attention_impl, plan=plan,
                           mask=mask)
      out = checkpoint_name(out, "attention_out")
      new_kv = None
    else:
      cache_segments, cache_images, length, ranges = cache_ctx
      out = None
      if ranges is not None:  # many queries (an image): the block-sparse kernel
        start = (0, length, 0, 0)
        k_buf = jax.lax.dynamic_update_slice(layer_kv[0], k.astype(layer_kv[0].dtype), start)
        v_buf = jax.lax.dynamic_update_slice(layer_kv[1], v.astype(layer_kv[1].dtype), start)
        out = cached_attention(q, k_buf.astype(dtype), v_buf.astype(dtype), *ranges,
                               impl=c.attention_impl)
      if out is None:
        seq, max_len = x.shape[1], layer_kv[0].shape[1]
        k_all = jnp.concatenate([layer_kv[0].astype(dtype), k], axis=1)
        v_all = jnp.concatenate([layer_kv[1].astype(dtype), v], axis=1)
        q_positions = (length + jnp.arange(seq))[None, :]
        mask = transfusion_mask(
            segment_ids, image_ids,
            jnp.concatenate([cache_segments, segment_ids], axis=1),
            jnp.concatenate([cache_images, image_ids], axis=1),
            q_positions=q_positions,
            kv_positions=jnp.concatenate([jnp.arange(max_len)[None, :], q_positions], axis=1))
        out = xla_attention(q, k_all, v_all, mask)
      new_kv = (k, v)
    return checkpoint_name(jnp.einsum("bshk,hkd->bsd", out, wo.astype(dtype)), "out_proj"), new_kv


class Block(nn.Module):
  """Decoder block, by `norm_placement`.

  pre (Llama):      x + attn(norm(x));  x + mlp(norm(x))
  chameleon:        x + norm(attn(x));  x + norm(mlp(x))   (Chameleon's
                    stability fix: the residual stream only ever receives
                    normalised updates, which bounds its growth)
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, layer_kv, context):
    """x: [batch, seq, dim]; context = (positions, segment_ids, image_ids,
    cache_ctx, attention plan, mask), the same for every layer (see Attention)."""
    c = self.config
    dtype, pdtype = _dtype(c.dtype), _dtype(c.param_dtype)
    positions, segment_ids, image_ids, cache_ctx, plan, mask = context
    placement = c.get("norm_placement", "pre")
    if placement not in ("pre", "chameleon"):
      raise ValueError(f"config key model.norm_placement: unknown {placement!r} (pre | chameleon)")
    attn_norm = RMSNorm(c.norm_eps, dtype, pdtype, name="attention_norm")
    mlp_norm = RMSNorm(c.norm_eps, dtype, pdtype, name="mlp_norm")
    attention = Attention(c, name="attention")
    mlp = SwiGLU(config_lib.mlp_dim(c), dtype, pdtype, name="mlp")
    if placement == "pre":
      h, new_kv = attention(checkpoint_name(attn_norm(x), "attention_norm_out"), positions,
                            segment_ids, image_ids, layer_kv, cache_ctx, plan, mask)
      x = x + h
      x = x + mlp(checkpoint_name(mlp_norm(x), "mlp_norm_out"))
    else:
      h, new_kv = attention(x, positions, segment_ids, image_ids, layer_kv, cache_ctx, plan, mask)
      x = x + attn_norm(h)
      x = x + mlp_norm(mlp(x))
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    return x, new_kv


class Transformer(nn.Module):
  """num_layers Blocks; returns ([batch, seq, dim], this call's k, v stacked
  [layers, batch, seq, kv_heads, head_dim] when decoding with a cache, else None)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, positions, segment_ids, image_ids, cache_kv=None, cache_ctx=None):
    c = self.config
    block = Block
    if c.remat_policy != "none":
      if c.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"config key model.remat_policy: unknown {c.remat_policy!r}; "
                         f"use none or one of {sorted(REMAT_POLICIES)}")
      block = nn.remat(Block, policy=REMAT_POLICIES[c.remat_policy],
                       prevent_cse=not c.scan_layers)
    elif cache_kv is not None:
      # Decoding: an opaque (checkpointed) layer body keeps nn.scan's partial
      # evaluation from splitting the kernel's block-map arithmetic off the
      # body ("broadcasted variable has a data dependency on the scan body",
      # seen on the H100). Without gradients the checkpoint costs nothing.
      block = nn.remat(Block, prevent_cse=not c.scan_layers)
    plan = mask = None
    if cache_kv is None:  # what attention needs of the mask, once for all layers
      with jax.named_scope("attention_plan"):
        plan = attention_plan(segment_ids, image_ids, head_dim=c.dim // c.num_heads,
                              dtype=_dtype(c.dtype), impl=c.attention_impl)
        if plan is None:  # impl resolves to the XLA reference: one mask for all layers
          mask = transfusion_mask(segment_ids, image_ids)
    context = (positions, segment_ids, image_ids, cache_ctx, plan, mask)
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0 if cache_kv is not None else nn.broadcast, nn.broadcast),
                      length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
                      unroll=min(c.get("scan_unroll", 1), c.num_layers))
      return stack(c, name="layers")(x, cache_kv, context)
    new_kvs = []
    for i in range(c.num_layers):
      layer_kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
      x, kv = block(c, name=f"layer_{i}")(x, layer_kv, context)
      new_kvs.append(kv)
    if cache_kv is None:
      return x, None
    return x, (jnp.stack([kv[0] for kv in new_kvs]), jnp.stack([kv[1] for kv in new_kvs]))
