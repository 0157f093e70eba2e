"""Import a diffusers `AutoencoderKL` directory into the Flax `AutoencoderKL`.

A diffusers directory holds `config.json` and `diffusion_pytorch_model.safetensors`
(PyTorch layouts: conv weights `[out, in, kh, kw]`, linear `[out, in]`). Reading
needs neither torch nor diffusers. Supported: the Stable Diffusion layout
(DownEncoderBlock2D / UpDecoderBlock2D, mid-block attention, quant convs) and
FLUX's (no quant convs, a shift factor). Anything else fails naming the config
key or weight that does not fit.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from tfjax.vae.autoencoder import AutoencoderConfig, AutoencoderKL

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Attention weight names of checkpoints written before diffusers renamed them.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class UnsupportedCheckpoint(ValueError):
  """The checkpoint's layout has no counterpart in the Flax autoencoder."""


def is_diffusers_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def config_from_diffusers(cfg: dict[str, Any], source: str = CONFIG_FILE) -> AutoencoderConfig:
  """Translate a diffusers AutoencoderKL `config.json` dict, refusing what we lack."""
  def bad(key: str, why: str) -> UnsupportedCheckpoint:
    return UnsupportedCheckpoint(f"{source}: key {key!r} {why}")

  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise bad("_class_name", f"is {cls!r}; only 'AutoencoderKL' can be imported")
  channels = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
  down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
  up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
  if any(t != "DownEncoderBlock2D" for t in down):
    raise bad("down_block_types", f"= {down}; only DownEncoderBlock2D is supported")
  if any(t != "UpDecoderBlock2D" for t in up):
    raise bad("up_block_types", f"= {up}; only UpDecoderBlock2D is supported")
  if len(down) != len(channels) or len(up) != len(channels):
    raise bad("block_out_channels", f"has {len(channels)} entries but there are "
              f"{len(down)} down and {len(up)} up blocks")
  if cfg.get("act_fn", "silu") != "silu":
    raise bad("act_fn", f"= {cfg.get('act_fn')!r}; only 'silu' is supported")
  if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
    raise bad("latents_mean", "(per-channel latent statistics) is not supported; "
              "only a scalar scaling_factor/shift_factor")
  try:
    return AutoencoderConfig(
        channels=channels,
        blocks_per_level=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
    ).check()
  except ValueError as e:
    raise bad("norm_num_groups", str(e)) from e


def scale_shift_from_diffusers(cfg: dict[str, Any]) -> tuple[float, float]:
  """diffusers feeds `(z - shift_factor) * scaling_factor` to its denoiser, as we do."""
  shift = cfg.get("shift_factor")
  return float(cfg.get("scaling_factor", 0.18215)), float(shift) if shift is not None else 0.0


def _flax_path(key: str) -> tuple[str, ...]:
  """`encoder.down_blocks.0.resnets.1.conv1.weight` -> (encoder, down_blocks_0,
  resnets_1, conv1, weight)."""
  parts = key.split(".")
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
    parts = parts[:-2] + _LEGACY_ATTENTION[parts[-2]].split(".") + parts[-1:]
  out: list[str] = []
  for p in parts:
    if re.fullmatch(r"\d+", p) and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    flat = {}
    for k, v in tree.items():
      flat.update(_flatten(v, prefix + (k,)))
    return flat
  return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def convert_state_dict(state: dict[str, np.ndarray], template: Any,
                       source: str = WEIGHTS_FILE) -> dict[str, Any]:
  """PyTorch-layout weights -> a Flax params tree shaped like `template`.

  Args:
    state: diffusers weight name -> array.
    template: Flax params of the target architecture (only shapes are read).
    source: file name for error messages.
  """
  want = {path: tuple(np.shape(v)) for path, v in _flatten(template).items()}
  got: dict[tuple[str, ...], np.ndarray] = {}
  for key, w in state.items():
    module = _flax_path(key)
    leaf = module[-1]
    module = module[:-1]
    w = np.asarray(w, np.float32)
    if leaf == "bias":
      path = module + ("bias",)
    elif leaf == "weight" and module + ("scale",) in want:   # GroupNorm
      path = module + ("scale",)
    elif leaf == "weight" and module + ("kernel",) in want:
      path = module + ("kernel",)
      if w.ndim == 4 and len(want[path]) == 2:   # 1x1-conv attention of old checkpoints
        w = w[:, :, 0, 0]
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    else:
      raise UnsupportedCheckpoint(
          f"{source}: weight {key!r} has no counterpart in the Flax AutoencoderKL "
          f"(unsupported layout)")
    if path not in want:
      raise UnsupportedCheckpoint(f"{source}: weight {key!r} has no counterpart in the "
                                  f"Flax AutoencoderKL (unsupported layout)")
    if tuple(w.shape) != want[path]:
      raise UnsupportedCheckpoint(f"{source}: weight {key!r} has shape {state[key].shape}, "
                                  f"the architecture from config.json needs {want[path]} "
                                  f"(after transposing)")
    got[path] = w
  missing = sorted(".".join(p) for p in set(want) - set(got))
  if missing:
    raise UnsupportedCheckpoint(f"{source}: missing weights for {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''}")
  return _unflatten(got)


def load_diffusers(path: str) -> tuple[AutoencoderConfig, dict[str, Any], float, float]:
  """Read a diffusers AutoencoderKL directory.

  Returns:
    (architecture, Flax params, scale, shift).
  """
  cfg_path = os.path.join(path, CONFIG_FILE)
  with open(cfg_path) as f:
    raw = json.load(f)
  config = config_from_diffusers(raw, cfg_path)
  size = 8 * config.downsample
  x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), np.float32)
  template = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]
  weights = os.path.join(path, WEIGHTS_FILE)
  params = convert_state_dict(safetensors.numpy.load_file(weights), template, weights)
  scale, shift = scale_shift_from_diffusers(raw)
  return config, params, scale, shift
