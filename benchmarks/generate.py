"""Generation throughput: images/s with and without the prefix cache, text tokens/s.

  python benchmarks/generate.py                 # GPU: 0.16B model, 256-patch images
  python benchmarks/generate.py --quick         # tiny model on CPU, a smoke run

Images: text-to-image after a caption of --prefix_len tokens, --steps DDPM
steps with classifier-free guidance (conditional and unconditional rows in one
batch), --batch images at once; "cached" computes the caption's keys/values
once and runs each step on the patches alone, "uncached" reruns the whole
sequence every step. Text: --text_tokens tokens sampled per row with the KV
cache after a --prefix_len prompt. The model is randomly initialised (speed
does not depend on the weights). Prints a table, then one JSON line with
images_per_s_cached, images_per_s_uncached, cache_speedup, text_tokens_per_s.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/transfusion_160m.py", "Model config file.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model, few steps: a CPU smoke run.")
_STEPS = flags.DEFINE_integer("steps", 250, "Denoising steps per image.")
_CFG = flags.DEFINE_float("cfg_scale", 5.0, "Guidance scale (> 0: cond + uncond batched).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images (and text rows) generated together.")
_PREFIX = flags.DEFINE_multi_integer("prefix_len", [32, 512],
                                     "Caption/prompt lengths in tokens; the first is the headline.")
_TEXT = flags.DEFINE_integer("text_tokens", 256, "Tokens sampled per row for text tokens/s.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after the compiling one (best kept).")


def _load_config(path: str, quick: bool):
  from tfjax.config.files import load_config_file
  c = load_config_file("configs/tiny.py" if quick else path)
  if quick:
    c.model.dim, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 64, 2, 4, 4
  return c


def _best(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv) -> None:
  del argv
  import jax
  import numpy as np

  from tfjax.config import BOI_ID, BOS_ID, patches_per_image
  from tfjax.generate import context as context_lib
  from tfjax.generate import lm
  from tfjax.generate.diffusion import DiffusionParams
  from tfjax.generate.mixed import Generator
  from tfjax.generate.sampling import SamplingParams
  from tfjax.model import count_params, init_params

  quick = _QUICK.value
  c = _load_config(_CONFIG.value, quick)
  steps = 10 if quick else _STEPS.value
  batch = 2 if quick else _BATCH.value
  prefix_lens = [16, 64] if quick else list(_PREFIX.value)
  text_tokens = 32 if quick else _TEXT.value
  repeats = _REPEATS.value
  m = c.model
  n = patches_per_image(m)
  params = init_params(m, jax.random.key(0))
  gen = Generator(c, params)
  dp = DiffusionParams(num_steps=steps, sampler="ddpm", cfg_scale=_CFG.value,
                       objective=str(c.diffusion.objective))
  rng = np.random.default_rng(0)
  latent = (m.latent_size, m.latent_size, m.latent_channels)

  def prompt(length: int, end: list[int]):
    body = rng.integers(5, m.vocab_size, size=length - 1 - len(end)).tolist()
    rows = [[("tokens", [BOS_ID] + body + end)] for _ in range(batch)]
    return context_lib.from_rows(rows, latent, m.patch_size, pad_multiple=16)

  rows = []
  for length in prefix_lens:
    ctx = prompt(length, [BOI_ID])
    cache = lm.empty_cache(m, batch, ctx.length + n + 16)
    _, cache = lm.prefill(gen.forward, params, ctx, cache)
    active = np.ones(batch, bool)
    key = jax.random.key(1)
    t_cached = _best(lambda: gen.denoise(ctx, cache, active, key, dp, True), repeats)
    t_full = _best(lambda: gen.denoise(ctx, cache, active, key, dp, False), repeats)
    rows.append({"prefix_len": length, "images_per_s_cached": batch / t_cached,
                 "images_per_s_uncached": batch / t_full, "cache_speedup": t_full / t_cached})

  ctx = prompt(prefix_lens[0], [])
  cache = lm.empty_cache(m, batch, ctx.length + text_tokens + 16)
  logits, cache = lm.prefill(gen.forward, params, ctx, cache)
  decode = lm.make_decode(gen.model, m, SamplingParams(temperature=1.0), text_tokens)
  pos, act = jax.numpy.asarray(ctx.next_position()), jax.numpy.ones((batch,), bool)

  def run_text():
    out = decode(params, cache, logits, pos, act, jax.random.key(2))
    jax.block_until_ready(out["tokens"])
    assert int(out["steps"]) == text_tokens
  t_text = _best(run_text, repeats)

  head = rows[0]
  result = {
      "images_per_s_cached": head["images_per_s_cached"],
      "images_per_s_uncached": head["images_per_s_uncached"],
      "cache_speedup": head["cache_speedup"],
      "text_tokens_per_s": batch * text_tokens / t_text,
      "by_prefix_len": rows, "config": c.name, "params": count_params(params)["total"],
      "patches_per_image": n, "steps": steps, "cfg_scale": _CFG.value, "batch": batch,
      "text_tokens": text_tokens, "device": str(jax.devices()[0].device_kind),
      "compute_dtype": str(m.dtype), "quick": quick,
  }
  print(f"model {c.name}: {result['params'] / 1e6:.1f}M params, {n} patches/image, "
        f"{steps} steps, CFG {_CFG.value}, batch {batch}, on {result['device']}")
  print(f"{'prefix':>8} {'img/s cached':>14} {'img/s uncached':>16} {'speedup':>9}")
  for r in rows:
    print(f"{r['prefix_len']:>8} {r['images_per_s_cached']:>14.3f} "
          f"{r['images_per_s_uncached']:>16.3f} {r['cache_speedup']:>9.2f}")
  print(f"text: {result['text_tokens_per_s']:.1f} tokens/s ({batch} rows x {text_tokens} "
        "tokens, KV cache)")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
