"""The GPU science sweeps without a GPU: what they plan, and reports rebuilt
from stored run records alone (no training here)."""
import json
import os

import ml_collections
import numpy as np
import pytest

from configs.science_gpu import (ablations, common, compare, compare_guidance,
                                 compare_paper_sampler, compare_pilot)
from tfjax.config.files import load_module
from tfjax.experiments import budget, results
from tfjax.jobs import sweep as runner


@pytest.fixture(scope="module")
def plans():
  return (runner.plan(compare.get_config()), runner.plan(ablations.get_config()),
          runner.plan(compare_pilot.get_config()),
          runner.plan(compare_paper_sampler.get_config()),
          runner.plan(compare_guidance.get_config()))


def test_compare_plans_equal_flops_budgets_and_seeds(plans):
  runs = plans[0]
  assert {r.family for r in runs} == {"transfusion", "chameleon"}
  assert len(runs) == 2 * len(common.BUDGETS) * 2 and len(common.BUDGETS) >= 4
  assert max(common.BUDGETS) / min(common.BUDGETS) >= 10
  for r in runs:
    assert r.name.endswith(f"-s{r.seed}") and r.seed in (0, 1)
    assert f"train.seed={r.seed}" in r.overrides and r.config.train.seed == r.seed
    assert r.flops == pytest.approx(r.budget, rel=0.01)          # equal FLOPs, by plan
    assert r.config.data.max_objects == 3 and r.config.data.image_size == 64
    assert r.config.model.dtype == "bfloat16" and r.config.model.attention_impl == "auto"
    assert r.config.train.num_steps == r.steps and r.est_seconds > 0
  # Chameleon's step costs more (its head scores every position): fewer steps per budget.
  by = {(r.family, r.budget, r.seed): r for r in runs}
  top = max(common.BUDGETS)
  assert by[("chameleon", top, 0)].steps < by[("transfusion", top, 0)].steps
  assert by[("chameleon", top, 0)].tokens == pytest.approx(
      by[("chameleon", top, 0)].steps * 32 * 256)


def test_ablations_reuse_the_pilots_baseline(plans):
  cmp_runs, abl_runs, pilot_runs = plans[:3]
  assert all(r.config.data.num_train_scenes == 100_000 for r in cmp_runs)
  assert {r.name for r in pilot_runs} < {r.name for r in cmp_runs}
  cmp_runs = pilot_runs
  fams = {r.family for r in abl_runs}
  assert fams == {"transfusion", "causal", "unet", "no_noise_limit", "patch1", "patch4", "flow"}
  cmp_by_name = {r.name: r for r in cmp_runs}
  base = [r for r in abl_runs if r.family == "transfusion"]
  assert base and all(cmp_by_name[r.name].overrides == r.overrides for r in base)
  unet = next(r for r in abl_runs if r.family == "unet")
  lin = next(r for r in abl_runs if r.family == "transfusion" and r.budget == unet.budget
             and r.seed == unet.seed)
  # The U-Net's convolutions are charged: at equal FLOPs it trains fewer steps.
  assert unet.steps < lin.steps
  assert {r.config.model.patch_size for r in abl_runs} == {1, 2, 4}


def with_compare_twins(plans, which):
  """(run, compare.py's run of the same name) for each of plans[which]: the
  1.3e15 pair of both families and seeds."""
  twins = {r.name: r for r in plans[0]}
  runs = plans[which]
  assert {r.family for r in runs} == {"transfusion", "chameleon"} and len(runs) == 4
  return [(r, twins[r.name]) for r in runs]


def test_paper_sampler_runs_train_as_their_compare_twins(plans):
  """Only the sampling keys differ from compare.py's run of the same name, so
  the two records differ by how the same recipe's model was sampled."""
  for r, twin in with_compare_twins(plans, 3):
    assert r.steps == twin.steps and r.flops == twin.flops
    assert [o for o in r.overrides if not o.startswith("diffusion.")] == \
        [o for o in twin.overrides if not o.startswith("diffusion.")]
    assert r.config.train.to_dict() == twin.config.train.to_dict()
    assert r.config.model.to_dict() == twin.config.model.to_dict()
    d = r.config.diffusion
    assert (d.sample_steps, d.sampler, d.cfg_scale) == (250, "ddpm", 5.0)
    assert twin.config.diffusion.sampler == "ddim"


