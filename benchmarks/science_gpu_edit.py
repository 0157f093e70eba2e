"""Image editing at GPU scale (issue 36): pretrain, fine-tune, score; one stored JSON.

  python3 benchmarks/science_gpu_edit.py --workdir=/tmp/edit --results_dir=/tmp/edit/results \
      [--stored_dir=benchmarks/science_gpu/runs/edit] [--time_budget_s=540] \
      [--start_from=benchmarks/science_gpu/assets/edit_model-NAME.tgz --finetune_steps=M]
  python3 benchmarks/science_gpu_edit.py --report --results_dir=benchmarks/science_gpu/runs/edit \
      --out=benchmarks/science_gpu/reports/edit.md

The chain (each a project command, as benchmarks/SCIENCE.md's Editing section
ran them on the CPU):
  pretrain  tfjax-train --config=configs/science_gpu/edit.py:pretrain (the main job:
            data, VAE unless one is stored, latents, train, samples on 32 held-out captions)
  export    tfjax-export (float32)
  edit data tfjax-edit-data --config=configs/science_gpu/edit.py
  before    tfjax-eval --suite=editing of the pretrained export (200 test edits)
  finetune  tfjax-train --config=configs/science_gpu/edit.py --stages=train, then
            tfjax-export (bfloat16; science_gpu.sh returns it as edit_model.tgz)
  probe     benchmarks/edit_input_probe.py: does the model carry kept objects over?
  after     tfjax-eval --suite=editing of the fine-tuned model (the same 200 edits)
  variants  the same from the input noised to strength 0.85 (SDEdit), then with DDIM 50
            at CFG 3, 1.5 and 1, time allowing: does the paper's guidance (DDPM 250,
            CFG 5) pull the output away from its input? A fine-tune with
            --override=editing.instruction_dropout=P (record ...-ftM-idropP-sS) is
            first scored with image guidance (InstructPix2Pix: the input image and
            the instruction guided apart, diffusion.image_cfg_scale).
beside two baselines on the same edits: copying the input (the pixel checker on
the input images; its pixel error is in the suite's result) and the
autoencoder ceiling (the expected outputs through the VAE, in the suite's result).
--start_from fine-tunes a stored model further instead (no pretraining, no
"before"): record edit-NAME-ftM-sS. The record RESULTS_DIR/NAME.json is
rewritten after every step
(`"complete": false` until the last), so a call cut short keeps what it got; a
complete record in --stored_dir means there is nothing to run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/science_gpu/edit.py"
NUM_EDITS = 200
EDIT_TYPES = ("recolor", "move", "add", "remove")
# The fine-tuned model scored again under other samplers ("after_NAME" in the
# record). Guidance extrapolates away from the unconditional prediction, which
# sees neither the instruction nor the input image; strength < 1 starts the
# output from the noised input (SDEdit), so what the edit keeps starts kept.
# Run in this order, time allowing.
_DDIM50 = ("diffusion.sampler=ddim", "diffusion.sample_steps=50")
VARIANTS = {
    "strength0_85": ("diffusion.strength=0.85",),  # the paper's sampler (DDPM 250, CFG 5)
    **{f"ddim50_cfg{scale:g}".replace(".", "_"): (*_DDIM50, f"diffusion.cfg_scale={scale}")
       for scale in (3.0, 1.5, 1.0)},
}
# Image guidance, for a model fine-tuned with editing.instruction_dropout (its
# text-free branch): InstructPix2Pix's image scale 1.5 beside the text's CFG 5.
IMAGE_VARIANTS = {
    "img1_5": ("diffusion.image_cfg_scale=1.5",),
    "strength0_85_img1_5": ("diffusion.strength=0.85", "diffusion.image_cfg_scale=1.5"),
}


def variants(instruction_dropout: float) -> dict[str, tuple[str, ...]]:
  """The variants a fine-tune is scored with, in order."""
  return {**(IMAGE_VARIANTS if instruction_dropout > 0 else {}), **VARIANTS}


def _cmd(args: list[str], log: str, module: bool = True) -> float:
  """Runs a project CLI (python -m MODULE ...; module=False: a script) from the
  repository root; its seconds."""
  t0 = time.time()
  print("+", " ".join(args), flush=True)
  with open(log, "a") as f:
    subprocess.run([sys.executable, *(["-m"] if module else []), *args], cwd=REPO, stdout=f,
                   stderr=subprocess.STDOUT, check=True)
  return round(time.time() - t0, 1)


def _summary(res: dict) -> dict:
  """The editing suite's numbers a table needs (per type, overall, pixel errors)."""
  ed = res.get("details", {}).get("editing", res)
  keep = ("accuracy", "per_category", "per_type", "num_examples", "pixel_error",
          "pixel_error_vs_autoencoded", "autoencoder_ceiling", "seconds")
  return {k: ed.get(k) for k in keep}


