"""Model FLOPs for MFU: 6 * N * tokens plus attention over the unmasked pairs.

N counts the weights every position multiplies by (the transformer's matrices,
the output projection and the patch layers), not the embedding table, which is
a lookup. Attention is counted only over query/key pairs the Transfusion mask
allows, so packing and image bidirectionality are reflected honestly: a
document-causal mask costs about half of dense, not all of it.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from tfjax.config import mlp_dim

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


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Weights multiplied per position (embedding lookup excluded)."""
  head_dim = model.dim // model.num_heads
  attn = model.dim * head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)
  mlp = 3 * model.dim * mlp_dim(model)
  patch_in = model.patch_size ** 2 * model.latent_channels * model.dim
  # The output head is vocab-sized for text and patch-sized for images; an
  # average over positions is not known here, so both are counted (the patch
  # head is tiny).
  heads = model.dim * model.vocab_size + patch_in
  return model.num_layers * (attn + mlp) + heads + patch_in


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
               image_ids: np.ndarray, training: bool = True) -> float:
  """Model FLOPs of one step over a batch (forward + backward when training)."""
  tokens = int((np.asarray(segment_ids) != 0).sum())
  dense = (6.0 if training else 2.0) * matmul_params(model) * tokens
  return dense + attention_flops(model, unmasked_pairs(segment_ids, image_ids), training)


def dense_step_flops(model: ml_collections.ConfigDict, batch_size: int, seq_len: int,
                     doc_len: int | None = None) -> float:
  """FLOPs of a full batch of causal documents of `doc_len` (default seq_len),
  for planning without a batch (benchmarks, tfjax-compile)."""
  doc_len = seq_len if doc_len is None else doc_len
  docs, rest = divmod(seq_len, doc_len)
  pairs = batch_size * (docs * doc_len * (doc_len + 1) // 2 + rest * (rest + 1) // 2)
  return 6.0 * matmul_params(model) * batch_size * seq_len + attention_flops(model, pairs)

