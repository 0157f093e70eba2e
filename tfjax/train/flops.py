"""Model FLOPs for MFU: the work the model must do for one batch, and no more.

The convention, per step (training counts forward + backward as 3x forward):
- transformer: 6 * N * tokens, N the weights of the decoder blocks (attention
  projections, SwiGLU) and tokens the non-padding positions;
- LM head: 6 * dim * vocab at the scored text positions only (where logits
  feed the loss), not at image or padding positions;
- patch layers: the encoder + decoder + timestep embedding of each valid image
  (the matmuls and convolutions of their traced forward, padded windows
  included, so U-Net convolutions are charged as a GEMM runs them), times 3;
- attention: QK^T and PV over the (query, key) pairs the Transfusion mask
  allows, so packing and bidirectional images are charged what they cost.
The embedding lookup, norms, softmax, losses and the optimizer are not model
FLOPs. `tests/test_train_metrics.py` holds the count against XLA's cost
analysis of a compiled step.
"""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfjax.config import mlp_dim, patches_per_image
from tfjax.model.patch import TimestepEmbedding, patch_layers

# Dense bf16 peak TFLOP/s per chip, matched against `device.device_kind`
# (first matching substring wins, so specific names come first).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def peak_tflops(device_kind: str, configured: float = 0.0) -> float:
  """Per-device peak: train.peak_tflops if set, else the table; 0 if unknown (CPU)."""
  if configured > 0:
    return float(configured)
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return 0.0


def block_params(model: ml_collections.ConfigDict) -> int:
  """Weights of the decoder blocks, multiplied at every position."""
  head_dim = model.dim // model.num_heads
  attn = model.dim * head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)
  mlp = 3 * model.dim * mlp_dim(model)
  return model.num_layers * (attn + mlp)


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Weights multiplied per position for planning (blocks + LM head + linear
  patch in/out); `step_flops` charges the head and patch layers exactly."""
  patch = model.patch_size ** 2 * model.latent_channels * model.dim
  return block_params(model) + model.dim * model.vocab_size + 2 * patch


def _sub_jaxprs(eqn):
  """The jaxprs an equation calls (pjit, remat, custom_jvp, cond branches, scan body)."""
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr


def jaxpr_matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and convolution in `jaxpr`.

  Counted from shapes, so every backend gets the same number: XLA's cost
  analysis counts only the unpadded taps of a convolution on CPU (19% fewer
  for the science U-Net) and fewer still on GPU, which made one run's FLOP
  budget depend on where it was planned.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      taps = rhs[spec[1]] * np.prod([rhs[i] for i in spec[2:]])
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * taps
    inner = [jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn)]
    if name == "cond":  # one branch runs
      total += max(inner, default=0.0)
    else:
      total += (eqn.params["length"] if name == "scan" else 1) * sum(inner)
  return float(total)


@functools.lru_cache(maxsize=16)
def _patch_forward_flops(model_json: str) -> float:
  """Matmul and convolution FLOPs of one image through the patch encoder,
  decoder and timestep embedding (forward), from the traced program."""
  model = ml_collections.ConfigDict(json.loads(model_json))
  encoder_cls, decoder_cls = patch_layers(model)

  class PatchPath(nn.Module):
    @nn.compact
    def __call__(self, latents, t):
      t_emb = TimestepEmbedding(model.dim, model.time_embed_dim, jnp.float32)(t)
      patches, skips = encoder_cls(model)(latents, t_emb)
      return decoder_cls(model)(patches, t_emb, skips)

  side = model.latent_size
  latents = jax.ShapeDtypeStruct((1, 1, side, side, model.latent_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  module = PatchPath()
  params = jax.eval_shape(module.init, jax.random.key(0), latents, t)
  return jaxpr_matmul_flops(jax.make_jaxpr(module.apply)(params, latents, t).jaxpr)


def patch_flops(model: ml_collections.ConfigDict, num_images: int, training: bool = True) -> float:
  """FLOPs of the patch layers for `num_images` images."""
  forward = _patch_forward_flops(model.to_json()) * num_images
  return 3.0 * forward if training else forward


def unmasked_pairs(segment_ids: np.ndarray, image_ids: np.ndarray) -> int:
  """Number of (query, key) pairs the Transfusion mask allows, summed over the batch.

  Same rule as tfjax.ops.mask.key_ranges (contiguous documents and images), in
  numpy so it costs nothing on the accelerator.
  """
  segment_ids = np.asarray(segment_ids)
  image_ids = np.asarray(image_ids)
  _, seq = segment_ids.shape
  idx = np.broadcast_to(np.arange(seq), segment_ids.shape)
  new_doc = np.concatenate([np.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  k_start = np.maximum.accumulate(np.where(new_doc, idx, 0), axis=1)
  ends_run = np.concatenate(
      [(image_ids[:, 1:] != image_ids[:, :-1]) | (segment_ids[:, 1:] != segment_ids[:, :-1]),
       np.ones_like(image_ids[:, :1], bool)], axis=1)
  run_end = np.flip(np.minimum.accumulate(np.flip(np.where(ends_run, idx, seq), 1), axis=1), 1)
  k_end = np.where(image_ids != 0, run_end + 1, idx + 1)
  return int(np.where(segment_ids != 0, k_end - k_start, 0).sum())


def attention_flops(model: ml_collections.ConfigDict, pairs: int, training: bool = True) -> float:
  """QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, per head dim and pair."""
  forward = 4.0 * model.num_layers * model.dim * pairs
  return 3.0 * forward if training else forward


def step_flops(model: ml_collections.ConfigDict, segment_ids: np.ndarray,
               image_ids: np.ndarray, training: bool = True,
               text_loss_mask: np.ndarray | None = None) -> float:
  """Model FLOPs of one step over a batch (forward + backward when training).

  text_loss_mask: where logits are scored; default every non-padding position
  outside an image (BOI/EOI included, a few positions more than the loss uses).
  """
  segment_ids, image_ids = np.asarray(segment_ids), np.asarray(image_ids)
  tokens = int((segment_ids != 0).sum())
  if text_loss_mask is None:
    text_loss_mask = (segment_ids != 0) & (image_ids == 0)
  scored = int(np.asarray(text_loss_mask).sum())
  per_image = patches_per_image(model)
  images = int((image_ids != 0).sum()) // per_image
  mult = 6.0 if training else 2.0
  return (mult * block_params(model) * tokens + mult * model.dim * model.vocab_size * scored
          + patch_flops(model, images, training)
          + attention_flops(model, unmasked_pairs(segment_ids, image_ids), training))


def dense_step_flops(model: ml_collections.ConfigDict, batch_size: int, seq_len: int,
                     doc_len: int | None = None) -> float:
  """FLOPs of a full batch of causal documents of `doc_len` (default seq_len),
  for planning without a batch (benchmarks, tfjax-compile)."""
  doc_len = seq_len if doc_len is None else doc_len
  docs, rest = divmod(seq_len, doc_len)
  pairs = batch_size * (docs * doc_len * (doc_len + 1) // 2 + rest * (rest + 1) // 2)
  return 6.0 * matmul_params(model) * batch_size * seq_len + attention_flops(model, pairs)

