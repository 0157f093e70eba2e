"""Shared test set-up: 8 fake CPU devices for every test file, and markers.

The whole pytest session shares one JAX backend, so the device count must be
fixed before anything imports jax: here, at conftest import. Single-device
code is unaffected (it uses jax.devices()[0] or builds a 1-device mesh);
sharded tests build a 2x2x2 (data x fsdp x tensor) mesh over all 8.
"""
import glob
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# libtpu (installed for TPU topology compiles) otherwise takes a machine-wide
# lock that makes a second process's topology lookup fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Without a GPU the tests run on CPU: say so, so that JAX does not probe the
# installed libtpu for TPU hardware (slow, and noisy on stderr).
if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/accel0"):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session's workers and the
# subprocesses they start (CLI and notebook tests), so that the many tests
# building the same tiny configs compile each program once. Measured on the
# 2-core CI machine: a 12-step tiny training run took 98 s with a cold cache
# and 29 s with a warm one (compiling its init and train step, 30 s + 42 s,
# dominates). CPU-only runs only (a GPU machine keeps JAX's defaults); a
# JAX_COMPILATION_CACHE_DIR set by the user is kept and left in place,
# otherwise the directory lives for this session only.
if os.environ.get("JAX_PLATFORMS") == "cpu" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfjax-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a GPU (skipped without one)")
  config.addinivalue_line("markers", "slow: slow; not needed for an issue's bar")
  config.addinivalue_line("markers", "long: among the suite's longest tests; run first")


def pytest_collection_modifyitems(config, items):
  import jax
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)
  # pytest-xdist hands tests out in collection order: a long test collected
  # late ran alone on one worker at the end (CI, 2026-12-02: the tiny VAE
  # test kept one of the two workers busy ~16 minutes after the other had
  # finished). Stable sort: order is otherwise unchanged.
  items.sort(key=lambda item: "long" not in item.keywords)
