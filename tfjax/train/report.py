"""DIR/report.md: what a run did, with its loss curves, samples and scores."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from tfjax.train.metrics import read_jsonl


def loss_curve_png(records: list[dict[str, Any]], path: str) -> None:
  """Train total/LM/diffusion loss and validation losses against step."""
  # Local: importing matplotlib.pyplot takes ~2.5 s, paid only when a plot is drawn.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, key in zip(axes, ("loss", "loss_lm", "loss_diffusion")):
    for prefix, style in (("", "-"), ("val_", "o--")):
      pts = [(r["step"], r[prefix + key]) for r in records
             if isinstance(r.get(prefix + key), float)]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=("validation" if prefix else "train"), markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def sample_grid_png(workdir: str, samples: dict[str, Any], path: str, cols: int = 8,
                    max_images: int = 32) -> None:
  """Generated images under their (wrapped) prompt captions; a red title marks
  an image the shapes checker judged wrong."""
  # Local: importing matplotlib.pyplot takes ~2.5 s, paid only when a plot is drawn.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  items = samples["t2i"][:max_images]
  rows = -(-len(items) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.3), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, item in zip(axes.flat, items):
    ax.imshow(np.asarray(Image.open(os.path.join(workdir, item["file"]))))
    words, lines, line = item["caption"].split(), [], ""
    for w in words:
      if len(line) + len(w) > 22:
        lines.append(line)
        line = ""
      line = (line + " " + w).strip()
    lines.append(line)
    ok = item.get("verdict", {}).get("correct")
    ax.set_title("\n".join(lines), fontsize=7, color="black" if ok in (None, True) else "red")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _fmt(v: Any) -> str:
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  lines = [f"# tfjax run report: {config.name}", ""]
  seconds_path = os.path.join(workdir, "stage_seconds.json")
  if os.path.exists(seconds_path):
    with open(seconds_path) as f:
      seconds = json.load(f)
    cpu_path = os.path.join(workdir, "stage_cpu_seconds.json")
    cpu = {}
    if os.path.exists(cpu_path):  # written by the main job beside stage_seconds.json
      with open(cpu_path) as f:
        cpu = json.load(f)
    lines += ["## Stages", "", "| stage | seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {cpu.get(k, '')} |" for k, v in seconds.items()]
    lines += [f"| total | {round(sum(seconds.values()), 1)} | "
              f"{round(sum(cpu.values()), 1) if cpu else ''} |", ""]
  if records:
    loss_curve_png(records, os.path.join(workdir, "loss_curves.png"))
    train_recs = [r for r in records if "loss" in r]
    val_recs = [r for r in records if "val_loss" in r]
    last = train_recs[-1] if train_recs else {}
    lines += ["## Training", "", "![loss curves](loss_curves.png)", ""]
    keys = ("step", "loss", "loss_lm", "loss_diffusion", "grad_norm", "lr", "tokens_per_s",
            "step_time", "mfu")
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(last.get(k, "")) for k in keys) + " |", ""]
    if val_recs:
      v = val_recs[-1]
      lines += [f"Validation at step {v['step']}: loss {_fmt(v['val_loss'])}, "
                f"LM loss {_fmt(v.get('val_loss_lm'))} "
                f"(perplexity {np.exp(v.get('val_loss_lm', np.nan)):.2f}), "
                f"diffusion loss {_fmt(v.get('val_loss_diffusion'))}.", ""]
  samples_path = os.path.join(workdir, "samples", "samples.json")
  if os.path.exists(samples_path):
    with open(samples_path) as f:
      samples = json.load(f)
    sample_grid_png(workdir, samples, os.path.join(workdir, "samples_grid.png"))
    lines += ["## Text to image (held-out captions)", "",
              "Titles in red: the shapes checker found the image wrong.", "",
              "![samples](samples_grid.png)", ""]
    scores = samples.get("t2i_scores")
    if scores:
      lines += [f"Shapes checker on {scores['num_images']} images: "
                f"**{scores['accuracy']:.0%} correct**.", "",
                "| category | accuracy |", "|---|---|"]
      lines += [f"| {k} | {'' if v is None else f'{v:.0%}'} |"
                for k, v in scores["per_category"].items()]
      lines.append("")
    lines += ["## Image to text (held-out images)", ""]
    if "i2t_mentions_accuracy" in samples:
      lines.append(f"Captions naming every object's colour and shape: "
                   f"**{samples['i2t_mentions_accuracy']:.0%}**; "
                   f"CIDEr-D against the one reference: {samples['i2t_cider_d']:.3f}.")
    lines += ["", "| reference | generated |", "|---|---|"]
    lines += [f"| {r['reference']} | {r['generated']} |" for r in samples["i2t"][:12]]
    lines.append("")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
