"""The sweep runner: a tiny two-point sweep end to end (train, evaluate, table,
plots), plus the power-law fit and parity-FLOP arithmetic."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tfjax.experiments import plots
from tfjax.jobs import sweep as runner

BASE = '''
from tfjax.config import default_config

def get_config():
  c = default_config()
  d = c.data
  d.image_size, d.num_train_scenes, d.num_eval_scenes, d.num_text_docs = 32, 120, 16, 200
  d.vocab_size, d.seq_len, d.batch_size, d.max_images_per_seq = 400, 64, 2, 2
  v = c.vae
  v.channels, v.norm_groups, v.latent_channels, v.mid_attention = (8, 8, 8, 8), 4, 4, False
  v.path = {vae_path!r}
  m = c.model
  m.vocab_size, m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 400, 32, 1, 2, 2, 64
  m.latent_size, m.latent_channels, m.patch_size = 4, 4, 2
  m.dtype, m.attention_impl, m.remat_policy, m.time_embed_dim = "float32", "xla", "none", 16
  c.train.log_every, c.train.eval_batches, c.train.warmup_steps = 1, 1, 1
  c.diffusion.sample_steps, c.diffusion.sampler = 2, "ddim"
  c.sample.max_text_tokens = 4
  return c
'''


def test_power_law_fit_and_parity():
  c = np.array([1e12, 1e13, 1e14])
  fit = plots.fit_power_law(c, 2.0 * c ** 0.1)
  assert fit["b"] == pytest.approx(0.1) and fit["a"] == pytest.approx(2.0)
  # B reaches A's value with 10x the compute: B = 2 * (C / 10) ** 0.1.
  fit_b = plots.fit_power_law(c, 2.0 * (c / 10) ** 0.1)
  assert plots.parity_ratio(fit, fit_b, 1e14) == pytest.approx(10.0)
  assert plots.parity_ratio(fit_b, fit, 1e14) == pytest.approx(0.1)
  # Lower-is-better metrics: B's slope must be negative to ever match.
  assert plots.parity_ratio(fit, fit_b, 1e14, direction="lower") is None
  assert plots.fit_power_law([1e12, 1e13], [0.0, 0.5]) is None   # one usable point
  assert plots.fit_power_law([1e12, 1e12], [0.2, 0.5]) is None   # no compute spread
  # Two seeds of one budget count slightly different FLOPs: still no spread
  # (the line through them has slope ~2000 and log a ~ -6e4; the other way
  # round, exp(log a) overflowed the ablations' report).
  assert plots.fit_power_law([8.1298e13, 8.1288e13], [0.78, 0.61]) is None
  assert plots.parity_pairs(("a", "b")) == [("a", "b")]
  assert plots.parity_pairs((("a", "b"), ("c", "d"))) == [("a", "b"), ("c", "d")]


def test_overrides_name_bad_keys():
  from tfjax.config import default_config
  c = default_config()
  runner.apply_overrides(c, ("model.dim=64", "model.image_attention=causal",
                             "diffusion.loss_weight=2", "model.unet_channels=(8, 16)"))
  assert c.model.dim == 64 and c.model.image_attention == "causal"
  assert c.diffusion.loss_weight == 2.0 and tuple(c.model.unet_channels) == (8, 16)
  with pytest.raises(KeyError, match="model.dimm"):
    runner.apply_overrides(c, ("model.dimm=3",))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  """A two-budget Transfusion sweep run by the runner (untrained random VAE)."""
  from tfjax.vae import io
  from tfjax.vae.train import vae_meta
  from tfjax.config import default_config
  work = str(tmp_path_factory.mktemp("sweep"))
  cfg = default_config()
  cfg.vae.channels, cfg.vae.norm_groups, cfg.vae.latent_channels = (8, 8, 8, 8), 4, 4
  cfg.vae.mid_attention = False
  meta = vae_meta(cfg)
  module = io.build_module(meta)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  vae_path = io.save(os.path.join(work, "vae"), {**meta, "scale": 1.0, "shift": 0.0}, params)
  base = os.path.join(work, "base.py")
  with open(base, "w") as f:
    f.write(BASE.format(vae_path=vae_path))
  s = ml_collections.ConfigDict()
  s.name = "test_sweep"
  s.families = {"transfusion": {"config": base, "overrides": ()}}
  s.sizes = {"xxs": ("model.dim=32",)}
  s.budgets = (128, 256)     # 1 and 2 steps of 2 x 64 tokens
  s.common = ("train.eval_every=0",)  # the validation loss is not what the table reports
  # The variant samples the same weights without guidance (eval_variants).
  s.eval = {"num_samples": 4, "seed": 0, "batch_size": 4,
            "variants": {"no_cfg": ("diffusion.cfg_scale=0",)}}
  s.parity = ("transfusion", "transfusion")
  s.metrics = dict(plots.DEFAULT_METRICS)
  out = os.path.join(work, "out")
  report = runner.run_sweep(s, out, devices=jax.devices()[:1])
  return out, report, s


def test_two_point_sweep_writes_table_and_plots(sweep_dir):
  out, report, _ = sweep_dir
  assert [r["name"] for r in report["runs"]] == ["transfusion-xxs-128", "transfusion-xxs-256"]
  assert [r["steps"] for r in report["runs"]] == [1, 2]
  f1, f2 = (r["flops_planned"] for r in report["runs"])
  assert f2 == pytest.approx(2 * f1)
  # The table's FLOPs are the trainer's count of the batches a run trained on
  # (a 1-step run's only step compiles and is not timed: planned FLOPs stand).
  assert report["runs"][0]["flops"] == f1
  assert report["runs"][1]["flops"] > 0 and report["runs"][1]["flops"] != f2
  for r in report["runs"]:
    assert r["perplexity"] > 1.0 and 0.0 <= r["shapes_accuracy"] <= 1.0
    assert r["caption_cider"] >= 0.0
    # The checker's breakdown is stored beside its headline (what samples get wrong).
    assert r["shapes_per_category"]["correct"] == r["shapes_accuracy"]
    assert {"presence", "count", "color", "shape"} <= set(r["shapes_per_category"])
    # The variant scored the same weights again, without guidance.
    run_eval = os.path.join(out, "runs", r["name"], "eval")
    with open(os.path.join(run_eval, "variants.json")) as f:
      variant = json.load(f)["no_cfg"]
    assert variant["overrides"] == ["diffusion.cfg_scale=0"]
    assert os.path.exists(os.path.join(run_eval, "no_cfg", "shapes_samples.png"))
    with open(os.path.join(out, "results", r["name"] + ".json")) as f:
      rec = json.load(f)
    assert rec["shapes_accuracy_no_cfg"] == variant["shapes_accuracy"]
    assert rec["shapes_per_category_no_cfg"]["correct"] == variant["shapes_accuracy"]
    assert rec["eval"]["variants"] == {"no_cfg": ["diffusion.cfg_scale=0"]}
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["runs"] == report["runs"]
  md = open(os.path.join(out, "results.md")).read()
  assert "transfusion-xxs-256" in md and "Parity-FLOP ratios" in md
  assert "Shapes checker by category" in md
  assert report["parity"][0]["ratio"]["perplexity"] == pytest.approx(1.0)
  # Perplexity is positive for every run, so it always has a fit and a plot.
  assert report["fits"]["perplexity"]["transfusion"]["points"] == 2
  assert os.path.getsize(os.path.join(out, "plots", "perplexity.png")) > 1000
  assert os.path.exists(os.path.join(out, "runs", "transfusion-xxs-256", "eval", "shapes_samples.png"))


def test_finished_runs_are_reused(sweep_dir):
  out, report, s = sweep_dir
  stamp = os.path.getmtime(os.path.join(out, "runs", "transfusion-xxs-128", "eval", "eval.json"))
  again = runner.run_sweep(s, out, devices=jax.devices()[:1])
  assert again["runs"] == report["runs"]
  assert os.path.getmtime(os.path.join(out, "runs", "transfusion-xxs-128", "eval",
                                       "eval.json")) == stamp
  with pytest.raises(ValueError, match="no run"):
    runner.run_sweep(s, out, only=("nope",))