def test_guidance_sweep_trains_compares_runs_and_scores_four_scales(plans):
  for r, twin in with_compare_twins(plans, 4):
    assert r.steps == twin.steps and r.overrides == twin.overrides
    assert r.config.to_dict() == twin.config.to_dict()   # the headline is compare's CFG 3
  sweep = compare_guidance.get_config()
  scales = dict(sweep.eval.variants)
  assert scales == {"cfg1_5": ("diffusion.cfg_scale=1.5",), "cfg5": ("diffusion.cfg_scale=5.0",),
                    "cfg7": ("diffusion.cfg_scale=7.0",)}
  assert {f"shapes_accuracy_{k}" for k in scales} <= set(sweep.metrics)


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4])
def test_stored_gpu_runs_are_what_the_configs_plan(plans, which):
  """Every run record in benchmarks/science_gpu/runs/SWEEP is one the sweep
  still plans, trained and evaluated as planned, so --report_only reads it."""
  module = (compare, ablations, compare_pilot, compare_paper_sampler, compare_guidance)[which]
  stored = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "science_gpu", "runs",
                        module.__name__.rsplit(".", 1)[1])
  names = [r.name for r in plans[which]]
  assert results.unplanned([stored], names) == []
  records = runner.stored_records(module.get_config(), plans[which], [stored])  # raises if stale
  assert all("eval" in rec for rec in records.values())


def test_timing_table_fits_seconds_per_step_and_fixed_seconds():
  from tfjax.experiments import plots
  rows = [{"family": "t", "size": "s", "steps": n, "train_seconds": 20.0 + 0.005 * n,
           "wall_seconds": 26.0 + 0.005 * n} for n in (200, 1000, 3000)]
  line = plots.timing_table(rows).splitlines()[-1]
  assert line == "| t | s | 3 | 0.0050 | 20 | 6 | 26 |", line


def test_measured_flops_sums_the_logged_windows():
  recs = [{"step": 10, "tflops_per_device": 2.0, "step_time": 0.5},   # 1e12 per step
          {"step": 10, "loss": 1.0},
          {"step": 15, "tflops_per_device": 1.0, "step_time": 2.0}]   # 2e12 per step
  assert budget.measured_flops(recs) == pytest.approx(10 * 1e12 + 5 * 2e12)
  assert budget.measured_flops(recs, num_devices=2) == pytest.approx(2 * 2e13)
  assert budget.measured_flops([{"step": 1, "loss": 2.0}]) is None


def _small_sweep() -> ml_collections.ConfigDict:
  s = common.sweep("fake", {
      "transfusion": {"config": "configs/tiny_comparisons.py", "overrides": ()},
      "chameleon": {"config": "configs/chameleon_tiny.py", "overrides": ()}},
      budgets=(1e13, 1e14), parity=(("chameleon", "transfusion"),))
  s.metrics = {"caption_cider": "higher", "perplexity": "lower"}
  return s


def _fake_record(run, sweep, cider):
  return {"name": run.name, "family": run.family, "size": run.size, "seed": run.seed,
          "budget": run.budget, "steps": run.steps, "tokens": run.tokens, "params": run.params,
          "flops": run.flops, "config_file": sweep.families[run.family]["config"],
          "overrides": list(run.overrides), "device": "NVIDIA H100 80GB HBM3",
          "jax_version": "0.11.2", "date": "2026-12-07 10:00 UTC", "train_seconds": 20.0,
          "wall_seconds": 60.0, "caption_cider": cider, "perplexity": 2.0 / cider,
          "eval": dict(sweep.eval)}


