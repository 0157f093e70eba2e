"""Does an editing model read its input image? Its clean estimate with the true input vs another's.

  python benchmarks/edit_input_probe.py --model=EXPORT_OR_WORKDIR [--vae=DIR] [--num=200] [--quick]

The GPU edit chain's fine-tuned model (benchmarks/science_gpu/assets), for example:
  mkdir -p /tmp/m && tar xzf benchmarks/science_gpu/assets/edit_model-pre12000-ft1500-s0.tgz -C /tmp/m
  tar xzf benchmarks/science_gpu/assets/autoencoders.tgz -C /tmp/m kl-40b8cafabf/vae
  python benchmarks/edit_input_probe.py --model=/tmp/m/ft_export --vae=/tmp/m/kl-40b8cafabf/vae

For the editing suite's test edits (the same scenes `tfjax-eval --suite=editing`
scores, with --override as there), the expected output is noised to fixed
timesteps t; the tables give the squared error of the model's clean estimate
x0 (from its predicted noise), per latent cell of each region (`regions`:
kept objects, edited cells, background), in three contexts:
  true input     [input image, instruction, BOI]: what the model is asked
  other input    the same, with the input image of another edit in the batch
  no context     BOI alone (the unconditional branch of guidance)
beside copy input: the error of taking the input's latents as the output.
A model that keeps what an edit leaves alone is closer with the true input
than with another's, and at high t (where the noisy output no longer shows
the scene) near or below copy input. The last line is a JSON object of the
errors per t.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tfjax import diffusion
from tfjax.config import BOI_ID, apply_overrides
from tfjax.eval import editing
from tfjax.export import load_pretrained
from tfjax.files import write_atomic
from tfjax.generate import context as context_lib
from tfjax.generate import diffusion as diff
from tfjax.generate.mixed import fit_prompt
import tfjax.vae

TIMESTEPS = (100, 300, 500, 700, 900)
CONTEXTS = ("true_input", "other_input", "no_context", "copy_input")
REGIONS = ("kept", "edited", "background")


def _context(gen, examples, inputs) -> context_lib.Context:
  """[input, instruction, BOI] per row, as `Generator.generate(mode="image")` builds it."""
  limit = int(gen.config.data.seq_len) - gen.num_patches - 2
  rows = [fit_prompt(gen._row([inp, ex["instruction"]]), limit, gen.num_patches, i)  # pylint: disable=protected-access
          + [("tokens", [BOI_ID])] for i, (ex, inp) in enumerate(zip(examples, inputs))]
  return context_lib.from_rows(rows, gen.latent_shape, gen.model_config.patch_size)


def regions(inputs: np.ndarray, outputs: np.ndarray, cell: int) -> dict[str, np.ndarray]:
  """bool [b, h, w] latent cells (cell x cell pixels each) by what the edit does there.

  kept: the same pixels in input and output, not all background (an object
  the edit leaves alone); edited: pixels differ; background: the same, and
  all the background colour (the input's most frequent pixel).
  """
  b, hh, ww, _ = inputs.shape
  blocks = lambda a: a.reshape(b, hh // cell, cell, ww // cell, cell, 3)
  same = np.all(blocks(inputs) == blocks(outputs), axis=(2, 4, 5))
  colours = [np.unique(im.reshape(-1, 3), axis=0, return_counts=True) for im in inputs]
  bg = np.stack([c[np.argmax(n)] for c, n in colours])[:, None, None, None, None, :]
  plain = np.all(blocks(inputs) == bg, axis=(2, 4, 5))
  return {"kept": same & ~plain, "edited": ~same, "background": same & plain}


def probe(gen, examples, batch_size: int, seed: int
          ) -> tuple[dict[str, dict[str, dict[int, float]]], dict[str, int]]:
  """({region: {context: {t: squared error}}}, {region: cells}) over the examples.

  The squared error of the clean estimate is averaged over the latent cells of
  each region (and their channels).
  """
  predict = jax.jit(diff.make_denoiser(gen.model, gen.num_patches, use_cache=False))
  alphas = diffusion.cosine_alphas_cumprod(int(gen.config.diffusion.num_timesteps))
  sums = {r: {c: {t: 0.0 for t in TIMESTEPS} for c in CONTEXTS} for r in REGIONS}
  cells = {r: 0 for r in REGIONS}
  rng = np.random.default_rng(seed)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    b = len(chunk)
    inputs = np.stack([ex["input"] for ex in chunk])
    outputs = np.stack([ex["output"] for ex in chunk])
    x0 = jnp.asarray(gen.encode_images(outputs))
    masks = regions(inputs, outputs, outputs.shape[1] // x0.shape[1])
    for r, m in masks.items():
      cells[r] += int(m.sum())

    def add(context: str, t: int, estimate: jax.Array) -> None:
      per_cell = np.asarray(jnp.mean(jnp.square(estimate - x0), axis=-1))
      for r, m in masks.items():
        sums[r][context][t] += float(per_cell[m].sum())

    # Model inputs, RoPE start and image id of the new image per context; the
    # unconditional row's image follows its BOI at position 0, image 1.
    true = _context(gen, chunk, inputs)
    calls = {}
    for name, ctx in (("true_input", true),
                      ("other_input", _context(gen, chunk, np.roll(inputs, -1, axis=0))),
                      ("no_context", diff.uncond_context(true))):
      uncond = name == "no_context"
      calls[name] = ({k: jnp.asarray(v) for k, v in ctx.model_inputs().items()},
                     jnp.full((b,), 1 if uncond else ctx.next_position(), jnp.int32),
                     jnp.full((b,), 1 if uncond else ctx.num_images() + 1, jnp.int32))
    x_in = jnp.asarray(gen.encode_images(inputs))
    active = jnp.ones((b,), bool)
    for t in TIMESTEPS:
      eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
      ab = alphas[t]
      x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
      tb = jnp.full((b,), float(t), jnp.float32)
      for name, (model_inputs, rope, image_id) in calls.items():
        pred = predict(gen.params, model_inputs, x_t, tb, rope, image_id, active)
        add(name, t, diffusion.predict_x0(x_t, pred, ab))
      add("copy_input", t, x_in)   # the same at every t: a row of the table to compare with
  return ({r: {c: {t: v / max(cells[r], 1) for t, v in per_t.items()}
               for c, per_t in per_c.items()} for r, per_c in sums.items()}, cells)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="an export or a training workdir")
  p.add_argument("--vae", default="", help="the VAE directory, for a model stored without "
                 "its vae/ (benchmarks/science_gpu/assets/edit_model-*.tgz)")
  p.add_argument("--num", type=int, default=200, help="test edits (the suite's, in order)")
  p.add_argument("--batch_size", type=int, default=50)
  p.add_argument("--seed", type=int, default=0, help="the suite's example seed and the noise")
  p.add_argument("--override", action="append",
                 default=["editing.max_objects=2", "editing.object_sizes=large"],
                 help="KEY=VALUE on the model's config, as tfjax-eval's (default: the "
                      "science_gpu edit set's scenes)")
  p.add_argument("--quick", action="store_true", help="20 edits")
  p.add_argument("--json", default="", help="also write the JSON object to this file")
  args = p.parse_args()
  gen = load_pretrained(args.model)
  if args.vae:
    gen.vae = tfjax.vae.load(args.vae)
  apply_overrides(gen.config, tuple(args.override), "--override")
  examples = editing.suite_examples(gen.config, 20 if args.quick else args.num, seed=args.seed)
  res, cells = probe(gen, examples, args.batch_size, args.seed)
  print(f"squared error of the clean estimate on {len(examples)} test edits' outputs, per "
        "latent cell (lower: closer to the expected output)")
  for r in REGIONS:
    print(f"\n{r}: {cells[r]} cells")
    print("| t | " + " | ".join(CONTEXTS) + " |")
    print("|---|" + "---|" * len(CONTEXTS))
    for t in TIMESTEPS:
      print(f"| {t} | " + " | ".join(f"{res[r][c][t]:.4f}" for c in CONTEXTS) + " |")
  summary = {"model": args.model, "num_edits": len(examples), "cells": cells,
             **{r: {c: {str(t): round(v, 5) for t, v in res[r][c].items()} for c in CONTEXTS}
                for r in REGIONS}}
  if args.json:
    def write(tmp: str) -> None:
      with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_atomic(args.json, write)
  print(json.dumps(summary))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
