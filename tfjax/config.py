"""The config schema: every key, its default and what it means.

Config files under `configs/` start from `default_config()` and override what
their experiment changes; the command line overrides any key with
`--config.section.key=value`. `validate(config)` runs at start-up of every
command and names the key that makes a config impossible.
"""
from __future__ import annotations

import ast
import math
from typing import Any, Sequence

import ml_collections

from tfjax.scene_limits import read_scene_limits, scene_limits_error

# Special tokens get fixed ids at the start of every vocabulary (tokenizer.py
# maps a loaded sentencepiece model onto these).
PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID = 0, 1, 2, 3, 4


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "tfjax"

  # ---- model: the transformer and its modality-specific layers -----------
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 32000        # embedding rows; >= tokenizer vocab (+ image codes for chameleon)
  m.dim = 768
  m.num_layers = 16
  m.num_heads = 12
  m.num_kv_heads = 12         # < num_heads: grouped-query attention
  m.mlp_dim = 0               # 0: Llama's rule, 8/3 * dim rounded up to a multiple of 256
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.qk_norm = False           # Chameleon's stability change
  m.norm_placement = "pre"    # pre (Llama) | chameleon (norm on each sublayer's output)
  m.tie_embeddings = False
  m.attention_impl = "auto"   # xla | pallas | auto
  m.image_attention = "bidirectional"  # bidirectional | causal (ablation)
  m.dtype = "bfloat16"        # compute dtype
  m.param_dtype = "float32"   # master weights
  m.scan_layers = True        # nn.scan over the layer stack: constant compile time
  # What the backward pass keeps (tfjax/model/transformer.py REMAT_POLICIES):
  # none | nothing_saveable | save_all_names | save_attention | save_qkv_attention
  # | offload_all_names | dots_saveable | dots_with_no_batch_dims_saveable | full
  m.remat_policy = "nothing_saveable"
  # Training: the LM head + cross-entropy run over this many positions of each
  # row at a time, scored text positions only (tfjax.losses.chunked_lm_loss);
  # 0 = whole float32 [batch, seq, vocab] logits.
  m.lm_head_chunk = 0
  # image side
  m.patch_type = "linear"     # linear | unet
  m.patch_size = 2            # k: k x k latent pixels per transformer vector (1, 2, 4, 8)
  m.unet_channels = (64, 128)  # U-Net down/up block widths (patch_type=unet)
  m.unet_blocks_per_level = 1
  m.time_embed_dim = 256      # sinusoidal timestep features fed to the timestep MLP

  # ---- image latents (what the VAE produces) ------------------------------
  m.latent_channels = 8
  m.latent_size = 8           # latent grid side (image_size / vae downsample)

  # ---- diffusion ---------------------------------------------------------
  d = c.diffusion = ml_collections.ConfigDict()
  d.objective = "ddpm"        # ddpm (epsilon prediction) | flow (rectified flow, velocity)
  d.num_timesteps = 1000
  d.schedule = "cosine"
  d.loss_weight = 5.0         # lambda in L = L_LM + lambda * L_DDPM
  d.max_t_image_first = 500   # noise limit for images before their caption; -1 disables
  d.caption_dropout = 0.1     # caption dropped for classifier-free guidance
  d.sample_steps = 250
  d.sampler = "ddpm"          # ddpm | ddim
  d.cfg_scale = 5.0

  # ---- data --------------------------------------------------------------
  data = c.data = ml_collections.ConfigDict()
  data.dir = "data"           # where built datasets, tokenizer and latents live; relative to the
                              # workdir (path keys: see tfjax/paths.py)
  # text: shapes_text | tfds:NAME[/config] | text:GLOB | jsonl:GLOB[:FIELD]
  #       | parquet:GLOB[:COLUMN] | none  (docs/real_data.md)
  data.text_source = "shapes_text"
  # images: shapes | folder:PATH | tfds:NAME | webdataset:GLOB (img2dataset tars)
  #         | parquet:GLOB | none
  data.image_text_source = "shapes"
  data.image_size = 64
  data.num_train_scenes = 20000
  data.num_eval_scenes = 500
  data.max_objects = 3          # shapes scenes hold 1..max_objects objects (1-4)
  data.object_sizes = "small,medium,large"  # shapes size classes scenes draw from
  data.text_image_ratio = 1.0   # text-only tokens per image-caption token
  data.caption_first_prob = 0.8
  data.seq_len = 256
  data.batch_size = 8          # global batch (sequences per step)
  data.max_images_per_seq = 8
  data.num_workers = 0
  data.shuffle_seed = 0
  data.tokenizer = ""          # path to a sentencepiece .model; "" = train one on the text corpus
  data.vocab_size = 512        # size of a tokenizer trained here
  data.latents = ""            # latent cache directory; "" = DIR/latents (built by the main job)
  data.tfds_dir = ""           # TFDS data_dir for tfds: sources and the built shapes; "" = DIR/tfds
  data.text_field = "text"     # record field holding the text of a tfds: text source
  data.num_text_docs = 20000   # documents in the generated shapes text corpus (train split)
  data.pack_max_misses = 0     # documents that may miss a full-ish batch before it closes; 0 = 2*batch+8
  data.seed = 0                # seed of the generated shapes images and text
  data.read_threads = 0        # Grain read threads per process (>0 only for slow/remote storage)
  # Stream sources (webdataset:, parquet:, text:, jsonl:) and the sharded latent job
  # (tfjax/data/latent_job.py, docs/real_data.md).
  data.image_field = "image"        # parquet: column of image bytes or {bytes, path} structs
  data.caption_field = "caption"    # parquet: caption column; webdataset: KEY.json key (no KEY.txt)
  data.resize_policy = "center_crop"  # center_crop (shorter side to image_size, crop) | squash
  data.min_image_size = 0           # skip images with a shorter side below this; 0 = image_size // 2
  data.max_aspect_ratio = 3.0       # skip images whose long side / short side exceeds this
  data.validation_percent = 5       # % of stream-source records (by key hash) in the validation split
  data.latents_dtype = "bfloat16"   # latent cache storage: bfloat16 | float32 (read as float32)
  data.latents_batch_size = 64      # images per VAE call in the latent job (padded to local devices)
  data.prepare_threads = 8          # latent job threads decoding and resizing images

  # ---- image editing (see tfjax/data/editing.py) --------------------------
  e = c.editing = ml_collections.ConfigDict()
  e.source = "none"           # none | shapes | folder:PATH: (input, instruction, output) examples
  e.dir = ""                  # where the shapes editing set is written; "" = DIR/editing
  e.latents = ""              # editing latent cache; "" = DIR/editing_latents
  e.num_train = 8000          # shapes editing train examples (the paper fine-tunes on 8k)
  e.num_eval = 200            # shapes editing examples in validation and in test
  e.seed = 0                  # seed of the generated shapes edits
  e.max_objects = 3           # shapes edit scenes hold 1..max_objects objects (an add stays within)
  e.object_sizes = "small,medium,large"  # size classes of edit scenes (and of added objects)
  e.pretrain_fraction = 0.0   # share of training documents from the pretraining sources; 0 = editing alone

  # ---- image autoencoder (see tfjax/vae) ---------------------------------
  v = c.vae = ml_collections.ConfigDict()
  v.path = ""                 # a tfjax or diffusers VAE directory; "" = train the config's VAE
  v.kind = "kl"               # kl | vq
  v.latent_channels = 8
  v.channels = (32, 64, 128, 128)  # one entry per resolution; len-1 downsamplings
  v.blocks_per_level = 1
  v.norm_groups = 8           # GroupNorm groups; must divide every entry of vae.channels
  v.mid_attention = True      # self-attention in the encoder/decoder mid blocks
  v.use_quant_conv = True     # 1x1 convs around the latent (SD has them, FLUX not)
  v.use_post_quant_conv = True
  v.dtype = "float32"         # compute dtype of the autoencoder
  v.codebook_size = 16384
  v.codebook_dim = 8          # VQ: encoder output is projected to this many dims for lookup
  v.commitment_beta = 0.25    # VQ: weight of the commitment loss
  v.train_steps = 2000
  v.batch_size = 32
  v.learning_rate = 1e-3
  v.warmup_steps = 100        # linear warm-up, then cosine decay to 10% over train_steps
  v.adam_b1 = 0.5             # Adam betas of the autoencoder (LDM's GAN-friendly values)
  v.adam_b2 = 0.9
  v.seed = 0
  v.image_size = 0            # training resolution; 0 = data.image_size
  v.train_crop = 0            # train on random crops of this side (cheaper steps); 0 = whole images
  v.num_train_images = 4096   # images drawn from data.image_text_source for VAE training
  v.num_val_images = 256      # validation images for PSNR/SSIM
  v.kl_weight = 1e-6
  v.sample_posterior = True   # decode a posterior sample in training (False: the mean; the
                              # unit-variance noise of an untrained encoder slows short runs)
  v.l1_weight = 1.0
  v.l2_weight = 0.0           # extra MSE term (helps PSNR on short CPU runs)
  v.perceptual_weight = 1.0   # used only when vae.perceptual_weights is set
  v.perceptual_weights = ""   # .safetensors of a VGG-style feature net (torchvision keys
                              # features.N.weight/bias, optional LPIPS lin{i}.model.1.weight);
                              # "" = perceptual loss off (logged)
  v.gan_weight = 0.5          # patch-GAN generator weight (paper); 0 = off
  v.gan_start_step = 50000    # discriminator and GAN loss start after this many steps
  v.disc_channels = 64        # patch-GAN discriminator base width
  v.disc_layers = 3
  v.log_every = 100
  v.scale_images = 512        # training images used to measure latent scale/shift

  # ---- training ----------------------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 250000
  t.seed = 0
  t.learning_rate = 3e-4
  t.end_learning_rate = 1.5e-5
  t.warmup_steps = 4000
  t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.grad_accum_steps = 1
  # Rows per device in one forward/backward; > 0 derives grad_accum_steps as
  # data.batch_size / (device_microbatch x data-parallel devices). 0 = off.
  t.device_microbatch = 0
  t.xla_gpu_flags = True      # GPU runs: set tfjax/train/xla_flags.py's XLA flags
  t.ema_decay = 0.0           # 0 = no EMA
  t.log_every = 50
  t.eval_every = 1000
  t.sample_every = 5000
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.best_metric = "val_loss"  # also kept: the best checkpoint by this metric ("" = off)
  t.init_from = ""            # checkpoint dir or export to start from (fine-tuning), or
                              # hf_llama:DIR, a Hugging Face Llama directory (config.json,
                              # *.safetensors, tokenizer.model): text-side weights from it
                              # (model.* must match its config.json, vocab_size >= its + 5
                              # special ids), image side fresh; DIR/tokenizer.model is the
                              # tokenizer unless data.tokenizer is set
  t.restart = False           # True: when every checkpoint of the workdir is damaged (moved to
                              # checkpoints_damaged/), start over from step 0 instead of
                              # stopping; metrics.jsonl keeps its history (a "restart" marker)
  t.peak_tflops = 0.0         # per-device peak for MFU; 0 = look up the device
  t.eval_batches = 4          # validation batches per evaluation
  t.synthetic_data = False    # random packed batches instead of tfjax.data (benchmarks, planning)

  # ---- mesh: logical axis -> mesh axes -----------------------------------
  me = c.mesh = ml_collections.ConfigDict()
  me.data = -1                # -1: all devices not used by the other axes
  me.fsdp = 1
  me.tensor = 1
  me.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("vocab", "tensor"),
      ("head_dim", None),
      ("layers", None),
      ("seq", None),
      ("patch", None),
      ("conv_in", None),
      ("conv_out", None),
  )

  # ---- chameleon baseline (tfjax/chameleon): VQ image tokens under the LM loss
  ch = c.chameleon = ml_collections.ConfigDict()
  ch.enabled = False          # train on VQ-VAE image tokens (LM loss only) instead of latents
  ch.text_vocab_size = 0      # image token id = this + VQ code; 0 = data.vocab_size
  ch.tokens = ""              # VQ token cache directory; "" = DIR/vq_tokens (data.dir)

  # ---- sampling / evaluation ---------------------------------------------
  s = c.sample = ml_collections.ConfigDict()
  s.num_prompts = 8
  s.temperature = 1.0
  s.top_k = 0
  s.top_p = 1.0
  s.max_text_tokens = 32
  s.clip_x0 = 6.0             # clip predicted clean latents to [-v, v] each denoising step (0 = off);
                              # the cosine schedule's last steps amplify eps errors ~600x without it
  s.x0_min_alpha_bar = 1e-3   # where alpha_bar is below this, the x0 estimate is 0 (the prior mean):
                              # at t=999 (alpha_bar 2e-9) it is noise (tfjax.generate.diffusion)
  return c


