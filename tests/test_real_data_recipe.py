"""docs/real_data.md's CPU block, run verbatim: generated img2dataset-style
shards and a JSONL corpus -> text copy + tokenizer -> the latent job as two
processes -> a few training steps of the tiny model on the result."""
import json
import math
import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"tfjax-data": "tfjax.cli.data", "tfjax-train": "tfjax.cli.train"}


def recipe_block() -> str:
  with open(os.path.join(ROOT, "docs", "real_data.md")) as f:
    doc = f.read()
  block = re.search(r"<!-- cpu-recipe:begin -->\n```bash\n(.*?)```\n<!-- cpu-recipe:end -->",
                    doc, re.S)
  assert block, "docs/real_data.md lost its cpu-recipe block"
  return block.group(1)


@pytest.mark.long
def test_recipe_runs_end_to_end_on_cpu(tmp_path):
  # The console scripts of this tree (an installed tfjax may be another checkout).
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, module in COMMANDS.items():
    shim = bin_dir / name
    shim.write_text(f'#!/bin/bash\nexec "{sys.executable}" -m {module} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
  env = dict(os.environ, D=str(tmp_path / "work"),
             PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
  out = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe_block()], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  data = tmp_path / "work" / "run" / "data"
  with open(data / "latents" / "metadata.json") as f:
    meta = json.load(f)
  with open(tmp_path / "work" / "shards" / "expected.json") as f:
    expected = json.load(f)["webdataset"]
  assert sum(s["num_records"] for s in meta["splits"].values()) == len(expected["good"])
  assert sum(meta["skip_counts"].values()) == len(expected["bad"])
  assert meta["dtype"] == "bfloat16"
  # `show` reports the latent job's skips by reason (the validation split holds the rest).
  counts = json.loads(re.search(r"skip counts: (\{.*\})", out.stdout).group(1))
  assert counts and set(counts) <= set(meta["skip_counts"])
  with open(tmp_path / "work" / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  steps = [r for r in rows if "loss" in r]
  assert steps and steps[-1]["step"] == 2    # configs/tiny.py logs every 50 steps and the last
  assert all(math.isfinite(r["loss"]) and r["num_images"] > 0 for r in steps)
