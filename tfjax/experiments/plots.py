"""Scaling fits, parity-FLOP ratios, log-log plots and the results table.

Each family's metric is fitted as a power law of training compute,
`metric = a * C ** b` (least squares in log-log space, over the runs whose
metric is positive). The parity-FLOP ratio of family B against family A at
A's compute C is `C_B / C`, where `C_B` is the compute B's fit needs to reach
the value A's fit gives at C: below 1, B matches A with less compute (the
paper's Table 3 reports Transfusion's fraction of Chameleon's FLOPs).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from tfjax.experiments import results as results_lib

DEFAULT_METRICS = {"shapes_accuracy": "higher", "caption_cider": "higher",
                   "caption_scene_accuracy": "higher", "perplexity": "lower"}


# Fewest times the largest compute of a fit exceeds its smallest (see fit_power_law).
MIN_COMPUTE_SPAN = 1.25


def fit_power_law(flops: Sequence[float], values: Sequence[float]) -> dict[str, float] | None:
  """{"a", "b", "points"} of values = a * flops ** b, or None with < 2 usable points.

  Points with a non-positive or missing value cannot be fitted in log space and
  are left out. The points must span at least MIN_COMPUTE_SPAN in compute: the
  seeds of one budget count slightly different FLOPs (their documents differ),
  and a line through two such points has a meaningless, overflowing slope.
  """
  pts = [(float(c), float(v)) for c, v in zip(flops, values)
         if v is not None and c > 0 and np.isfinite(v) and v > 0]
  if len(pts) < 2 or max(c for c, _ in pts) < MIN_COMPUTE_SPAN * min(c for c, _ in pts):
    return None
  x = np.log([c for c, _ in pts])
  y = np.log([v for _, v in pts])
  b, log_a = np.polyfit(x, y, 1)
  return {"a": float(math.exp(log_a)), "b": float(b), "points": len(pts)}


def predict(fit: dict[str, float], flops: float) -> float:
  return fit["a"] * flops ** fit["b"]


def compute_for(fit: dict[str, float], value: float) -> float | None:
  """Compute at which a fit reaches `value`; None for a flat fit."""
  if abs(fit["b"]) < 1e-9 or value <= 0:
    return None
  return (value / fit["a"]) ** (1.0 / fit["b"])


def parity_ratio(fit_a: dict[str, float], fit_b: dict[str, float], flops_a: float,
                 direction: str = "higher") -> float | None:
  """FLOPs family B needs to match family A's fitted metric at `flops_a`, over `flops_a`.

  None when B's fit never reaches it by growing compute (B's trend is flat or
  goes the wrong way for a metric of this `direction`).
  """
  good_slope = fit_b["b"] > 0 if direction == "higher" else fit_b["b"] < 0
  if not good_slope:
    return None
  c_b = compute_for(fit_b, predict(fit_a, flops_a))
  return None if c_b is None else c_b / flops_a


def parity_pairs(parity: Any) -> list[tuple[str, str]]:
  """sweep.parity as a list of (A, B): one pair ("a", "b") or several."""
  if not parity:
    return []
  if all(isinstance(p, str) for p in parity):
    parity = (parity,)
  pairs = [tuple(p) for p in parity]
  for p in pairs:
    if len(p) != 2:
      raise ValueError(f"sweep key parity: {p!r} is not a (family_a, family_b) pair")
  return pairs


def _fits(rows: list[dict[str, Any]], metrics: dict[str, str]) -> dict[str, dict[str, Any]]:
  """{metric: {family: fit or None}} over `rows`."""
  families = sorted({r["family"] for r in rows})
  return {m: {fam: fit_power_law([r["flops"] for r in rows if r["family"] == fam],
                                 [r.get(m) for r in rows if r["family"] == fam])
              for fam in families} for m in metrics}


def _ratios(rows: list[dict[str, Any]], fits: dict[str, Any], metrics: dict[str, str],
            a: str, b: str) -> tuple[float | None, dict[str, float | None]]:
  a_flops = [r["flops"] for r in rows if r["family"] == a]
  at = max(a_flops) if a_flops else None
  ratio = {}
  for metric, direction in metrics.items():
    fa, fb = fits[metric].get(a), fits[metric].get(b)
    ratio[metric] = parity_ratio(fa, fb, at, direction) if fa and fb and at else None
  return at, ratio


def fits_and_parity(rows: list[dict[str, Any]], metrics: dict[str, str],
                    parity: Any) -> tuple[dict, list[dict[str, Any]]]:
  """Power-law fits per metric and family (over every seed); parity ratios
  per (A, B) pair from those fits, and per seed from each seed's own fits
  (`ratio_seeds`: {metric: {seed: ratio}}; the spread across seeds)."""
  fits = _fits(rows, metrics)
  seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
  per_seed = {s: [r for r in rows if r.get("seed") == s] for s in seeds}
  seed_fits = {s: _fits(rs, metrics) for s, rs in per_seed.items()}
  out = []
  for a, b in parity_pairs(parity):
    at, ratio = _ratios(rows, fits, metrics, a, b)
    entry = {"family_a": a, "family_b": b, "at_flops": at, "ratio": ratio,
             "ratio_seeds": {m: {} for m in metrics}}
    for s in seeds:
      _, r_s = _ratios(per_seed[s], seed_fits[s], metrics, a, b)
      for m in metrics:
        entry["ratio_seeds"][m][str(s)] = r_s[m]
    out.append(entry)
  return fits, out


def plot_metric(rows: list[dict[str, Any]], fits: dict[str, Any], metric: str,
                path: str, title: str = "") -> bool:
  """Log-log plot of `metric` against training FLOPs, one colour per family."""
  # Local: importing matplotlib.pyplot takes ~2.5 s, paid only when a plot is drawn.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pts = [r for r in rows if r.get(metric) is not None and r[metric] > 0]
  if not pts:
    return False
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for i, fam in enumerate(sorted({r["family"] for r in rows})):
    color = f"C{i}"
    mine = sorted((r for r in pts if r["family"] == fam), key=lambda r: r["flops"])
    if mine:
      ax.scatter([r["flops"] for r in mine], [r[metric] for r in mine], color=color, label=fam)
    fit = fits.get(fam)
    if fit and mine:
      xs = np.geomspace(mine[0]["flops"], mine[-1]["flops"], 50)
      ax.plot(xs, [predict(fit, x) for x in xs], color=color, linestyle="--",
              label=f"{fam} fit: C^{fit['b']:.3g}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training FLOPs (tfjax/train/flops.py)")
  ax.set_ylabel(metric)
  ax.set_title(title or metric)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def fmt(v: Any) -> str:
  """A table cell: floats to 3 significant digits, None as '-'."""
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
  return str(v)


def _spread(values: dict[str, float | None]) -> str:
  got = [v for v in values.values() if v is not None]
  if not values:
    return ""
  if not got:
    return " (seeds: -)"
  return f" (seeds {fmt(min(got))}-{fmt(max(got))}, {len(got)}/{len(values)})"


def markdown_table(rows: list[dict[str, Any]], metrics: Sequence[str]) -> str:
  cols = ["name", "family", "size", "params", "steps", "tokens", "flops", *metrics,
          *[c for c in ("final_train_loss_lm", "val_loss_lm", "val_loss_diffusion")
            if c not in metrics], "train_seconds"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in sorted(rows, key=lambda r: (r["family"], r["flops"], r.get("seed") or 0)):
    lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
  return "\n".join(lines)


def seed_table(rows: list[dict[str, Any]], metrics: Sequence[str]) -> str:
  """Mean over seeds per (family, size, budget), the min-max beside each metric."""
  lines = ["| family | size | seeds | flops | " + " | ".join(metrics) + " |",
           "|---|---|---|---|" + "---|" * len(metrics)]
  for g in results_lib.seed_groups(rows, metrics):
    cells = [fmt(g[m]) + (f" ({fmt(g[m + '_range'][0])}-{fmt(g[m + '_range'][1])})"
                           if g[m + "_range"] else "") for m in metrics]
    lines.append(f"| {g['family']} | {g['size']} | {len(g['seeds']) or 1} | {fmt(g['flops'])} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def category_table(rows: list[dict[str, Any]]) -> str | None:
  """The shapes checker's verdicts per category (tfjax/eval/shapes_checker.py),
  mean over seeds per (family, size, budget); None when no run stored them."""
  rs = [r for r in rows if r.get("shapes_per_category")]
  if not rs:
    return None
  cats = list(rs[0]["shapes_per_category"])
  flat = [{**r, **{f"category {c}": r["shapes_per_category"].get(c) for c in cats}} for r in rs]
  lines = ["| family | size | flops | runs | " + " | ".join(cats) + " |",
           "|---|---|---|---|" + "---|" * len(cats)]
  for g in results_lib.seed_groups(flat, [f"category {c}" for c in cats]):
    lines.append(f"| {g['family']} | {g['size']} | {fmt(g['flops'])} | {len(g['seeds']) or 1} | "
                 + " | ".join(fmt(g[f"category {c}"]) for c in cats) + " |")
  return "\n".join(lines)


def timing_table(rows: list[dict[str, Any]]) -> str:
  """Measured seconds per family, to size new runs (a sweep's `timing`).

  train seconds = fixed + steps x s/step, fitted over runs of different
  lengths (the fixed part is mostly compilation); a run's overhead is that
  fixed part plus the median wall seconds beyond training (evaluation, start).
  """
  lines = ["| family | size | runs | s/step | fixed train s | run s beyond training "
           "| run_overhead_s |", "|---|---|---|---|---|---|---|"]
  for fam, size in sorted({(r["family"], r["size"]) for r in rows}):
    rs = [r for r in rows if r["family"] == fam and r["size"] == size and r.get("train_seconds")]
    if not rs:
      continue
    steps = np.array([r["steps"] for r in rs], float)
    secs = np.array([r["train_seconds"] for r in rs], float)
    if len(set(steps)) > 1:
      per_step, fixed = np.polyfit(steps, secs, 1)
    else:
      per_step, fixed = float(np.mean(secs / steps)), None
    over = [r["wall_seconds"] - r["train_seconds"] for r in rs if r.get("wall_seconds")]
    beyond = float(np.median(over)) if over else None
    total = None if fixed is None or beyond is None else fixed + beyond
    lines.append(f"| {fam} | {size} | {len(rs)} | {per_step:.4f} | "
                 + " | ".join(fmt(v) for v in (fixed, beyond, total))
                 + " |")
  return "\n".join(lines)


def environments(rows: list[dict[str, Any]]) -> list[str]:
  """The distinct (device, JAX version) the runs ran on, with their dates, and
  the distinct autoencoders they used."""
  envs: dict[tuple, list[str]] = {}
  for r in rows:
    envs.setdefault((r.get("device") or "unknown device", r.get("jax_version") or "?"),
                    []).append(r.get("date") or "?")
  out = [f"{dev}, JAX {jax_v}: {len(d)} runs, {min(d)} to {max(d)}"
         for (dev, jax_v), d in sorted(envs.items())]
  aes = {json.dumps(r["autoencoder"], sort_keys=True) for r in rows if r.get("autoencoder")}
  for ae in sorted(aes):
    a = json.loads(ae)
    out.append(f"autoencoder {a.get('kind')}: " + ", ".join(
        f"{k} {fmt(v)}" for k, v in a.items() if k != "kind"))
  return out


def write_report(rows: list[dict[str, Any]], sweep: Any, workdir: str) -> dict[str, Any]:
  """results.json, results.md and plots/METRIC.png in `workdir`; returns the JSON."""
  metrics = dict(sweep.get("metrics") or DEFAULT_METRICS)
  fits, par = fits_and_parity(rows, metrics, sweep.get("parity"))
  plot_dir = os.path.join(workdir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  plotted = {m: plot_metric(rows, fits[m], m, os.path.join(plot_dir, f"{m}.png"),
                            f"{sweep.get('name', 'sweep')}: {m}") for m in metrics}
  keep = ("name", "family", "size", "seed", "budget", "steps", "tokens", "params", "flops",
          "flops_planned", "flops_6nd", "train_seconds", "wall_seconds", "final_train_loss",
          "final_train_loss_lm", "val_loss_lm", "val_loss_diffusion", "device", "jax_version",
          "date", "shapes_per_category", *metrics)
  report = {"name": sweep.get("name", "sweep"), "runs": [{k: r.get(k) for k in keep}
                                                         for r in rows],
            "fits": fits, "parity": par,
            "plots": {m: f"plots/{m}.png" for m, ok in plotted.items() if ok}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(report, f, indent=2, default=float)
  lines = [f"# {report['name']}", "", *[f"- {e}" for e in environments(rows)], "",
           "FLOPs: tfjax/train/flops.py's count of the batches each run trained on (planned "
           "from the config where the log has none).", "",
           markdown_table(rows, list(metrics)), ""]
  if any(r.get("seed") is not None for r in rows):
    lines += ["## Mean over seeds (min-max)", "", seed_table(rows, list(metrics)), ""]
  lines += ["## Power-law fits (metric = a * FLOPs^b)", "",
            "| metric | family | a | b | points |", "|---|---|---|---|---|"]
  for m in metrics:
    for fam, fit in fits[m].items():
      lines.append(f"| {m} | {fam} | " + (f"{fit['a']:.3g} | {fit['b']:.3g} | {fit['points']}"
                                          if fit else "- | - | -") + " |")
  if par:
    lines += ["", "## Parity-FLOP ratios", "",
              "FLOPs family B needs (by its fit) to match family A's fitted metric at A's "
              "largest compute, divided by that compute (< 1: B is more compute-efficient; "
              "- : a fit is missing or B's trend never gets there). In brackets: the same "
              "ratio from each seed's own fits, lowest to highest.", "",
              "| A | B | at FLOPs | " + " | ".join(metrics) + " |",
              "|---|---|---|" + "---|" * len(metrics)]
    for p in par:
      lines.append(f"| {p['family_a']} | {p['family_b']} | {fmt(p['at_flops'])} | "
                   + " | ".join(fmt(p["ratio"][m]) + _spread(p["ratio_seeds"][m])
                                for m in metrics) + " |")
  cats = category_table(rows)
  if cats:
    lines += ["", "## Shapes checker by category (mean over seeds)", "",
              "Fraction of held-out prompts whose sample passes each check: presence (every "
              "asked object, by shape and colour), count (no object missing or extra), colour "
              "and shape (as multisets), size, position (pairwise order; scenes of 2+ objects).",
              "", cats]
  lines += ["", "## Seconds (for sizing new runs)", "", timing_table(rows)]
  lines += ["", *[f"![{m}](plots/{m}.png)" for m, ok in plotted.items() if ok], ""]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines))
  return report