def _scored(work: str, which: str, name: str) -> dict:
  """WORK/WHICH/WHICH.json's summary; its sample grid is copied to
  WORK/grids/NAME_WHICH.png (science_gpu.sh returns the grids)."""
  with open(os.path.join(work, which, f"{which}.json")) as f:
    out = _summary(json.load(f))
  grid = os.path.join(work, which, "editing_samples.png")
  if os.path.exists(grid):
    os.makedirs(os.path.join(work, "grids"), exist_ok=True)
    shutil.copy(grid, os.path.join(work, "grids", f"{name}_{which}.png"))
  return out


def start_name(path: str) -> str:
  """NAME of a stored model assets/edit_model-NAME.tgz (record edit-NAME made it)."""
  base = os.path.basename(path.rstrip("/"))
  if not (base.startswith("edit_model-") and base.endswith(".tgz")):
    raise ValueError(f"--start_from={path}: expected a stored model "
                     "benchmarks/science_gpu/assets/edit_model-NAME.tgz")
  return base[len("edit_model-"):-len(".tgz")]


def unpack_model(path: str, dest: str) -> str:
  """Unpacks a stored model (ft_export/, without vae/) under dest; the export's path."""
  with tarfile.open(path) as tar:
    tar.extractall(dest, filter="data")
  export = os.path.join(dest, "ft_export")
  if not os.path.exists(os.path.join(export, "tfjax_export.json")):
    raise FileNotFoundError(f"--start_from={path}: no ft_export/tfjax_export.json inside")
  return export


def copy_input_baseline(config, seed: int, num: int) -> dict:
  """The pixel checker on the unedited inputs of the same test edits."""
  from tfjax.eval import editing  # pylint: disable=g-import-not-at-top
  examples = editing.suite_examples(config, num, seed=seed)
  return editing.accuracy([ex["input"] for ex in examples], [ex["meta"] for ex in examples])


