"""The benchmarks' layout helpers (tfjax.bench) and the kernel lab's scripts
(tools/kernel_lab/, loaded or run by path): attention_power.py's CPU run,
ds_precision.py's storage formats and finding, mgpu_trace.py's profile
statistics."""
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tfjax.bench import attention_layout
from tfjax.bench.attention import packed_documents
from tfjax.ops.mask import transfusion_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(ROOT, "tools", "kernel_lab")
# The scripts import the package: this tree's, installed or not.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def _lab(name):
  """The globals of a kernel-lab script (its main() not run)."""
  return runpy.run_path(os.path.join(LAB, name + ".py"))


def test_packed_documents_cover_each_row_once():
  doc, _ = attention_layout.make_layout(2, 1024)
  offsets, lengths = packed_documents(doc)
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
  doc, img = _lab("attention_power")["make_ids"](name, 2, 64)
  mask = np.asarray(transfusion_mask(np.asarray(doc), np.asarray(img)))
  q, k = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
  want = (q // 16 == k // 16) & (bidirectional | (k <= q))
  assert mask.shape[-2:] == (64, 64)
  np.testing.assert_array_equal(mask.reshape(-1, 64, 64)[0], want)
  np.testing.assert_array_equal(mask.reshape(-1, 64, 64)[-1], want)


def test_synthetic_layout_names_are_checked():
  with pytest.raises(ValueError, match="--layouts docs48"):
    _lab("attention_power")["make_ids"]("docs48", 1, 64)


def test_attention_power_quick_prints_json_without_power_figures():
  out = subprocess.run([sys.executable, os.path.join(LAB, "attention_power.py"), "--quick"],
                       env=ENV, capture_output=True, text=True, timeout=600)
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
  round_to = _lab("ds_precision")["round_to"]
  for fmt, bound in (("e4m3", 2.0 ** -4), ("e5m2", 2.0 ** -3), ("bf16", 2.0 ** -8)):
    y = round_to(x, fmt)
    for tile in (np.s_[:64, :64], np.s_[64:, 64:], np.s_[:64, 64:]):
      err = np.abs(y[tile] - x[tile]).max() / np.abs(x[tile]).max()
      assert 0 < err <= bound, (fmt, tile, err)


def test_ds_precision_quick_finds_only_bf16_within_tolerance():
  out = subprocess.run([sys.executable, os.path.join(LAB, "ds_precision.py"), "--quick"],
                       env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  head = json.loads(out.stdout.strip().splitlines()[-1])
  assert head["rel_err_dq_bf16"] < head["tolerance"] < head["rel_err_dq_e4m3"]
  assert head["rel_err_dq_e4m3"] < head["rel_err_dq_e5m2"]


def test_trace_regions_and_gaps_from_a_profile():
  """mgpu_trace.region_stats pairs nested B/E events per warpgroup, tells the
  producer (last warpgroup) from the consumers, and measures the idle time
  between a consumer's top-level regions inside its outermost one."""
  region_stats = _lab("mgpu_trace")["region_stats"]
  ev = lambda tid, name, ph, ts: {"tid": tid, "name": name, "ph": ph, "ts": ts}
  consumer = [ev(1, "consumer", "B", 0), ev(1, "kv_wait", "B", 0), ev(1, "kv_wait", "E", 2),
              ev(1, "tiles", "B", 3), ev(1, "tile", "B", 3), ev(1, "tile", "E", 5),
              ev(1, "tiles", "E", 6), ev(1, "store", "B", 6.5), ev(1, "store", "E", 7),
              ev(1, "consumer", "E", 7)]
  producer = [ev(3, "producer", "B", 0), ev(3, "producer", "E", 4)]
  stats = region_stats(consumer + producer, warpgroups=3)
  r = stats["regions"]
  assert r[("c", "kv_wait")] == [2] and r[("c", "tiles")] == [3] and r[("c", "tile")] == [2]
  assert r[("c", "consumer")] == [7] and r[("p", "producer")] == [4]
  assert stats["gaps"] == {"kv_wait->tiles": [1], "tiles->store": [0.5]}
