"""Config files: every one validates, overrides apply, bad combinations name the key."""
import pathlib
import subprocess
import sys

import pytest

from tfjax import config as config_lib
from tfjax.cli.info import report

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_validates(path):
  c = load(path)
  if path.stem.startswith(("vae_", "sweep_")):  # not transformer-training configs
    return
  config_lib.validate(c)


@pytest.mark.parametrize("change,key", [
    (lambda c: c.model.update(patch_size=3), "model.patch_size"),
    (lambda c: c.model.update(patch_size=16), "model.patch_size"),   # does not divide 8
    (lambda c: c.model.update(num_heads=5), "model.num_heads"),
    (lambda c: c.model.update(num_kv_heads=3), "model.num_kv_heads"),
    (lambda c: c.data.update(seq_len=12), "data.seq_len"),           # image longer than sequence
    (lambda c: c.model.update(latent_size=16), "model.latent_size"),
    (lambda c: c.model.update(patch_type="unet", unet_channels=(8, 8, 8)), "model.unet_channels"),
    (lambda c: c.diffusion.update(objective="score"), "diffusion.objective"),
    (lambda c: c.train.update(grad_accum_steps=3), "train.grad_accum_steps"),
])
def test_invalid_combinations_name_the_key(change, key):
  c = load(CONFIGS[0].parent / "tiny.py")
  change(c)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


def test_command_line_overrides_reach_the_config():
  out = subprocess.run(
      [sys.executable, "-m", "tfjax.cli.info", "--config=configs/tiny.py",
       "--config.model.num_layers=3", "--config.model.dim=64"],
      capture_output=True, text=True, cwd=CONFIGS[0].parent.parent, check=True).stdout
  assert "3 layers, dim 64" in out
  bad = subprocess.run(
      [sys.executable, "-m", "tfjax.cli.info", "--config=configs/tiny.py",
       "--config.model.patch_size=3"],
      capture_output=True, text=True, cwd=CONFIGS[0].parent.parent)
  assert bad.returncode != 0 and "model.patch_size" in bad.stderr


def test_info_report_splits_counts():
  c = load(CONFIGS[0].parent / "tiny.py")
  text = report(c)
  for part in ("transformer", "embeddings", "patch enc/dec", "total"):
    assert part in text


def test_train_refuses_a_chameleon_config_naming_the_key(tmp_path):
  from tfjax.jobs import transfusion
  c = load(CONFIGS[0].parent / "chameleon_tiny.py")
  with pytest.raises(ValueError, match=r"chameleon\.enabled.*tfjax-chameleon"):
    transfusion.run(c, str(tmp_path))