def paper_config(name: str, num_layers: int, dim: int, num_heads: int,
                 remat_policy: str = "nothing_saveable",
                 device_microbatch: int = 0) -> ml_collections.ConfigDict:
  """The paper's recipe at one of the Table 2 sizes.

  256x256 images through a VAE with 8x downsampling and 8 latent channels
  (32x32x8 latents), 2x2 latent patches (256 per image) through a linear
  layer, Llama 2's 32K vocabulary, sequences of 4096, AdamW (0.9, 0.95, 1e-8),
  lr 3e-4 with 4000 warm-up steps and cosine decay to 1.5e-5, weight decay
  0.1, clipping at 1.0, lambda = 5. `remat_policy` and `device_microbatch`
  are the per-size GPU settings measured fastest on one H100 (the size configs
  name them; benchmarks/RESULTS.md, Training); the LM head runs in chunks of
  1024 positions over the scored text only.
  """
  c = default_config()
  c.name = name
  c.model.update(num_layers=num_layers, dim=dim, num_heads=num_heads, num_kv_heads=num_heads,
                 vocab_size=32000, patch_size=2, latent_size=32, latent_channels=8,
                 attention_impl="auto", scan_layers=True, remat_policy=remat_policy,
                 lm_head_chunk=1024)
  c.data.update(image_size=256, seq_len=4096, batch_size=512, max_images_per_seq=16,
                vocab_size=32000)
  c.vae.channels = (128, 256, 512, 512)
  c.train.update(num_steps=250000, learning_rate=3e-4, end_learning_rate=1.5e-5,
                 warmup_steps=4000, weight_decay=0.1, grad_clip=1.0,
                 device_microbatch=device_microbatch)
  return c