def run(args: argparse.Namespace) -> dict:
  from tfjax.config import apply_overrides, load_config_file  # pylint: disable=g-import-not-at-top
  from tfjax.experiments import results  # pylint: disable=g-import-not-at-top
  from tfjax.jobs.sweep import (  # pylint: disable=g-import-not-at-top
      shared_vae_workdir, train_summary)
  t0 = time.time()
  pre_cfg = load_config_file(f"{CONFIG}:pretrain", root=REPO)
  ft_cfg = load_config_file(CONFIG, root=REPO)
  apply_overrides(pre_cfg, tuple(args.override), "--override")
  apply_overrides(ft_cfg, tuple(args.override), "--override")
  pre_steps = args.pretrain_steps or pre_cfg.train.num_steps
  ft_steps = args.finetune_steps or ft_cfg.train.num_steps
  start = f"edit-{start_name(args.start_from)}" if args.start_from else ""  # its record's name
  drop = float(ft_cfg.editing.instruction_dropout)
  ft_name = f"ft{ft_steps}" + (f"-idrop{drop:g}" if drop > 0 else "")
  name = (f"{start}-{ft_name}-s{args.seed}" if start
          else f"edit-pre{pre_steps}-{ft_name}-s{args.seed}")
  stored = os.path.join(args.stored_dir or "", f"{name}.json")
  if args.stored_dir and os.path.exists(stored):
    with open(stored) as f:
      if json.load(f).get("complete"):
        print(f"{stored} is complete: nothing to run")
        return {}
  work = os.path.abspath(args.workdir)
  os.makedirs(work, exist_ok=True)
  log = os.path.join(work, "edit_commands.log")
  # Training dirs named by what they train: tfjax-train resumes from a checkpoint
  # it finds, so a warm machine's earlier chain must not stand in for this one.
  pre = os.path.join(work, f"pre{pre_steps}-s{args.seed}")
  export, ft = f"{pre}_export", os.path.join(work, f"{name}-ft")
  # What science_gpu.sh returns as edit_model.tgz: never an earlier chain's.
  shutil.rmtree(os.path.join(work, "ft_export"), ignore_errors=True)
  # The sweeps' KL-VAE of this data, when science_gpu.sh extracted a stored one.
  shared_vae = os.path.join(shared_vae_workdir(os.path.join(work, "shared"), pre_cfg), "vae")
  vae = shared_vae if os.path.isdir(shared_vae) else ""
  extra = [f"--config.{o}" for o in args.override]
  seed_over = [f"--config.train.seed={args.seed}", f"--config.data.shuffle_seed={args.seed}",
               *extra]
  rec = {"name": name, "sweep": "edit", "config_file": CONFIG, "seed": args.seed,
         "pretrain_steps": None if start else pre_steps, "finetune_steps": ft_steps,
         "num_edits": args.num_edits, "complete": False, "seconds": {}, "overrides": {},
         **results.environment()}
  if start:
    rec["start_from"] = start

  def save():
    rec["wall_seconds"] = round(time.time() - t0, 1)
    results.write_record(args.results_dir, rec)

  def time_left(need: float) -> bool:
    left = args.time_budget_s - (time.time() - t0) if args.time_budget_s else float("inf")
    if left < need:
      print(f"time budget: {left:.0f} s left, the next step needs ~{need:.0f}: stopping")
      save()
      return False
    return True

  rec["copy_input"] = copy_input_baseline(ft_cfg, args.seed, args.num_edits)
  if start:
    # A stored model instead of pretraining; its tokenizer makes the edit set.
    if not vae:
      raise FileNotFoundError(f"{shared_vae}: --start_from needs the sweeps' stored KL-VAE "
                              "(science_gpu.sh unpacks assets/autoencoders.tgz)")
    export = unpack_model(args.start_from, os.path.join(work, "start"))
    data_dir = os.path.join(work, "start_data")
    os.makedirs(data_dir, exist_ok=True)
    shutil.copytree(os.path.join(export, "tokenizer"), os.path.join(data_dir, "tokenizer"),
                    dirs_exist_ok=True)
  else:
    pre_args = [f"--config={CONFIG}:pretrain", f"--workdir={pre}",
                f"--config.train.num_steps={pre_steps}", f"--config.train.eval_every={pre_steps}",
                *seed_over] + ([f"--config.vae.path={vae}"] if vae else [])
    rec["overrides"]["pretrain"] = pre_args[2:]
    rec["seconds"]["pretrain"] = _cmd(["tfjax.cli.train", *pre_args], log)
    samples = os.path.join(pre, "samples", "samples.json")
    if os.path.exists(samples):
      with open(samples) as f:
        s = json.load(f)
      rec["pretrain"] = {"step": s.get("step"), "num": s.get("num"),
                         "shapes_accuracy": (s.get("t2i_scores") or {}).get("accuracy"),
                         "caption_mentions_accuracy": s.get("i2t_mentions_accuracy"),
                         "caption_cider_d": s.get("i2t_cider_d")}
    rec["pretrain_train"] = train_summary(pre)  # losses, train seconds: to size the next chain
    if not vae:  # the main job trained one: keep it where science_gpu.sh packs it
      vae = os.path.join(pre, "vae")
      shutil.copytree(vae, shared_vae)
    save()
    rec["seconds"]["export"] = _cmd(["tfjax.cli.export", f"--workdir={pre}", f"--out={export}",
                                     "--dtype=float32"], log)
    data_dir = os.path.join(pre, "data")
  data = f"--config.data.dir={data_dir}"
  rec["seconds"]["edit_data"] = _cmd(["tfjax.cli.edit_data", f"--config={CONFIG}", data,
                                      f"--config.vae.path={vae}", *extra], log)
  ev = ["tfjax.cli.eval", "--suite=editing", f"--num_samples={args.num_edits}", "--batch_size=50",
        f"--seed={args.seed}",  # the export's own config would draw its pretraining scenes
        f"--override=editing.max_objects={ft_cfg.editing.max_objects}",
        f"--override=editing.object_sizes={ft_cfg.editing.object_sizes}"]

  def score(which: str, model: str, overrides: tuple[str, ...] = ()) -> None:
    """The editing suite on `model` into rec[which] (and WORK/WHICH/WHICH.json)."""
    rec["seconds"][which] = _cmd([*ev, f"--model={model}", *(f"--override={o}" for o in overrides),
                                  f"--json={os.path.join(work, which, f'{which}.json')}"], log)
    rec[which] = _scored(work, which, name)
    save()

  if not start and time_left(90 + 60 + 60):
    score("before", export)
  if not time_left(60 + 60):
    return rec
  ft_args = [f"--config={CONFIG}", f"--workdir={ft}", "--stages=train",
             f"--config.train.init_from={export}", data, f"--config.vae.path={vae}",
             f"--config.train.num_steps={ft_steps}", f"--config.train.eval_every={ft_steps}",
             *seed_over]
  rec["overrides"]["finetune"] = ft_args[3:]
  rec["seconds"]["finetune"] = _cmd(["tfjax.cli.train", *ft_args], log)
  rec["finetune_train"] = train_summary(ft)
  save()
  # A bfloat16 export (~10 MB) that science_gpu.sh returns without its VAE, so
  # later sampling studies of this model need no device time.
  rec["seconds"]["export_finetuned"] = _cmd(
      ["tfjax.cli.export", f"--workdir={ft}", f"--out={os.path.join(work, 'ft_export')}",
       "--dtype=bfloat16"], log)
  save()
  if not time_left(45 + 30):
    return rec
  probe_json = os.path.join(work, "probe.json")
  rec["seconds"]["probe"] = _cmd([os.path.join("benchmarks", "edit_input_probe.py"),
                                  f"--model={ft}", f"--num={args.num_edits}",
                                  f"--json={probe_json}"], log, module=False)
  with open(probe_json) as f:
    rec["probe"] = json.load(f)
  save()
  if not time_left(45):
    return rec
  score("after", ft)
  for variant, overrides in variants(drop).items():
    # H100 seconds for 200 edits (session 5): DDPM 250 ~42, DDIM 50 ~25;
    # image guidance adds a third branch to every step.
    need = 30 if "diffusion.sampler=ddim" in overrides else 45
    if not time_left(need * 1.5 if any("image_cfg_scale" in o for o in overrides) else need):
      return rec
    score(f"after_{variant}", ft, overrides)
  rec["complete"] = True
  save()
  return rec


