"""Training FLOPs of a sweep run, in tfjax/train/flops.py's convention.

Both families are charged the same way: 6 x block weights per token, the
output head at every scored position (Chameleon scores its VQ codes, so its
larger head is charged at image positions too), the patch layers of every
Transfusion image (U-Net convolutions included), and attention over the
(query, key) pairs the mask allows.

  planned_step_flops  before training, from the config and the expected
                      layout of a packed batch (for budgets in FLOPs)
  measured_flops      after training, from the run's metrics.jsonl: the
                      trainer's own step_flops of every batch it trained on
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from tfjax.config import patches_per_image
from tfjax.train.flops import attention_flops, block_params, patch_flops

# The packed shapes batch (64x64 scenes of 1-3 objects, 8x8 latents, shapes
# tokenizer), measured on the real pipeline: captions average 12 tokens, text
# documents 76 positions (BOS/EOS included), rows are 95% non-padding. With
# configs/science_gpu's 32 x 256 batches the plan is within 3% of step_flops
# over real batches for linear / U-Net patches and patch 1, 2, 4; rows of 128
# pack patch-1 images (80-position documents) worse: there it is 24% high.
SHAPES_LAYOUT = {"caption_tokens": 12.0, "text_doc_positions": 76.0, "fill": 0.95}


def planned_step_flops(config: ml_collections.ConfigDict,
                       layout: dict[str, float] | None = None) -> float:
  """Expected model FLOPs of one training step (forward + backward).

  An image document is BOS caption BOI <P image positions> EOI EOS; image
  documents take 1 / (1 + data.text_image_ratio) of the positions. P is the
  patches per image (Chameleon: the VQ codes, model.patch_size 1).
  """
  lay = {**SHAPES_LAYOUT, **(layout or {})}
  m, d = config.model, config.data
  chameleon = bool(config.chameleon.enabled)
  positions = d.batch_size * d.seq_len * lay["fill"]
  p = patches_per_image(m)
  img_doc = lay["caption_tokens"] + p + 4
  txt_doc = lay["text_doc_positions"]
  img_share = 1.0 / (1.0 + d.text_image_ratio) if d.image_text_source != "none" else 0.0
  images = positions * img_share / img_doc
  text_docs = positions * (1.0 - img_share) / txt_doc
  bidirectional = not chameleon and m.image_attention == "bidirectional"
  pairs = (images * (img_doc * (img_doc + 1) / 2 + (p * (p - 1) / 2 if bidirectional else 0))
           + text_docs * txt_doc * (txt_doc + 1) / 2)
  scored = positions if chameleon else positions - images * p
  flops = 6.0 * block_params(m) * positions + 6.0 * m.dim * m.vocab_size * scored
  flops += attention_flops(m, int(pairs))
  if not chameleon:
    flops += patch_flops(m, 1) * images
  return float(flops)


def measured_flops(records: Sequence[dict[str, Any]], num_devices: int = 1) -> float | None:
  """Training FLOPs from metrics.jsonl records, None when none carries them.

  Each log record's `tflops_per_device` x `step_time` is the mean step_flops
  of the batches since the previous log record (the trainer's Throughput); the
  first window's mean also stands for the compile step it leaves out.
  """
  by_step = {int(r["step"]): r for r in records
             if r.get("tflops_per_device") is not None and r.get("step_time") is not None}
  if not by_step:
    return None
  total, prev = 0.0, 0
  for step in sorted(by_step):
    r = by_step[step]
    total += r["tflops_per_device"] * 1e12 * r["step_time"] * num_devices * (step - prev)
    prev = step
  return total
