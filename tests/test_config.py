"""Config files: every one validates, overrides apply, bad combinations name the key."""
import pathlib
import subprocess
import sys

import pytest

from tfjax import config as config_lib
from tfjax.cli.info import report

# Files with a get_config() of no argument (common.py is a library; transfusion.py takes a size).
CONFIGS = sorted(p for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common", "transfusion"))
PAPER_SIZES = ("160m", "370m", "760m", "1_4b", "7b")


def load(path):
  return config_lib.load_config_file(str(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_validates(path):
  c = load(path)
  if path.stem.startswith(("vae_", "sweep_")):  # not transformer-training configs
    return
  config_lib.validate(c)


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_sizes_validate_and_old_file_names_give_the_same_config(size):
  from configs import transfusion
  c = config_lib.validate(transfusion.get_config(size))
  assert c.name == f"transfusion_{size}" and c.data.seq_len == 4096
  assert load(CONFIGS[0].parent / f"transfusion_{size}.py").to_dict() == c.to_dict()
  assert config_lib.load_config_file(f"configs/transfusion.py:{size}",
                                     root=str(CONFIGS[0].parent.parent)).to_dict() == c.to_dict()


def test_paper_config_without_a_size_names_the_sizes():
  from configs import transfusion
  assert set(transfusion.SIZES) == set(PAPER_SIZES)
  with pytest.raises(config_lib.ConfigError, match="configs/transfusion.py:SIZE.*160m, 370m"):
    transfusion.get_config("9b")


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
    (lambda c: c.diffusion.update(strength=0.0), "diffusion.strength"),
    (lambda c: c.diffusion.update(strength=0.8), "diffusion.strength"),  # no init image here
    (lambda c: c.diffusion.update(image_cfg_scale=-1.0), "diffusion.image_cfg_scale"),
    (lambda c: c.diffusion.update(image_cfg_scale=1.5, cfg_scale=0.0), "diffusion.image_cfg_scale"),
    (lambda c: c.editing.update(instruction_dropout=1.0), "editing.instruction_dropout"),
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
  paper = subprocess.run(  # config_flags passes the text after ':' to get_config
      [sys.executable, "-m", "tfjax.cli.info", "--config=configs/transfusion.py:760m"],
      capture_output=True, text=True, cwd=CONFIGS[0].parent.parent, check=True).stdout
  assert "780.71M" in paper
  no_size = subprocess.run(
      [sys.executable, "-m", "tfjax.cli.info", "--config=configs/transfusion.py"],
      capture_output=True, text=True, cwd=CONFIGS[0].parent.parent)
  assert no_size.returncode == 2 and "needs a size" in no_size.stderr.splitlines()[0]
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
