"""tfjax-compile: the 0.16B config's train step compiled for a 64-chip v5p slice.

Runs the real command in a subprocess (its own JAX runtime, libtpu's topology
description; no TPU needed) and checks the per-chip memory report.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_libtpu():
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _has_libtpu(), reason="needs libtpu: pip install 'jax[tpu]'")
def test_compile_160m_on_v5p_64_chips():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  # One sequence per chip keeps the CPU-side compile short; the layout (FSDP
  # over 64 chips) is the one a real run uses.
  out = subprocess.run(
      [sys.executable, "-m", "tfjax.cli.compile", "--config=configs/transfusion_160m.py",
       "--topology=v5p:4x4x4", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
       "--config.data.batch_size=64", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["num_devices"] == 64 and report["device_kind"].startswith("TPU v5")
  assert report["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  assert 0.1e9 < report["params"] < 0.3e9
  assert report["argument_bytes"] > 0 and report["temp_bytes"] > 0
  assert report["hbm_bytes"] == 95 * 1024 ** 3 and report["fits"] is True
  assert "total / chip" in out.stdout


def test_bad_topology_names_the_flag():
  from tfjax.train.aot import topology_devices
  if not _has_libtpu():
    pytest.skip("needs libtpu")
  with pytest.raises(ValueError, match="--topology=v99:1x1"):
    topology_devices("v99:1x1")