def tiny_vae(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets `c.vae` to the tiny AutoencoderKL recipe for 64x64 shapes -> 8x8x8.

  Measured: 29.2 dB validation PSNR (SSIM 0.94) after 3000 steps of batch 16
  on 32x32 crops (a quarter of the cost of whole-image steps; evaluation uses
  whole 64x64 images). GAN and perceptual terms off (no weights file); an MSE
  term joins L1 because a short run is judged by PSNR; the decoder sees the
  posterior mean, not a sample, which speeds up the first steps. 2000 steps
  gave only 28.1 dB, too close to the 28 dB bar, hence 3000. Whole 64x64
  images without crops stalled around 21-23 dB after 1500 steps.

  Not cheaper (2026-12-03): level widths (16, 16, 32, 64) run a step in half
  the time (0.17 vs 0.33 s) and reach 29.0 dB in 2000 steps on this set
  (30.3 in 3000; 27.9 in 1500), but as the main job's VAE (2000 steps,
  30.1 vs 32.45 dB on its one-object scenes) the tiny model's report fell to
  72% of 32 images correct from 97%. 16x16 crops: 19.0 dB on whole images.
  """
  c.vae.update(kind="kl", latent_channels=8, channels=(16, 32, 64, 64), blocks_per_level=1,
               norm_groups=4, mid_attention=True, train_steps=3000, batch_size=16,
               train_crop=32, learning_rate=2e-3, warmup_steps=50, adam_b1=0.9, adam_b2=0.99,
               num_train_images=2048, num_val_images=128, l2_weight=1.0,
               sample_posterior=False, gan_weight=0.0, perceptual_weights="", log_every=50,
               scale_images=256)
  return c


def mlp_dim(model: ml_collections.ConfigDict) -> int:
  if model.mlp_dim:
    return model.mlp_dim
  hidden = int(2 * 4 * model.dim / 3)
  return 256 * math.ceil(hidden / 256) if model.dim >= 256 else 8 * math.ceil(hidden / 8)


def patches_per_image(model: ml_collections.ConfigDict) -> int:
  return (model.latent_size // model.patch_size) ** 2


class ConfigError(ValueError):
  """A config that cannot work; the message names the key to change."""


class UnknownConfigKey(ConfigError, KeyError):
  """An override names a key the config does not have."""


def _parse_value(text: str, old: Any) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  if isinstance(old, str) and not isinstance(value, str):
    return text  # a string key keeps "123" as "123"
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    where: str = "overrides") -> ml_collections.ConfigDict:
  """Applies "section.key=value" strings (values as Python literals) in place.

  For overrides that do not come through config_flags' --config.KEY=VALUE:
  sweep files (tfjax.experiments.runner) and tfjax-eval --override.
  """
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"{where}: {item!r} is not KEY=VALUE (section.key=value)")
    key, text = item.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = config
    for p in parents:
      if p not in node:
        raise UnknownConfigKey(f"{where}: config key {key!r} does not exist (no section {p!r})")
      node = node[p]
    if leaf not in node:
      raise UnknownConfigKey(f"{where}: config key {key!r} does not exist")
    node[leaf] = _parse_value(text.strip(), node[leaf])
  return config


def _require(cond: bool, key: str, why: str) -> None:
  if not cond:
    raise ConfigError(f"config key {key}: {why}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  m = c.model
  _require(m.dim % m.num_heads == 0, "model.num_heads",
           f"{m.num_heads} heads do not divide model.dim={m.dim}")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"{m.num_kv_heads} must divide model.num_heads={m.num_heads}")
  _require(m.patch_size in (1, 2, 4, 8, 16), "model.patch_size",
           f"{m.patch_size} is not one of 1, 2, 4, 8, 16")
  _require(m.latent_size % m.patch_size == 0, "model.patch_size",
           f"patch size {m.patch_size} does not divide the latent grid "
           f"model.latent_size={m.latent_size}")
  _require(m.patch_type in ("linear", "unet"), "model.patch_type", f"unknown {m.patch_type!r}")
  _require(m.attention_impl in ("xla", "pallas", "auto"), "model.attention_impl",
           f"unknown {m.attention_impl!r}")
  _require(m.image_attention in ("bidirectional", "causal"), "model.image_attention",
           f"unknown {m.image_attention!r}")
  if m.patch_type == "unet":
    levels = len(m.unet_channels)
    _require(2 ** (levels - 1) == m.patch_size, "model.unet_channels",
             f"{levels} levels downsample by {2 ** (levels - 1)}, which must equal "
             f"model.patch_size={m.patch_size}")
  vae_downsample = 2 ** (len(c.vae.channels) - 1)
  if not c.vae.path:
    _require(c.data.image_size // vae_downsample == m.latent_size, "model.latent_size",
             f"{m.latent_size} != data.image_size / VAE downsampling = "
             f"{c.data.image_size} / {vae_downsample}")
    _require(c.vae.latent_channels == m.latent_channels, "model.latent_channels",
             f"{m.latent_channels} != vae.latent_channels={c.vae.latent_channels}")
  image_len = patches_per_image(m) + 2  # BOI + patches + EOI
  _require(image_len <= c.data.seq_len, "data.seq_len",
           f"an image takes {image_len} positions (BOI + {patches_per_image(m)} patches + EOI) "
           f"but sequences hold only {c.data.seq_len}")
  _require(c.data.image_size % 8 == 0, "data.image_size", "must be a multiple of 8")
  _require(c.data.batch_size % c.train.grad_accum_steps == 0, "train.grad_accum_steps",
           f"must divide data.batch_size={c.data.batch_size}")
  _require(c.diffusion.objective in ("ddpm", "flow"), "diffusion.objective",
           f"unknown {c.diffusion.objective!r}")
  _require(c.diffusion.sampler in ("ddpm", "ddim"), "diffusion.sampler",
           f"unknown {c.diffusion.sampler!r}")
  _require(0.0 <= c.data.caption_first_prob <= 1.0, "data.caption_first_prob", "must be in [0, 1]")
  for section in ("data", "editing"):  # both build shapes scenes (SceneOptions)
    if section in c:
      problem = scene_limits_error(*read_scene_limits(c[section]), section)
      if problem:
        raise ConfigError(problem)
  _require(c.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
  _require(c.model.vocab_size > EOI_ID, "model.vocab_size", "too small for the special tokens")
  return c