def test_report_only_rebuilds_table_and_parity_from_stored_json(tmp_path):
  s = _small_sweep()
  stored = str(tmp_path / "runs")
  for run in runner.plan(s):
    # Transfusion reaches Chameleon's score with a tenth of the compute; the
    # seeds differ a little.
    c = run.flops * (10.0 if run.family == "transfusion" else 1.0)
    results.write_record(stored, _fake_record(run, s, 0.1 * (c / 1e13) ** 0.2
                                              * (1.0 + 0.05 * run.seed)))
  report = runner.run_sweep(s, str(tmp_path / "work"), report_only=True, results_dirs=[stored])
  assert len(report["runs"]) == 8
  par = report["parity"][0]
  assert par["ratio"]["caption_cider"] == pytest.approx(0.1, rel=0.05)
  assert par["ratio"]["perplexity"] == pytest.approx(0.1, rel=0.05)
  assert set(par["ratio_seeds"]["caption_cider"]) == {"0", "1"}
  md = open(tmp_path / "work" / "results.md").read()
  assert "NVIDIA H100 80GB HBM3, JAX 0.11.2: 8 runs" in md
  assert "(seeds 0.1-0.1, 2/2)" in md and "## Mean over seeds" in md
  assert os.path.getsize(tmp_path / "work" / "plots" / "caption_cider.png") > 1000
  # A stored record the config no longer plans that way is refused, by name.
  rec = json.load(open(os.path.join(stored, "transfusion-s-1e13F-s0.json")))
  rec["overrides"] = rec["overrides"][:-1]
  results.write_record(stored, rec)
  with pytest.raises(ValueError, match="transfusion-s-1e13F-s0.*delete the stored file"):
    runner.run_sweep(s, str(tmp_path / "work"), report_only=True, results_dirs=[stored])
  # So is one scored by another evaluation (here: more samples).
  rec["overrides"] = list(next(r for r in runner.plan(s) if r.name == rec["name"]).overrides)
  rec["eval"] = {**rec["eval"], "num_samples": rec["eval"]["num_samples"] + 8}
  results.write_record(stored, rec)
  with pytest.raises(ValueError, match="transfusion-s-1e13F-s0 was evaluated with"):
    runner.run_sweep(s, str(tmp_path / "work"), report_only=True, results_dirs=[stored])


def test_time_budget_starts_no_run_that_cannot_finish(tmp_path):
  s = _small_sweep()
  report = runner.run_sweep(s, str(tmp_path / "work"), results_dirs=[str(tmp_path / "r")],
                            time_budget_s=100.0, reserve_s=120.0)
  assert report["runs"] == [] and len(report["not_started"]) == 8
  assert not os.path.exists(tmp_path / "work" / "runs")


def test_edit_report_has_both_baselines(tmp_path):
  mod = load_module(os.path.join(runner.REPO_ROOT, "benchmarks", "science_gpu_edit.py"))
  per = lambda c: {"per_type": {t: {"edited": 1.0, "unchanged": 1.0, "correct": c, "num": 5}
                                for t in mod.EDIT_TYPES},
                   "per_category": {"edited": 1.0, "unchanged": 1.0, "correct": c}, "accuracy": c}
  after = {**per(0.6), "pixel_error": {"all": 0.03, "copy_input": 0.045},
           "autoencoder_ceiling": per(1.0)}
  results.write_record(str(tmp_path), {"name": "edit-pre10-ft5-s0", "flops": None,
                                       "complete": True, "pretrain_steps": 10,
                                       "finetune_steps": 5, "copy_input": per(0.0),
                                       "after": after,
                                       "after_ddim50_cfg1": {**per(0.7), "pixel_error": {
                                           "all": 0.02}},
                                       "after_img1_5": {**per(0.8), "pixel_error": {
                                           "all": 0.01}},
                                       "probe": {"kept": {c: {"500": 0.06, "700": 0.24,
                                                                  "900": 0.9} for c in (
                                           "true_input", "no_context", "copy_input")}},
                                       "finetune_train": {
                                           "train_seconds": 12.5, "final_train_loss": 0.5,
                                           "val_loss_diffusion": 0.1}})
  text = mod.report(str(tmp_path), str(tmp_path / "edit.md"))
  assert "fine-tuning: train 12.5 s, final training loss 0.5, held-out denoising loss 0.1" in text
  assert "| copy the input | 0.00 (1.00 / 1.00)" in text and "| 0.045 |" in text
  assert "| fine-tuned | 0.60 (1.00 / 1.00)" in text and "**0.600**" in text
  assert "t = 500 / 700 / 900: true input 0.060 / 0.240 / 0.900, no context" in text
  assert "| fine-tuned, sampler=ddim sample_steps=50 cfg_scale=1.0 | 0.70" in text
  assert "| fine-tuned, image_cfg_scale=1.5 | 0.80" in text
  assert "cfg_scale=1.5 |" not in text.replace("image_cfg_scale=1.5 |", "")  # absent: no row
  # Image guidance is scored first, and only for a fine-tune that trained its branch.
  assert list(mod.variants(0.1))[:2] == ["img1_5", "strength0_85_img1_5"]
  assert not any("image_cfg_scale" in " ".join(o) for o in mod.variants(0.0).values())
  assert "(ceiling) | 1.00" in text


