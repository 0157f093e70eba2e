"""The sweeps: families x model sizes x token budgets -> one results table.

A sweep config (configs/sweep_*.py, `get_config()`) is data:

  families   {name: {"config": "configs/NAME.py[:ARG]", "overrides": ("key=value", ...),
                    "budgets": (...) optional, replacing the sweep's}}
             a family is a base config plus overrides: Transfusion, Chameleon
             (chameleon.enabled), or an ablation (model.image_attention=causal, ...)
  sizes      {name: ("model.dim=64", ...)}       model-size overrides
  budgets    (tokens, ...)                       training tokens per run:
                                                 steps = tokens / (batch * seq_len)
  common     ("key=value", ...)                  applied to every run first
  eval       num_samples (, seed, batch_size)    the evaluation suite (evaluate.py)
  parity     (family_a, family_b)                the parity-FLOP ratio reported
  metrics    {metric: "higher" | "lower"}        what the table and plots show

Every run is one job (runner.py) of the stages data, vae, latents (or VQ
tokens), train, eval: it trains in WORKDIR/runs/NAME and is evaluated into
WORKDIR/runs/NAME/eval/eval.json; a run whose eval.json exists is reused, a
run whose checkpoint exists resumes. Data, tokenizer, autoencoders and the
latent / VQ-token caches are built once in WORKDIR/shared, keyed by a hash of
the config sections they depend on, so runs that share data share them.
Training compute is 6 * N * D for every family (tfjax/train/flops.py's
`matmul_params` N, D = steps * batch * seq_len packed positions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import ml_collections

from tfjax.config import apply_overrides, load_config_file, validate
from tfjax.experiments import plots
from tfjax.jobs import chameleon, stages
from tfjax.jobs.runner import SECONDS_FILE, Barrier, Job, Stage, names, primary, run_stages
from tfjax.train.flops import matmul_params
from tfjax.train.metrics import read_jsonl

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Run:
  name: str
  family: str
  size: str
  budget: int               # requested training tokens
  config: ml_collections.ConfigDict
  steps: int
  tokens: int               # steps * batch * seq_len
  params: int               # N of 6ND
  flops: float              # 6 * N * tokens


def _budget_label(tokens: int) -> str:
  for unit, div in (("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
    if tokens >= div and tokens % (div // 10 or 1) == 0:
      return f"{tokens / div:g}{unit}"
  return str(tokens)


def plan(sweep: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the sweep with its resolved config, steps and FLOPs."""
  runs = []
  if not sweep.families:
    raise ValueError("sweep config key families is empty")
  sizes = dict(sweep.sizes) if sweep.get("sizes") else {"base": ()}
  for fam, spec in sweep.families.items():
    for size, size_over in sizes.items():
      for budget in tuple(spec.get("budgets", ()) or sweep.budgets):
        c = load_config_file(spec["config"], root=REPO_ROOT)  # PATH[:ARG]
        apply_overrides(c, tuple(sweep.get("common", ())), "sweep key common")
        apply_overrides(c, tuple(size_over), f"sweep key sizes.{size}")
        apply_overrides(c, tuple(spec.get("overrides", ())), f"sweep key families.{fam}.overrides")
        per_step = c.data.batch_size * c.data.seq_len
        steps = max(1, round(int(budget) / per_step))
        c.train.num_steps = steps
        c.train.warmup_steps = min(c.train.warmup_steps, max(1, steps // 10))
        if c.train.eval_every:
          c.train.eval_every = steps  # one validation loss at the end (0 keeps it off)
        c.train.checkpoint_every = 0
        name = f"{fam}-{size}-{_budget_label(int(budget))}"
        c.name = name
        validate(c)
        n = matmul_params(c.model)
        runs.append(Run(name, fam, size, int(budget), c, steps, steps * per_step, n,
                        6.0 * n * steps * per_step))
  run_names = [r.name for r in runs]
  if len(set(run_names)) != len(run_names):
    raise ValueError(f"sweep: run names collide: {run_names}")
  return runs


# ------------------------------------------------------------ shared assets --
def _digest(*parts: Any) -> str:
  text = json.dumps([p.to_dict() if hasattr(p, "to_dict") else p for p in parts],
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def _data_key(c: ml_collections.ConfigDict) -> str:
  d = c.data.to_dict()
  for k in ("dir", "latents", "batch_size", "seq_len", "max_images_per_seq", "num_workers",
            "shuffle_seed", "text_image_ratio", "caption_first_prob", "pack_max_misses",
            "read_threads"):
    d.pop(k, None)  # packing-time choices: the built files do not depend on them
  return _digest(d)


def _vae_key(c: ml_collections.ConfigDict) -> str:
  return _digest(_data_key(c), c.vae, c.model.latent_channels)


# A run's chain: its assets (built once under WORKDIR/shared, reused by every
# run that shares them), training and the evaluation suite.
TRANSFUSION_CHAIN = stages.evaluated_chain("vae", Stage("latents", stages.latents, where=primary))
CHAMELEON_CHAIN = stages.evaluated_chain("vae", Stage("tokens", stages.vq_tokens, where=primary))


def run_job(config: ml_collections.ConfigDict, shared: str, run_dir: str,
            eval_cfg: ml_collections.ConfigDict | dict[str, Any], devices: Any = None
            ) -> tuple[tuple[Stage | Barrier, ...], Job]:
  """A run's chain and job: data, autoencoder and latent/token cache under
  `shared`, keyed by what they depend on; checkpoints and eval in `run_dir`."""
  base = config.copy_and_resolve_references()
  base.data.dir = os.path.join(shared, "data-" + _data_key(base))
  vae_work = os.path.join(shared, f"{base.vae.kind}-" + _vae_key(base))
  vae_dir = base.vae.path or os.path.join(vae_work, "vae")
  if base.chameleon.enabled:
    wired = chameleon.with_assets(base, vae_dir, os.path.join(vae_work, "tokens"))
  else:
    wired = base.copy_and_resolve_references()
    wired.vae.path = vae_dir
    wired.data.latents = os.path.join(vae_work, "latents")
  chain = CHAMELEON_CHAIN if base.chameleon.enabled else TRANSFUSION_CHAIN
  return chain, Job(config=wired, base_config=base, workdir=run_dir, stages=names(chain),
                    vae_dir=vae_dir, vae_workdir=vae_work, devices=devices, eval=dict(eval_cfg))


# --------------------------------------------------------------------- runs --
def _train_summary(run_dir: str) -> dict[str, Any]:
  """Last logged training loss (metrics.jsonl survives resumption) and train time."""
  out: dict[str, Any] = {}
  path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(path):
    records = read_jsonl(path)
    logged = [r for r in records if "loss" in r]
    if logged:
      out.update(final_train_loss=logged[-1]["loss"], final_train_loss_lm=logged[-1].get("loss_lm"))
    val = [r for r in records if "val_loss" in r]
    if val:  # held-out losses at the end (same batches and noise for every run)
      out.update(val_loss_lm=val[-1].get("val_loss_lm"),
                 val_loss_diffusion=val[-1].get("val_loss_diffusion"))
  for name, key in ((SECONDS_FILE, "train"), ("train_summary.json", "train_seconds")):
    path = os.path.join(run_dir, name)  # train_summary.json: sweeps run before stage_seconds
    if os.path.exists(path):
      with open(path) as f:
        out["train_seconds"] = json.load(f).get(key)
      break
  return out


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str, *, only: Sequence[str] = (),
              devices: Any = None, report_only: bool = False) -> dict[str, Any]:
  """Trains and evaluates every run (reusing finished ones); writes the report.

  Args:
    sweep: the sweep config (see the module docstring).
    workdir: runs/, shared/, results.{json,md}, plots/ go here.
    only: run names to (re)run now; the report still covers every finished run.
    devices: devices each run trains on (default all).
    report_only: train nothing, just rebuild the report from finished runs.
  Returns:
    {"runs": [row, ...], "fits": ..., "parity": ...} as written to results.json.
  """
  workdir = os.path.abspath(workdir)
  shared = os.path.join(workdir, "shared")
  os.makedirs(shared, exist_ok=True)
  runs = plan(sweep)
  unknown = set(only) - {r.name for r in runs}
  if unknown:
    raise ValueError(f"--only names no run of this sweep: {sorted(unknown)}; runs are "
                     f"{[r.name for r in runs]}")
  rows = []
  for run in runs:
    run_dir = os.path.join(workdir, "runs", run.name)
    done_path = os.path.join(run_dir, "eval", "eval.json")
    wanted = not only or run.name in only
    if not os.path.exists(done_path) and wanted and not report_only:
      log.info("sweep: run %s (%d steps, %.3g FLOPs)", run.name, run.steps, run.flops)
      os.makedirs(run_dir, exist_ok=True)
      run_stages(*run_job(run.config, shared, run_dir, sweep.eval, devices))
    if not os.path.exists(done_path):
      continue
    with open(done_path) as f:
      scores = {k: v for k, v in json.load(f).items() if not isinstance(v, (dict, list))}
    scores.update(_train_summary(run_dir))
    rows.append({"name": run.name, "family": run.family, "size": run.size,
                 "budget": run.budget, "steps": run.steps, "tokens": run.tokens,
                 "params": run.params, "flops": run.flops, **scores})
  report = plots.write_report(rows, sweep, workdir)
  return report
