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
  eval       num_samples (, seed, batch_size)    the evaluation suite (evaluate.py);
             (, variants {NAME: (overrides)})   text-to-image again per variant, same
                                                 weights (shapes_accuracy_NAME)
  parity     (family_a, family_b)                the parity-FLOP ratio reported
  metrics    {metric: "higher" | "lower"}        what the table and plots show
optional:
  seeds        (0, 1, ...)      every run once per seed (train.seed and data.shuffle_seed;
                                the data and autoencoders are shared), named NAME-sSEED
  budget_unit  "tokens" | "flops"   what `budgets` count (default tokens); in FLOPs,
                                steps = budget / planned step FLOPs (budget.py)
  layout       {caption_tokens, text_doc_positions, fill}  the packed batch budget.py
                                plans with (default: the shapes data's)
  timing       {"step_seconds": {family or "*": s}, "run_overhead_s": s}  estimated
                                seconds of a run (--list, and what a time budget admits)

Every run is one job (runner.py) of the stages data, vae, latents (or VQ
tokens), train, eval: it trains in WORKDIR/runs/NAME and is evaluated into
WORKDIR/runs/NAME/eval/eval.json, then its record (metrics, FLOPs, overrides,
device, JAX version, date, seconds) is stored as RESULTS_DIR/NAME.json
(tfjax/experiments/results.py). A run stored in any results directory is not
run again; a run whose checkpoint exists resumes. The report is built from
the stored records alone. Data, tokenizer, autoencoders and the latent /
VQ-token caches are built once in WORKDIR/shared, keyed by a hash of the
config sections they depend on, so runs that share data share them.
Training compute follows tfjax/train/flops.py for every family (blocks, the
output head at scored positions, patch layers, attention): planned from the
config before a run (budget.py), measured from the trainer's log after it;
`flops_6nd` keeps the old 6 * N * D beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import ml_collections

from tfjax.config import apply_overrides, load_config_file, validate
from tfjax.experiments import budget as budget_lib
from tfjax.experiments import evaluate as evaluate_lib
from tfjax.experiments import plots
from tfjax.experiments import results as results_lib
from tfjax.jobs import chameleon, stages
from tfjax.jobs.runner import SECONDS_FILE, Barrier, Job, Stage, names, primary, run_stages
from tfjax.train.flops import matmul_params
from tfjax.train.metrics import read_jsonl
from tfjax.train.preemption import Preempted

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_FILE = "run_env.json"   # the device and versions a run trained on (in its run dir)
VARIANTS_FILE = evaluate_lib.VARIANTS_FILE


@dataclasses.dataclass
class Run:
  name: str
  family: str
  size: str
  budget: float             # requested training tokens or FLOPs (sweep key budget_unit)
  config: ml_collections.ConfigDict
  steps: int
  tokens: int               # steps * batch * seq_len
  params: int               # N of 6ND
  flops: float              # planned training FLOPs, flops.py's convention (budget.py)
  seed: int | None = None
  overrides: tuple[str, ...] = ()   # every override, in the order applied
  flops_6nd: float = 0.0
  est_seconds: float | None = None  # sweep key timing


def _budget_label(budget: float, unit: str = "tokens") -> str:
  if unit == "flops":
    mantissa, exp = f"{budget:.2g}".split("e") if "e" in f"{budget:.2g}" else (f"{budget:g}", "0")
    return f"{mantissa}e{int(exp)}F"
  tokens = int(budget)
  for unit_name, div in (("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
    if tokens >= div and tokens % (div // 10 or 1) == 0:
      return f"{tokens / div:g}{unit_name}"
  return str(tokens)


def _estimate_seconds(sweep: ml_collections.ConfigDict, family: str, steps: int) -> float | None:
  timing = sweep.get("timing")
  if not timing:
    return None
  per_step = dict(timing.get("step_seconds", {}))
  step_s = per_step.get(family, per_step.get("*"))
  if step_s is None:
    return None
  return float(timing.get("run_overhead_s", 0.0)) + steps * float(step_s)


def plan(sweep: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the sweep with its resolved config, steps and FLOPs."""
  runs = []
  if not sweep.families:
    raise ValueError("sweep config key families is empty")
  unit = sweep.get("budget_unit", "tokens")
  if unit not in ("tokens", "flops"):
    raise ValueError(f"sweep config key budget_unit={unit!r}: use 'tokens' or 'flops'")
  seeds = tuple(sweep.get("seeds", ()) or ()) or (None,)
  layout = dict(sweep.get("layout") or {})
  sizes = dict(sweep.sizes) if sweep.get("sizes") else {"base": ()}
  for fam, spec in sweep.families.items():
    for size, size_over in sizes.items():
      for budget in tuple(spec.get("budgets", ()) or sweep.budgets):
        for seed in seeds:
          c = load_config_file(spec["config"], root=REPO_ROOT)  # PATH[:ARG]
          over = [*sweep.get("common", ()), *size_over, *spec.get("overrides", ())]
          apply_overrides(c, tuple(sweep.get("common", ())), "sweep key common")
          apply_overrides(c, tuple(size_over), f"sweep key sizes.{size}")
          apply_overrides(c, tuple(spec.get("overrides", ())),
                          f"sweep key families.{fam}.overrides")
          if seed is not None:
            seed_over = (f"train.seed={int(seed)}", f"data.shuffle_seed={int(seed)}")
            apply_overrides(c, seed_over, "sweep key seeds")
            over += seed_over
          per_step = c.data.batch_size * c.data.seq_len
          step_flops = budget_lib.planned_step_flops(c, layout)
          steps = max(1, round(float(budget) / (step_flops if unit == "flops" else per_step)))
          c.train.num_steps = steps
          c.train.warmup_steps = min(c.train.warmup_steps, max(1, steps // 10))
          if c.train.eval_every:
            c.train.eval_every = steps  # one validation loss at the end (0 keeps it off)
          c.train.checkpoint_every = 0
          over += [f"train.num_steps={steps}", f"train.warmup_steps={c.train.warmup_steps}",
                   f"train.eval_every={c.train.eval_every}", "train.checkpoint_every=0"]
          name = f"{fam}-{size}-{_budget_label(float(budget), unit)}"
          if seed is not None:
            name += f"-s{int(seed)}"
          c.name = name
          validate(c)
          n = matmul_params(c.model)
          runs.append(Run(name, fam, size, float(budget), c, steps, steps * per_step, n,
                          steps * step_flops, seed=None if seed is None else int(seed),
                          overrides=tuple(over), flops_6nd=6.0 * n * steps * per_step,
                          est_seconds=_estimate_seconds(sweep, fam, steps)))
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


def shared_vae_workdir(shared: str, c: ml_collections.ConfigDict) -> str:
  """Where a sweep trains (and finds) the autoencoder config `c` needs:
  SHARED/KIND-KEY, the model in its vae/ folder."""
  return os.path.join(shared, f"{c.vae.kind}-" + _vae_key(c))


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
  vae_work = shared_vae_workdir(shared, base)
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
def train_summary(run_dir: str, num_devices: int = 1) -> dict[str, Any]:
  """Last logged training loss (metrics.jsonl survives resumption), held-out
  losses, measured training FLOPs and stage seconds of a finished run."""
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
    out["flops_measured"] = budget_lib.measured_flops(records, num_devices)
  for name, key in ((SECONDS_FILE, "train"), ("train_summary.json", "train_seconds")):
    path = os.path.join(run_dir, name)  # train_summary.json: sweeps run before stage_seconds
    if os.path.exists(path):
      with open(path) as f:
        seconds = json.load(f)
      out["train_seconds"] = seconds.get(key)
      if name == SECONDS_FILE:
        out["stage_seconds"] = seconds
        out["wall_seconds"] = round(sum(v for v in seconds.values() if v), 1)
      break
  return out


def _autoencoder(vae_dir: str) -> dict[str, Any] | None:
  """Kind and validation metrics (PSNR, SSIM, VQ code usage) of the run's autoencoder."""
  path = os.path.join(vae_dir, "tfjax_vae.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    meta = json.load(f)
  return {"kind": meta.get("kind"), **{k: v for k, v in meta.get("metrics", {}).items()
                                       if k != "train_seconds"}}


def _record(run: Run, run_dir: str, sweep: ml_collections.ConfigDict,
            num_devices: int, shared: str) -> dict[str, Any]:
  """The stored result of a finished run: its row of the table and what reproduces it."""
  with open(os.path.join(run_dir, "eval", "eval.json")) as f:
    ev = json.load(f)
  scores = {k: v for k, v in ev.items() if not isinstance(v, (dict, list))}
  for k in ("seed", "seconds", "num_samples"):  # the suite's, not the run's
    if k in scores:
      scores[f"eval_{k}"] = scores.pop(k)
  env_path = os.path.join(run_dir, ENV_FILE)
  env: dict[str, Any] = {"device": None, "jax_version": None, "date": None}
  if os.path.exists(env_path):
    with open(env_path) as f:
      env.update(json.load(f))
  summary = train_summary(run_dir, int(env.get("num_devices") or num_devices))
  rec = {"name": run.name, "sweep": sweep.get("name", "sweep"), "family": run.family,
         "size": run.size, "seed": run.seed, "budget": run.budget,
         "budget_unit": sweep.get("budget_unit", "tokens"), "steps": run.steps,
         "tokens": run.tokens, "params": run.params, "flops_planned": run.flops,
         "flops_6nd": run.flops_6nd, "config_file": sweep.families[run.family]["config"],
         "overrides": list(run.overrides), "eval": eval_settings(sweep), **env, **scores,
         **summary}
  rec["flops"] = rec.get("flops_measured") or run.flops
  shapes_detail = (ev.get("details") or {}).get("shapes") or {}
  if shapes_detail.get("per_category"):  # which part of a scene the samples get wrong
    rec["shapes_per_category"] = shapes_detail["per_category"]
  variants_path = os.path.join(run_dir, "eval", VARIANTS_FILE)
  if sweep.eval.get("variants") and os.path.exists(variants_path):
    with open(variants_path) as f:
      for name, v in json.load(f).items():
        rec[f"shapes_accuracy_{name}"] = v["shapes_accuracy"]
        rec[f"shapes_per_category_{name}"] = v["per_category"]
  rec["autoencoder"] = _autoencoder(run.config.vae.path or os.path.join(
      shared_vae_workdir(shared, run.config), "vae"))
  if run.config.chameleon.enabled:  # no image slots: its 0 denoising loss is no score
    rec["val_loss_diffusion"] = None
  return rec


def eval_settings(sweep: ml_collections.ConfigDict) -> dict[str, Any]:
  """The sweep key eval as plain JSON values: what a record stores and is checked against."""
  e = sweep.eval.to_dict() if hasattr(sweep.eval, "to_dict") else dict(sweep.eval)
  return json.loads(json.dumps(e))


def stored_records(sweep: ml_collections.ConfigDict, runs: Sequence[Run],
                   results_dirs: Sequence[str]) -> dict[str, dict[str, Any]]:
  """{run name: stored record} of the planned runs found in `results_dirs`.

  Raises, naming the run, when a record was trained (config file, overrides)
  or evaluated (the sweep key eval) otherwise than the sweep plans now.
  """
  stored = results_lib.read_records(results_dirs, [r.name for r in runs])
  for run in runs:
    rec = stored.get(run.name)
    want = (sweep.families[run.family]["config"], list(run.overrides))
    if rec is not None and (rec.get("config_file"), rec.get("overrides")) != want:
      raise ValueError(
          f"stored result of run {run.name} ({rec.get('config_file')} with overrides "
          f"{rec.get('overrides')}) is not what the sweep config plans now ({want[0]} with "
          f"{want[1]}): delete the stored file to rerun it, or rename the family or size")
    if rec is not None and rec.get("eval", eval_settings(sweep)) != eval_settings(sweep):
      raise ValueError(
          f"stored result of run {run.name} was evaluated with {rec['eval']}, the sweep key "
          f"eval is now {eval_settings(sweep)}: delete the stored file to rerun it, or keep the "
          f"sweep's eval")
  return stored


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str, *, only: Sequence[str] = (),
              devices: Any = None, report_only: bool = False,
              results_dirs: Sequence[str] = (), time_budget_s: float | None = None,
              reserve_s: float = 120.0, keep_going: bool = False) -> dict[str, Any]:
  """Trains and evaluates every run not stored yet; writes the report from stored runs.

  Args:
    sweep: the sweep config (see the module docstring).
    workdir: runs/, shared/, results.{json,md}, plots/ go here.
    only: run names to (re)run now; the report still covers every stored run.
    devices: devices each run trains on (default all).
    report_only: train nothing, just rebuild the report from stored runs.
    results_dirs: where run records are stored; new ones are written to the
      first, runs stored in any are skipped (default WORKDIR/results).
    time_budget_s: seconds from this call's start after which no run starts
      that cannot finish: a run starts only while more than `reserve_s`
      remain and its estimate (sweep key timing) fits in what remains.
    keep_going: a run that raises is logged with its traceback and listed
      (`failed`), and the next run starts; a stop signal still ends the sweep.
  Returns:
    {"runs": [row, ...], "fits": ..., "parity": ...} as written to results.json.
  """
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  shared = os.path.join(workdir, "shared")
  os.makedirs(workdir, exist_ok=True)
  results_dirs = [os.path.abspath(d) for d in results_dirs] or [os.path.join(workdir, "results")]
  runs = plan(sweep)
  unknown = set(only) - {r.name for r in runs}
  if unknown:
    raise ValueError(f"--only names no run of this sweep: {sorted(unknown)}; runs are "
                     f"{[r.name for r in runs]}")
  stored = stored_records(sweep, runs, results_dirs)
  extra = results_lib.unplanned(results_dirs, [r.name for r in runs])
  if extra:
    log.warning("sweep: stored results of runs this config does not plan (left out): %s", extra)
  import jax  # pylint: disable=g-import-not-at-top
  num_devices = len(devices) if devices is not None else jax.device_count()
  not_started, failed = [], []
  # Seed by seed, budgets upward, every family at a budget before the next: a
  # call cut short leaves comparable runs.
  for run in sorted(runs, key=lambda r: (r.seed or 0, r.budget, r.family)):
    if run.name in stored:
      continue
    run_dir = os.path.join(workdir, "runs", run.name)
    # The eval stage writes variants.json (when asked for) after eval.json.
    done_path = os.path.join(run_dir, "eval", VARIANTS_FILE if sweep.eval.get("variants")
                             else "eval.json")
    wanted = not only or run.name in only
    if not os.path.exists(done_path) and wanted and not report_only:
      left = None if time_budget_s is None else time_budget_s - (time.time() - t0)
      if left is not None and (left < reserve_s or (run.est_seconds or 0.0) > left):
        not_started.append(run.name)
        continue
      log.info("sweep: run %s (%d steps, %.3g FLOPs planned)", run.name, run.steps, run.flops)
      os.makedirs(shared, exist_ok=True)
      os.makedirs(run_dir, exist_ok=True)
      results_lib.write_json(os.path.join(run_dir, ENV_FILE),
                             {**results_lib.environment(), "num_devices": num_devices})
      try:
        run_stages(*run_job(run.config, shared, run_dir, sweep.eval, devices))
      except Preempted:
        raise
      except Exception:  # pylint: disable=broad-except
        if not keep_going:
          raise
        log.exception("sweep: run %s failed; going on (--keep_going)", run.name)
        failed.append(run.name)
        continue
    if os.path.exists(done_path):
      stored[run.name] = _record(run, run_dir, sweep, num_devices, shared)
      results_lib.write_record(results_dirs[0], stored[run.name])
      log.info("sweep: stored %s", results_lib.record_path(results_dirs[0], run.name))
  if not_started:
    log.warning("sweep: time budget: %d runs not started: %s", len(not_started), not_started)
  if failed:
    log.error("sweep: %d runs failed: %s", len(failed), failed)
  rows = [stored[r.name] for r in runs if r.name in stored]
  report = plots.write_report(rows, sweep, workdir)
  report.update(not_started=not_started, failed=failed)
  return report
