"""Metrics: FLOPs over unmasked pairs, JSONL + TensorBoard output, resume truncation."""
import glob
import os

import numpy as np

from configs.tiny import get_config
from tfjax.ops.mask import transfusion_mask
from tfjax.train.flops import attention_flops, matmul_params, peak_tflops, step_flops, unmasked_pairs
from tfjax.train.metrics import MetricsWriter, Throughput, read_jsonl
from tfjax.train.report import write_report
from tfjax.train.synthetic import synthetic_batch


def test_unmasked_pairs_match_the_mask():
  c = get_config()
  b = synthetic_batch(c, 3, batch_size=4)
  expected = int(np.asarray(transfusion_mask(b["segment_ids"], b["image_ids"])).sum())
  assert unmasked_pairs(b["segment_ids"], b["image_ids"]) == expected
  assert b["image_valid"].any()  # the batch really has bidirectional image blocks


def test_step_flops_is_6nd_plus_attention():
  c = get_config()
  seg = np.ones((2, 16), np.int32)
  ids = np.zeros((2, 16), np.int32)
  pairs = 2 * 16 * 17 // 2
  assert step_flops(c.model, seg, ids) == 6 * matmul_params(c.model) * 32 + attention_flops(
      c.model, pairs)
  assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5") == 459.0
  assert peak_tflops("cpu") == 0.0 and peak_tflops("cpu", 2.0) == 2.0
  t = Throughput(c.model, num_devices=1, peak_tflops_per_device=1.0)
  out = t(0.5, seg, ids, np.ones((2, 1), bool))
  assert out["tokens_per_s"] == 64 and out["images_per_s"] == 4
  np.testing.assert_allclose(out["mfu"], step_flops(c.model, seg, ids) / 0.5 / 1e12)


def test_writer_jsonl_tensorboard_and_resume(tmp_path):
  wd = str(tmp_path)
  w = MetricsWriter(wd, total_steps=4, progress=False)
  for step in range(1, 5):
    w.write(step, {"loss": 1.0 / step, "loss_lm": 0.5, "loss_diffusion": 0.1, "lr": 1e-3,
                   "grad_norm": 1.0, "tokens_per_s": 10.0, "mfu": 0.0, "step_time": 0.1})
  w.write(4, {"loss": 0.3}, prefix="val_")
  w.close()
  recs = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 4] and recs[-1]["val_loss"] == 0.3
  assert glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
  # A run resumed from step 2: its curve drops the records after step 2 ...
  w = MetricsWriter(wd, total_steps=4, start_step=2, progress=False, use_tensorboard=False)
  w.write(3, {"loss": 0.9})
  w.close()
  assert [r["step"] for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))] == [1, 2, 3]
  # ... while the file keeps every record, with a marker where the run resumed.
  from tfjax.train.metrics import read_history
  history = read_history(os.path.join(wd, "metrics.jsonl"))
  assert [(r["step"], r.get("event")) for r in history] == [
      (1, None), (2, None), (3, None), (4, None), (4, None), (2, "resume"), (3, None)]
  path = write_report(get_config(), wd)
  assert "loss_curves.png" in open(path).read()
  assert os.path.exists(os.path.join(wd, "loss_curves.png"))