def test_keep_going_lists_a_failed_run_and_stores_nothing(tmp_path):
  s = _small_sweep()
  s.families = {"transfusion": {"config": "configs/tiny_comparisons.py", "overrides": ()}}
  s.budgets = (1e10,)
  s.seeds = (0,)
  s.parity = ()
  # Fails fast, in the data stage: too small a vocabulary for the tokenizer.
  s.common = ("data.num_train_scenes=40", "data.num_eval_scenes=8", "data.num_text_docs=60",
              "data.vocab_size=300", "model.vocab_size=300")
  report = runner.run_sweep(s, str(tmp_path / "work"), results_dirs=[str(tmp_path / "r")],
                            keep_going=True)
  assert report["failed"] == ["transfusion-s-1e10F-s0"] and report["runs"] == []
  assert not os.path.exists(tmp_path / "r" / "transfusion-s-1e10F-s0.json")
  with pytest.raises(ValueError, match="data.vocab_size=300"):
    runner.run_sweep(s, str(tmp_path / "work"), results_dirs=[str(tmp_path / "r")])


def test_edit_configs_share_the_sweeps_data_and_vae(plans):
  from tfjax.config import load_config_file, validate
  runs = plans[1]   # the ablations' (and the pilot's) 10k scenes
  pre = load_config_file("configs/science_gpu/edit.py:pretrain", root=runner.REPO_ROOT)
  ft = load_config_file("configs/science_gpu/edit.py", root=runner.REPO_ROOT)
  validate(pre)
  validate(ft)
  sweep_run = next(r for r in runs if r.family == "transfusion")
  assert (runner.shared_vae_workdir("S", pre) == runner.shared_vae_workdir("S", sweep_run.config))
  assert pre.data.max_objects == 3 and ft.editing.max_objects == 2
  assert ft.model.to_dict() == pre.model.to_dict()   # the fine-tune loads the pretrained export
  with pytest.raises(ValueError, match="pretrain or :finetune"):
    load_config_file("configs/science_gpu/edit.py:bogus", root=runner.REPO_ROOT)


def test_grid_tiles_give_back_the_suites_samples(tmp_path):
  """benchmarks/science_gpu_grids.py cuts a suite sample grid back into the
  images the suite drew: rendered scenes come back scored as right."""
  from tfjax.data import shapes
  from tfjax.eval import shapes_checker, suite
  grids = load_module(os.path.join(runner.REPO_ROOT, "benchmarks", "science_gpu_grids.py"))
  opts = shapes.SceneOptions(max_objects=3, sizes=("small", "medium", "large"))
  images, scenes, _ = shapes.generate_split("test", 16, 64, seed=0, options=opts)
  suite._save_grid(images, str(tmp_path / "g.png"))  # pylint: disable=protected-access
  tiles = grids.grid_tiles(str(tmp_path / "g.png"), 64)
  assert len(tiles) == 16 and all(np.array_equal(t, im) for t, im in zip(tiles, images))
  assert shapes_checker.accuracy(tiles, scenes)["accuracy"] == 1.0
  # Shifted by one, the tiles no longer match their scenes.
  assert shapes_checker.accuracy(tiles[1:], scenes[:-1])["accuracy"] < 0.5


def test_edit_probe_regions_split_kept_edited_and_background():
  mod = load_module(os.path.join(runner.REPO_ROOT, "benchmarks", "edit_input_probe.py"))
  grey, red, blue = (128, 128, 128), (255, 0, 0), (0, 0, 255)
  inp = np.full((1, 16, 24, 3), grey, np.uint8)
  inp[0, 0:8, 0:8] = red            # cell (0, 0): an object the edit keeps
  inp[0, 8:12, 8:12] = blue         # cell (1, 1): an object the edit moves away
  out = inp.copy()
  out[0, 8:12, 8:12] = grey
  out[0, 2:6, 18:22] = blue         # ... to cell (0, 2)
  r = mod.regions(inp, out, cell=8)
  assert r["kept"][0].tolist() == [[True, False, False], [False, False, False]]
  assert r["edited"][0].tolist() == [[False, False, True], [False, True, False]]
  assert r["background"][0].tolist() == [[False, True, False], [True, False, True]]


def test_edit_start_from_names_a_stored_model():
  mod = load_module(os.path.join(runner.REPO_ROOT, "benchmarks", "science_gpu_edit.py"))
  path = "benchmarks/science_gpu/assets/edit_model-pre12000-ft1500-s0.tgz"
  assert mod.start_name(path) == "pre12000-ft1500-s0"
  assert os.path.exists(os.path.join(runner.REPO_ROOT, path))
  with pytest.raises(ValueError, match="edit_model-NAME.tgz"):
    mod.start_name("/tmp/ft_export")
