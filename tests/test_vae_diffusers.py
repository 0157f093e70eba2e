"""Parity with diffusers' AutoencoderKL (PyTorch, CPU) after import into Flax."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tfjax.vae  # noqa: E402
from tfjax.vae import diffusers_import  # noqa: E402

LAYOUTS = {
    # Stable Diffusion: quant convs, mid attention, two ResNets per level.
    "sd": dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4,
               norm_num_groups=8),
    # FLUX: no quant convs, a shift factor, 16 latent channels.
    "flux": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=16,
                 norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159),
}


def _save(tmp_path, name, **kw):
  torch.manual_seed(0)
  n = len(kw["block_out_channels"])
  model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kw).eval()
  with torch.no_grad():   # non-trivial norm affine params, so a swapped scale/bias shows
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.add_(0.2 * torch.randn_like(p))
  path = str(tmp_path / name)
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parity(tmp_path, layout):
  model, path = _save(tmp_path, layout, **LAYOUTS[layout])
  vae = tfjax.vae.load(path)
  f = 2 ** (len(LAYOUTS[layout]["block_out_channels"]) - 1)
  assert vae.downsample == f
  assert vae.latent_channels == LAYOUTS[layout]["latent_channels"]
  assert vae.scale == pytest.approx(LAYOUTS[layout].get("scaling_factor", 0.18215))
  assert vae.shift == pytest.approx(LAYOUTS[layout].get("shift_factor", 0.0))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    mean = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
    out = model.decode(mean).sample
  mean = mean.permute(0, 2, 3, 1).numpy()
  out = out.permute(0, 2, 3, 1).numpy()
  z = vae.encode(x)
  assert z.shape == mean.shape
  assert _rel(z, mean) < 1e-4
  assert _rel(vae.decode(mean), out) < 1e-4


def test_unsupported_block_type_names_key(tmp_path):
  _, path = _save(tmp_path, "sd", **LAYOUTS["flux"])
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(diffusers_import.UnsupportedCheckpoint, match="down_block_types"):
    tfjax.vae.load(path)


def test_unknown_weight_names_key(tmp_path):
  import safetensors.numpy
  _, path = _save(tmp_path, "sd", **LAYOUTS["flux"])
  wpath = os.path.join(path, diffusers_import.WEIGHTS_FILE)
  state = safetensors.numpy.load_file(wpath)
  state["encoder.down_blocks.0.attentions.0.to_q.weight"] = np.zeros((16, 16), np.float32)
  safetensors.numpy.save_file(state, wpath)
  with pytest.raises(diffusers_import.UnsupportedCheckpoint,
                     match=r"encoder\.down_blocks\.0\.attentions\.0\.to_q\.weight"):
    tfjax.vae.load(path)


def test_legacy_attention_names_load_the_same(tmp_path):
  """Checkpoints from before diffusers renamed query/key/value/proj_attn."""
  import safetensors.numpy
  _, path = _save(tmp_path, "flux", **LAYOUTS["flux"])
  x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  want = np.asarray(tfjax.vae.load(path).encode(x))
  wpath = os.path.join(path, diffusers_import.WEIGHTS_FILE)
  new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for k, v in safetensors.numpy.load_file(wpath).items():
    for new, old in new_to_old.items():
      k = k.replace(f".{new}.", f".{old}.")
    state[k] = v
  assert any(".proj_attn." in k for k in state)
  safetensors.numpy.save_file(state, wpath)
  np.testing.assert_array_equal(np.asarray(tfjax.vae.load(path).encode(x)), want)
