"""The config schema: every key, its default and what it means.

Config files under `configs/` start from `default_config()` and override what
their experiment changes; the command line overrides any key with
`--config.section.key=value`.
"""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Every key of a tfjax config at its default; each line says what the key means."""
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
  # Layers per iteration of that scan; num_layers (or more) unrolls it fully (same
  # parameter layout), which spares the CPU the zero-filled per-layer buffers
  # of the backward pass (configs/tiny.py); 1 = a loop (compile time).
  m.scan_unroll = 1
  # What the backward pass keeps (tfjax/model/transformer.py REMAT_POLICIES):
  # none | nothing_saveable | save_all | save_all_names | save_attention | save_qkv_attention
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
  d.strength = 1.0            # < 1: start from an init image noised to this fraction of the
                              # schedule (img2img / SDEdit; editing starts from its input image)
  d.image_cfg_scale = 0.0     # > 0: guide on the prompt's images by this scale and on its text by
                              # cfg_scale (InstructPix2Pix; train with editing.instruction_dropout)

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
  e.instruction_dropout = 0.0  # share of examples shown without their instruction (input image,
                               # then output): trains what diffusion.image_cfg_scale guides from

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
  # CPU runs (no CUDA or TPU plugin installed, or JAX_PLATFORMS=cpu): YNNPACK
  # fusions off, a faster CPU step (tfjax/train/xla_flags.py).
  t.xla_cpu_flags = True
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
