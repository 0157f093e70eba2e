"""Metrics: FLOPs over unmasked pairs, JSONL + TensorBoard output, resume truncation."""
import glob
import json
import os

import numpy as np

from configs.tiny import get_config
from tfjax.ops.mask import transfusion_mask
from tfjax.train.flops import (attention_flops, block_params, jaxpr_matmul_flops, patch_flops,
                               peak_tflops, step_flops, unmasked_pairs)
from tfjax.train.metrics import MetricsWriter, Throughput, read_jsonl
from tfjax.train.report import write_report
from tfjax.train.synthetic import synthetic_batch


def test_unmasked_pairs_match_the_mask():
  c = get_config()
  b = synthetic_batch(c, 3, batch_size=4)
  expected = int(np.asarray(transfusion_mask(b["segment_ids"], b["image_ids"])).sum())
  assert unmasked_pairs(b["segment_ids"], b["image_ids"]) == expected
  assert b["image_valid"].any()  # the batch really has bidirectional image blocks


def test_step_flops_is_6nd_plus_head_at_text_plus_attention():
  c = get_config()
  seg = np.ones((2, 16), np.int32)
  ids = np.zeros((2, 16), np.int32)
  pairs = 2 * 16 * 17 // 2
  head = 6 * c.model.dim * c.model.vocab_size
  assert step_flops(c.model, seg, ids) == (6 * block_params(c.model) * 32 + head * 32
                                           + attention_flops(c.model, pairs))
  # The head is charged only where logits are scored; images add their patch layers.
  scored = np.zeros((2, 16), bool)
  scored[:, :5] = True
  assert step_flops(c.model, seg, ids, text_loss_mask=scored) == (
      step_flops(c.model, seg, ids) - head * 22)
  assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5") == 459.0
  assert peak_tflops("cpu") == 0.0 and peak_tflops("cpu", 2.0) == 2.0
  t = Throughput(c.model, num_devices=1, peak_tflops_per_device=1.0)
  out = t(0.5, seg, ids, np.ones((2, 1), bool))
  assert out["tokens_per_s"] == 64 and out["images_per_s"] == 4
  np.testing.assert_allclose(out["mfu"], step_flops(c.model, seg, ids) / 0.5 / 1e12)


def test_matmul_flops_count_padded_convolutions_and_scanned_bodies():
  """Counted from shapes on any backend: a SAME 3x3 convolution is charged
  every tap (XLA's CPU cost analysis skips the padded ones), a scanned matmul
  once per iteration, and a cond as its costliest branch."""
  import jax
  import jax.numpy as jnp
  x = jnp.zeros((1, 4, 4, 8))
  w = jnp.zeros((3, 3, 8, 16))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert jaxpr_matmul_flops(jax.make_jaxpr(conv)(x, w).jaxpr) == 2 * 4 * 4 * 16 * 8 * 9
  a = jnp.zeros((3, 5, 7))
  def scanned(a):
    return jax.lax.scan(lambda c, m: (c, jnp.dot(m, jnp.ones((7, 2)))), 0.0, a)[1]
  assert jaxpr_matmul_flops(jax.make_jaxpr(jax.jit(scanned))(a).jaxpr) == 3 * 2 * 5 * 7 * 2
  m = jnp.zeros((5, 7))
  branchy = lambda p, m: jax.lax.cond(p, lambda m: m @ jnp.ones((7, 2)), lambda m: m[:, :2], m)
  assert jaxpr_matmul_flops(jax.make_jaxpr(branchy)(True, m).jaxpr) == 2 * 5 * 7 * 2  # one branch
  c = get_config()
  c.model.patch_type = "linear"
  linear = patch_flops(c.model, 1)
  c.model.update(patch_type="unet", unet_channels=(8, 16))
  assert patch_flops(c.model, 2) == 2 * patch_flops(c.model, 1) > 2 * linear


def test_flop_count_matches_xla_cost_analysis_of_the_loss_gradient():
  """The count's parts, applied to what the compiled program computes (head at
  every position, dense attention, every image slot), are XLA's own count of
  the loss gradient within 10% (the rest is norms, softmax and losses)."""
  import jax
  import jax.numpy as jnp
  from tfjax.batch import Batch
  from tfjax.config import default_config
  from tfjax.losses import transfusion_loss
  from tfjax.model import Transfusion, init_params
  c = default_config()
  c.model.update(dim=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=1024,
                 attention_impl="xla", remat_policy="none", scan_layers=False,
                 latent_size=8, latent_channels=4, patch_size=2, dtype="float32")
  c.data.update(seq_len=128, batch_size=2, max_images_per_seq=2)
  arrays = synthetic_batch(c, 0, batch_size=2)
  batch = Batch.from_dict({k: jnp.asarray(v) for k, v in arrays.items()})
  params = init_params(c.model, jax.random.key(0))
  model = Transfusion(c.model)
  grad = jax.grad(lambda p: transfusion_loss(p, batch, jax.random.key(1), model=model,
                                             config=c)[0])
  cost = jax.jit(grad).lower(params).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  m, (b, s) = c.model, arrays["segment_ids"].shape
  computed = (6 * block_params(m) * b * s + 6 * m.dim * m.vocab_size * b * s
              + patch_flops(m, b * c.data.max_images_per_seq)
              + attention_flops(m, b * s * s))
  assert abs(xla / computed - 1) < 0.10, (xla, computed)
  honest = step_flops(m, arrays["segment_ids"], arrays["image_ids"],
                      text_loss_mask=arrays["text_loss_mask"])
  assert honest < computed


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
  # The main job's per-stage wall and CPU seconds become the Stages table.
  for name, secs in (("stage_seconds.json", {"vae": 10.0, "train": 30.5}),
                     ("stage_cpu_seconds.json", {"vae": 18.0, "train": 59.0})):
    with open(os.path.join(wd, name), "w") as f:
      json.dump(secs, f)
  path = write_report(get_config(), wd)
  text = open(path).read()
  assert "loss_curves.png" in text
  assert "| train | 30.5 | 59.0 |" in text and "| total | 40.5 | 77.0 |" in text
  assert os.path.exists(os.path.join(wd, "loss_curves.png"))


def test_gpu_xla_flags_keep_what_the_user_set():
  from tfjax.train.xla_flags import GPU_FLAGS, gpu_flags_string
  out = gpu_flags_string("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d")
  assert "--xla_gpu_enable_latency_hiding_scheduler=false" in out
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in out
  assert out.startswith("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d")
  assert all(f"--{k}=" in out for k in GPU_FLAGS)
  assert "triton_gemm" not in out  # measured slower on one H100 (RESULTS.md, Training)


def test_cpu_xla_flags_turn_ynnpack_fusions_off_unless_the_user_chose(monkeypatch):
  from tfjax.train.xla_flags import set_cpu_flags
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
  set_cpu_flags()
  assert os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/d",
                                             "--xla_cpu_experimental_ynn_fusion_type="]
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  set_cpu_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.delenv("XLA_FLAGS")
  set_cpu_flags(enabled=False)  # config key train.xla_cpu_flags = False
  assert "XLA_FLAGS" not in os.environ
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.setattr("tfjax.train.xla_flags._cuda_plugin_installed", lambda: True)
  set_cpu_flags()  # a GPU machine: its JAX may lack the flag
  assert "XLA_FLAGS" not in os.environ
