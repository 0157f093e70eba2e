"""What every GPU science sweep shares (configs/science_gpu/*.py).

One size of transformer (dim 256, 4 layers, 4 heads of 64: 3.4M block
weights), 8192 tokens per step for every family, the full shapes data (1-3
objects of every size, 64x64), bf16, the Pallas attention kernel on GPU
(attention_impl=auto), the tiny VAE recipe (configs/common.py: 8x8x8
latents) and a VQ-VAE of the same shape for Chameleon, each trained once per
device call and shared by every run of the call (the sweep's shared/).

Sweeps whose runs have the same family, size, budget and seed plan the same
config (COMMON is the same), so `--results_dir=OWN,OTHER` reuses the other
sweep's stored runs: the ablations' `transfusion` runs are the comparison's.
"""
import ml_collections

DATA = (
    "data.max_objects=3", "data.object_sizes=small,medium,large", "data.image_size=64",
    "data.num_train_scenes=10000", "data.num_eval_scenes=500", "data.num_text_docs=10000",
    "data.seq_len=256", "data.batch_size=32", "data.max_images_per_seq=8", "data.num_workers=8",
)
MODEL = ("model.dtype=bfloat16", "model.attention_impl=auto")
TRAIN = ("train.learning_rate=0.001", "train.end_learning_rate=0.0001", "train.warmup_steps=100",
         "train.log_every=50", "train.eval_batches=4")
# Every sweep's sampler: cheaper than the paper's (PAPER_SAMPLER below).
SWEEP_SAMPLER = ("diffusion.sample_steps=50", "diffusion.sampler=ddim", "diffusion.cfg_scale=3.0")
COMMON = DATA + MODEL + TRAIN + (
    "train.eval_every=1",  # the sweep moves it to the last step: one held-out loss per run
) + SWEEP_SAMPLER

SIZES = {"s": ("model.dim=256", "model.num_layers=4", "model.num_heads=4",
               "model.num_kv_heads=4", "model.time_embed_dim=256")}

# Planned FLOPs per step (tfjax.experiments.budget) of the `s` run: 1.67e11
# Transfusion, 1.75e11 Chameleon (its 1024-row head at every position against
# Transfusion's patch layers): BASE_FLOPS is ~190 Transfusion steps, the
# largest budget ~19,200. Six budgets spanning 100x: on the H100 neither family
# drew 1-3 object scenes right (<= 6%) up to 16x (benchmarks/SCIENCE.md), so
# the last two reach where the shapes checker can tell them apart.
BASE_FLOPS = 3.2e13
BUDGETS = tuple(BASE_FLOPS * k for k in (1, 2.5, 6.3, 16, 40, 100))

SEEDS = (0, 1)

METRICS = {"shapes_accuracy": "higher", "caption_cider": "higher",
           "caption_scene_accuracy": "higher", "perplexity": "lower",
           "val_loss_diffusion": "lower"}

# H100 seconds, from the reports' "Seconds" tables (2026-12-07): a step of
# 8192 tokens at this width takes 4-4.5 ms (launch- and host-bound: the model's
# 1.7e11 FLOPs are < 1 ms of H100 compute); every run also compiles (~22 s) and
# evaluates 64 samples (~6 s). The estimates below are ~50% above that per
# step, so a call starts no run it cannot finish; the U-Net and patch-1 rows
# are guesses. The first run of a call also builds the data and latents.
TIMING = {"step_seconds": {"*": 0.007, "unet": 0.009, "patch1": 0.012},
          "run_overhead_s": 32.0}


# The comparison's data: at its top budget Transfusion sees 10k scenes ~230
# times and Chameleon (4x the positions per image) ~90 times; on 10k scenes
# Chameleon's held-out LM loss already rose 1.02 -> 1.40 from 2e14 to 5.1e14
# FLOPs while its training loss fell (reports/compare_pilot). 100k scenes keep
# the top budget under ~25 passes (Chameleon ~9).
LARGE_DATA = ("data.num_train_scenes=100000", "data.num_text_docs=100000")
# On 100k scenes a step took 7.6 ms (Chameleon) and 11.9 ms (Transfusion)
# against 3.9 / 4.5 ms on 10k (reports/compare, reports/compare_pilot; the
# same model and batch). The pipeline's record reads were made ~2x faster
# since (benchmarks/RESULTS.md, "ArrayRecord reads"), but session 3's runs
# trained no faster (114 s for Transfusion's 7673 steps against 108 s), so
# the cause is elsewhere and these figures stand (PLAN.md).
LARGE_DATA_TIMING = {"step_seconds": {"*": 0.014, "chameleon": 0.009}, "run_overhead_s": 35.0}
# The paper's sampler for its controlled comparison (section 4.1: 250 DDPM
# steps, CFG 5 for both families); the sweeps sample with DDIM 50 / CFG 3.
PAPER_SAMPLER = ("diffusion.sample_steps=250", "diffusion.sampler=ddpm", "diffusion.cfg_scale=5.0")


def sweep(name: str, families: dict, budgets=BUDGETS, parity=(), extra_common=(),
          eval_samples: int = 64, timing=TIMING, eval_variants=None
          ) -> ml_collections.ConfigDict:
  """A science_gpu sweep config over `families` with the shared settings
  (COMMON, then `extra_common`), each run scored on `eval_samples` prompts
  (and its text-to-image again under each of `eval_variants`, {name:
  overrides}, as metric shapes_accuracy_NAME); `timing` sizes the runs
  against a call's time budget."""
  s = ml_collections.ConfigDict()
  s.name = name
  s.families = families
  s.sizes = SIZES
  s.budgets = tuple(budgets)
  s.budget_unit = "flops"
  s.seeds = SEEDS
  s.common = COMMON + tuple(extra_common)
  s.eval = {"num_samples": eval_samples, "seed": 0, "batch_size": 32}
  s.metrics = dict(METRICS)
  if eval_variants:
    s.eval.variants = {k: tuple(v) for k, v in eval_variants.items()}
    s.metrics.update({f"shapes_accuracy_{k}": "higher" for k in eval_variants})
  s.parity = parity
  s.timing = timing
  return s
