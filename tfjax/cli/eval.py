"""tfjax-eval: score a trained model (workdir or export) on the evaluation suite.

  tfjax-eval --model=DIR --suite=shapes|captioning|perplexity|editing|all \
      [--num_samples=64] --json=results.json [--inception=FILE] [--clip=DIR] \
      [--override=KEY=VALUE ...]

Writes the results as JSON (headline keys shapes_accuracy, caption_cider,
caption_scene_accuracy, perplexity) and a Markdown table next to it
(results.md), and prints the table.
"""
from __future__ import annotations

import logging

from absl import flags

from tfjax.cli.common import quiet_orbax, run

_MODEL = flags.DEFINE_string("model", None, "Training workdir or export directory.")
_SUITE = flags.DEFINE_enum("suite", "all", ["shapes", "captioning", "perplexity", "editing",
                                            "all"],
                           "Which evaluation to run.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Held-out examples per evaluation.")
_JSON = flags.DEFINE_string("json", None, "Where to write the results JSON.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the held-out draw and sampling.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts generated together.")
_INCEPTION = flags.DEFINE_string("inception", None, "Inception feature extractor "
                                 "(.jax_export file) for FID; without it FID is skipped.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "KEY=VALUE set on the model's config before evaluating, repeatable: "
    "held-out data or sampling settings, e.g. --override=editing.max_objects=2 to score "
    "a pretrained model on a fine-tuning config's edits. model.* keys are refused.")
_CLIP = flags.DEFINE_string("clip", None, "Directory with CLIP encoders (see "
                            "tfjax/eval/clip_score.py); without it CLIP score is skipped.")


def _main(argv) -> None:
  del argv
  if not _MODEL.value or not _JSON.value:
    raise SystemExit("--model and --json are required")
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.eval.suite import evaluate_to_files, markdown_table
  quiet_orbax(logging.ERROR)
  if _NUM.value < 1 or _BATCH.value < 1:
    raise SystemExit(f"--num_samples and --batch_size must be at least 1 (got {_NUM.value}, "
                     f"{_BATCH.value})")
  results = evaluate_to_files(_MODEL.value, _SUITE.value, _NUM.value, _JSON.value, _SEED.value,
                     _BATCH.value, _INCEPTION.value, _CLIP.value, _OVERRIDE.value)
  print(markdown_table(results))
  print(f"wrote {_JSON.value}")


def main() -> None:
  run(_main, __name__)


if __name__ == "__main__":
  main()