def _training_lines(r: dict) -> list[str]:
  """Each stage's training seconds and losses, when the record has them."""
  from tfjax.experiments.plots import fmt  # pylint: disable=g-import-not-at-top
  lines = [f"{stage}: train {t.get('train_seconds')} s, final training loss "
           f"{fmt(t.get('final_train_loss'))}, held-out denoising loss "
           f"{fmt(t.get('val_loss_diffusion'))}"
           for stage, t in (("pretraining", r.get("pretrain_train")),
                            ("fine-tuning", r.get("finetune_train"))) if t]
  return [*lines, ""] if lines else []


def _probe_line(r: dict) -> list[str]:
  """The input probe's kept-object errors, when the record has them."""
  p = (r.get("probe") or {}).get("kept")
  if not p:
    return []
  ts = ("500", "700", "900")
  cells = lambda c: " / ".join(f"{p[c][t]:.3f}" for t in ts)
  return [f"input probe, kept objects' clean-estimate error at t = {' / '.join(ts)}: true input "
          f"{cells('true_input')}, no context {cells('no_context')}, copying the input "
          f"{cells('copy_input')} (benchmarks/edit_input_probe.py)", ""]


def _row(label: str, acc: dict | None, pixel: dict | None, key: str = "all") -> str:
  if not acc:
    return f"| {label} | " + " | ".join("-" for _ in (*EDIT_TYPES, "all", "pix")) + " |"
  per = acc.get("per_type") or {}
  cells = [f"{per[t]['correct']:.2f} ({per[t]['edited']:.2f} / {per[t]['unchanged']:.2f})"
           if t in per else "-" for t in EDIT_TYPES]
  cat = acc.get("per_category") or {}
  cells.append(f"**{acc.get('accuracy', cat.get('correct', 0.0)):.3f}** "
               f"({cat.get('edited', 0.0):.3f} / {cat.get('unchanged', 0.0):.3f})")
  cells.append(f"{pixel[key]:.3f}" if pixel and pixel.get(key) is not None else "-")
  return f"| {label} | " + " | ".join(cells) + " |"


