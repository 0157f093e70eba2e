"""Re-score the stored text-to-image sample grids of a GPU sweep, per checker category.

  python benchmarks/science_gpu_grids.py --sweep=compare \
      [--out=benchmarks/science_gpu/reports/compare/grid_categories.md]

Each run's grid (`samples/SWEEP/RUN_shapes_samples.png`) holds its first 16
held-out samples, 4 x 4 tiles of the data's image size, drawn for the first 16
prompts of the sweep's evaluation (one stream per seed, so they are the same
for any number of samples). Records stored before the sweep kept the checker's
per-category verdicts (`shapes_per_category`) have only the headline accuracy;
this scores those 16 tiles with the same checker (tfjax/eval/shapes_checker.py)
to say which part of a scene the samples get wrong. 16 prompts per run: a
coarse breakdown, next to the stored accuracy over all the sweep's prompts.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GRID_TILES = 16


def grid_tiles(path: str, size: int) -> list[np.ndarray]:
  """The tiles of a suite sample grid (tfjax/eval/suite.py), row by row."""
  grid = np.asarray(Image.open(path).convert("RGB"))
  rows, cols = grid.shape[0] // size, grid.shape[1] // size
  return [grid[r * size:(r + 1) * size, c * size:(c + 1) * size]
          for r in range(rows) for c in range(cols)]


def score_runs(sweep_name: str, store: str) -> list[dict]:
  """Per stored run with a grid: its family, size, budget, seed, FLOPs and the tiles' verdicts."""
  from tfjax.config.files import load_module  # pylint: disable=g-import-not-at-top
  from tfjax.data import shapes  # pylint: disable=g-import-not-at-top
  from tfjax.eval import shapes_checker  # pylint: disable=g-import-not-at-top
  from tfjax.experiments import results  # pylint: disable=g-import-not-at-top
  from tfjax.jobs import sweep as runner  # pylint: disable=g-import-not-at-top
  sweep = load_module(os.path.join(REPO, "configs", "science_gpu", f"{sweep_name}.py")).get_config()
  runs = runner.plan(sweep)
  records = results.read_records([os.path.join(store, "runs", sweep_name)], [r.name for r in runs])
  out = []
  for run in runs:
    grid = os.path.join(store, "samples", sweep_name, f"{run.name}_shapes_samples.png")
    if run.name not in records or not os.path.exists(grid):
      continue
    size = int(run.config.data.image_size)
    _, scenes, _ = shapes.generate_split("test", GRID_TILES, size, seed=int(sweep.eval["seed"]),
                                         options=shapes.SceneOptions.from_config(run.config.data))
    tiles = grid_tiles(grid, size)[:GRID_TILES]
    # A record's shape (plots.category_table reads it), scored on the tiles.
    out.append({"family": run.family, "size": run.size, "budget": run.budget, "seed": run.seed,
                "flops": records[run.name]["flops"],
                "shapes_per_category": shapes_checker.accuracy(tiles, scenes)["per_category"]})
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sweep", required=True, help="configs/science_gpu/SWEEP.py with stored runs")
  ap.add_argument("--store", default=os.path.join(REPO, "benchmarks", "science_gpu"),
                  help="holds runs/SWEEP/*.json and samples/SWEEP/*_shapes_samples.png")
  ap.add_argument("--out", help="also write the table here (Markdown)")
  args = ap.parse_args()
  rows = score_runs(args.sweep, args.store)
  if not rows:
    raise SystemExit(f"no stored run of {args.sweep} with a sample grid under {args.store}")
  from tfjax.experiments.plots import category_table  # pylint: disable=g-import-not-at-top
  text = (f"Shapes checker per category on each run's first {GRID_TILES} samples "
          f"(`python benchmarks/science_gpu_grids.py --sweep={args.sweep}`), mean over seeds "
          f"(the sweep's report has each run's accuracy over all its prompts):"
          f"\n\n{category_table(rows)}\n")
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
