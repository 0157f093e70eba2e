"""The benchmarks' own layout helpers, attention_power.py's CPU run, and
ds_precision.py's storage formats and finding."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import attention  # noqa: E402
import attention_layout  # noqa: E402
import attention_power  # noqa: E402
import ds_precision  # noqa: E402
from tfjax.ops.mask import transfusion_mask  # noqa: E402


def test_packed_documents_cover_each_row_once():
  doc, _ = attention_layout.make_layout(2, 1024)
  offsets, lengths = attention.packed_documents(doc)
  assert offsets.shape[1] == lengths.shape[1] + 1
  for b in range(2):
    n = int((lengths[b] > 0).sum())
    assert np.all(lengths[b, n:] == -1) and np.all(offsets[b, n:] == -1)
    assert lengths[b, :n].sum() == 1024
    starts = offsets[b, :n]
    assert starts[0] == 0 and np.all(np.diff(starts) == lengths[b, :n - 1])
    for s, n_tok in zip(starts, lengths[b, :n]):  # one id per document, a new one after
      assert len(set(doc[b, s:s + n_tok])) == 1
      assert s + n_tok == 1024 or doc[b, s + n_tok] != doc[b, s]


@pytest.mark.parametrize("name,bidirectional", [("docs16", False), ("bidi16", True)])
def test_synthetic_layouts_give_their_masks(name, bidirectional):
  doc, img = attention_power.make_ids(name, 2, 64)
  mask = np.asarray(transfusion_mask(np.asarray(doc), np.asarray(img)))
  q, k = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
  want = (q // 16 == k // 16) & (bidirectional | (k <= q))
  assert mask.shape[-2:] == (64, 64)
  np.testing.assert_array_equal(mask.reshape(-1, 64, 64)[0], want)
  np.testing.assert_array_equal(mask.reshape(-1, 64, 64)[-1], want)


def test_synthetic_layout_names_are_checked():
  with pytest.raises(ValueError, match="--layouts docs48"):
    attention_power.make_ids("docs48", 1, 64)


def test_attention_power_quick_prints_json_without_power_figures():
  out = subprocess.run([sys.executable, os.path.join(BENCH, "attention_power.py"), "--quick"],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  head = json.loads(out.stdout.strip().splitlines()[-1])
  assert head["fwd_bwd_ms"] > 0 and head["matmul_tflops"] > 0
  if shutil.which("nvidia-smi") is None:
    assert head["fwd_bwd_w"] is None and head["power_limit_w"] is None
  assert "256/64 benchmark default" in head["runs"]


def test_eight_bit_storage_scales_each_tile_on_its_own():
  """Tiles 1e9 apart in size each stay within the format's relative bound: one
  absmax scale per 64x64 tile, not one per matrix (whose small tiles would
  flush to zero)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((128, 128))
  x[:64, :64] *= 1e-6
  x[64:, 64:] *= 1e3
  for fmt, bound in (("e4m3", 2.0 ** -4), ("e5m2", 2.0 ** -3), ("bf16", 2.0 ** -8)):
    y = ds_precision.round_to(x, fmt)
    for tile in (np.s_[:64, :64], np.s_[64:, 64:], np.s_[:64, 64:]):
      err = np.abs(y[tile] - x[tile]).max() / np.abs(x[tile]).max()
      assert 0 < err <= bound, (fmt, tile, err)


def test_ds_precision_quick_finds_only_bf16_within_tolerance():
  out = subprocess.run([sys.executable, os.path.join(BENCH, "ds_precision.py"), "--quick"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  head = json.loads(out.stdout.strip().splitlines()[-1])
  assert head["rel_err_dq_bf16"] < head["tolerance"] < head["rel_err_dq_e4m3"]
  assert head["rel_err_dq_e4m3"] < head["rel_err_dq_e5m2"]