def report(results_dir: str, out: str) -> str:
  """One table per stored edit record: before, after and both baselines."""
  lines = ["# Image editing at GPU scale", "",
           "Each cell: correct (edited / unchanged) over the test edits; pixel error: mean "
           "absolute error to the expected output (0-1, lower is better).", ""]
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    lines += [f"## {r['name']}" + ("" if r.get("complete") else " (incomplete)"), "",
              f"{r.get('device')}, JAX {r.get('jax_version')}, {r.get('date')}; "
              + (f"from {r['start_from']}" if r.get("start_from") else
                 f"pretrain {r['pretrain_steps']} steps (shapes checker on held-out captions: "
                 f"{(r.get('pretrain') or {}).get('shapes_accuracy', '-')})")
              + f", fine-tune {r['finetune_steps']} steps; seconds {r.get('seconds')}", "",
              *_training_lines(r), *_probe_line(r),
              "| model | " + " | ".join(EDIT_TYPES) + " | all | pixel error |",
              "|---|" + "---|" * (len(EDIT_TYPES) + 2)]
    before, after = r.get("before") or {}, r.get("after") or {}
    any_pixel = after.get("pixel_error") or before.get("pixel_error")
    lines.append(_row("copy the input", r.get("copy_input"), any_pixel, "copy_input"))
    lines.append(_row("pretrained, before fine-tuning", before, before.get("pixel_error")))
    lines.append(_row("fine-tuned", after, after.get("pixel_error")))
    for variant, overrides in {**IMAGE_VARIANTS, **VARIANTS}.items():
      if r.get(f"after_{variant}"):
        v = r[f"after_{variant}"]
        lines.append(_row(f"fine-tuned, {' '.join(o.split('.', 1)[1] for o in overrides)}",
                          v, v.get("pixel_error")))
    lines.append(_row("expected output through the VAE (ceiling)",
                      (after or before).get("autoencoder_ceiling"), None))
    lines.append("")
  text = "\n".join(lines)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  return text


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/science_gpu/edit")
  p.add_argument("--results_dir", required=True)
  p.add_argument("--stored_dir", default="")
  p.add_argument("--time_budget_s", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--pretrain_steps", type=int, default=0, help="default: the config's")
  p.add_argument("--finetune_steps", type=int, default=0, help="default: the config's")
  p.add_argument("--start_from", default="",
                 help="a stored model (benchmarks/science_gpu/assets/edit_model-NAME.tgz) to "
                      "fine-tune further instead of pretraining: record edit-NAME-ftM-sS")
  p.add_argument("--num_edits", type=int, default=NUM_EDITS, help="test edits scored")
  p.add_argument("--override", action="append", default=[],
                 help="KEY=VALUE for both trainings (repeatable; a CPU smoke run shrinks data)")
  p.add_argument("--report", action="store_true", help="write --out from stored records")
  p.add_argument("--out", default="benchmarks/science_gpu/reports/edit.md")
  args = p.parse_args()
  if args.report:
    print(report(args.results_dir, args.out))
  else:
    run(args)


if __name__ == "__main__":
  main()
