"""The Chameleon baseline at tiny size on CPU: VQ token cache, batch conversion,
training through the real trainer and data pipeline, generation and captioning."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax.chameleon import batches, tokens
from tfjax.jobs import chameleon as main
from tfjax.jobs import stages
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, ConfigError, default_config, validate

CODEBOOK = 64


def tiny_config(root):
  c = default_config()
  c.chameleon.enabled = True
  d = c.data
  d.dir = root
  d.image_size, d.num_train_scenes, d.num_eval_scenes, d.num_text_docs = 32, 200, 24, 300
  d.vocab_size, d.seq_len, d.batch_size, d.max_images_per_seq = 400, 96, 4, 4
  v = c.vae
  v.kind, v.channels, v.norm_groups, v.latent_channels = "vq", (8, 8, 8, 8), 4, 4
  v.mid_attention, v.codebook_size, v.codebook_dim = False, CODEBOOK, 4
  m = c.model
  m.vocab_size = d.vocab_size + CODEBOOK
  m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 1, 2, 2, 64
  m.latent_size, m.latent_channels, m.patch_size = 4, 4, 1
  m.dtype, m.attention_impl, m.remat_policy, m.time_embed_dim = "float32", "xla", "none", 16
  m.qk_norm, m.norm_placement = True, "chameleon"
  t = c.train
  t.num_steps, t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every = 3, 1, 1, 0, 0
  t.eval_batches, t.learning_rate = 1, 3e-3
  c.diffusion.loss_weight, c.diffusion.cfg_scale = 0.0, 2.0
  c.sample.max_text_tokens = 6
  return validate(c)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Built data, an (untrained) VQ-VAE on disk and its token cache."""
  from tfjax.data.build import build_all
  from tfjax.vae import io
  from tfjax.vae.train import vae_meta
  import tfjax.vae
  work = str(tmp_path_factory.mktemp("chameleon"))
  config = tiny_config(os.path.join(work, "data"))
  build_all(config, config.data.dir)
  meta = vae_meta(config)
  module = io.build_module(meta)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  vq_dir = io.save(os.path.join(work, "vq"), {**meta, "scale": 1.0, "shift": 0.0}, params)
  vq = tfjax.vae.load(vq_dir)
  config = main.with_assets(config, vq_dir)
  tokens.build_token_cache(config, vq, config.data.dir)
  return work, config, vq


def test_token_cache_holds_codes(setup):
  from tfjax.data import latents
  _, config, vq = setup
  meta = latents.read_metadata(tokens.token_dir(config))
  assert meta["scale"] == 1.0 and meta["shift"] == 0.0 and meta["latent_shape"] == [4, 4, 4]
  assert set(meta["splits"]) == {"train", "validation"}
  with pytest.raises(ValueError, match="not VQ code ids"):
    tokens.codes_from_latents(np.full((4, 4, 4), 0.5, np.float32), CODEBOOK)


def test_batch_conversion_invariants(setup):
  from tfjax.data import make_train_iterator
  _, config, _ = setup
  raw = next(make_train_iterator(config, config.data.dir, process_index=0, process_count=1))
  off = tokens.image_token_offset(config)
  out = batches.to_chameleon_batch(raw, off, CODEBOOK)
  assert set(out) == set(raw) and all(out[k].shape == raw[k].shape for k in raw)
  assert not out["image_valid"].any() and not out["image_ids"].any()
  n_img = int(raw["image_valid"].sum())
  assert n_img > 0
  is_img = out["tokens"] >= off
  assert is_img.sum() == n_img * 16 and (out["tokens"] < off + CODEBOOK).all()
  for r, s in zip(*np.nonzero(raw["image_valid"])):
    st = raw["image_starts"][r, s]
    codes = tokens.codes_from_latents(raw["image_latents"][r, s]).reshape(-1)
    np.testing.assert_array_equal(out["tokens"][r, st:st + 16], off + codes)
    assert out["tokens"][r, st - 1] == BOI_ID and out["tokens"][r, st + 16] == EOI_ID
    # BOI predicts the first code, each code the next, the last code EOI.
    assert out["text_loss_mask"][r, st - 1:st + 16].all()
    np.testing.assert_array_equal(out["text_targets"][r, st - 1:st + 15], off + codes)
    assert out["text_targets"][r, st + 15] == EOI_ID
  # Text positions are unchanged; padding and EOS are never scored.
  text = ~is_img & (out["segment_ids"] > 0)
  np.testing.assert_array_equal(out["tokens"][text], raw["tokens"][text])
  assert not out["text_loss_mask"][out["segment_ids"] == 0].any()
  assert not out["text_loss_mask"][out["tokens"] == EOS_ID].any()
  assert (out["tokens"][out["segment_ids"] > 0][:1] == BOS_ID).all()


def test_config_checks_name_keys(setup):
  _, config, _ = setup
  bad = config.copy_and_resolve_references()
  bad.model.vocab_size = 420
  with pytest.raises(ConfigError, match="model.vocab_size"):
    main.check_config(bad)
  bad = config.copy_and_resolve_references()
  bad.model.patch_size = 2
  with pytest.raises(ConfigError, match="model.patch_size"):
    main.check_config(bad)


def test_norm_placement():
  """chameleon placement: x + norm(attn(x)), x + norm(mlp(x)), same parameters."""
  from tfjax.model.layers import RMSNorm, SwiGLU
  from tfjax.model.transformer import Attention, Block
  c = tiny_config("/nonexistent").model
  x = jax.random.normal(jax.random.key(1), (1, 6, c.dim))
  ids = jnp.ones((1, 6), jnp.int32)
  ctx = (jnp.arange(6)[None], ids, jnp.zeros_like(ids), None, None, None)
  outs, params = {}, None
  for placement in ("pre", "chameleon"):
    c.norm_placement = placement
    params = params or Block(c).init(jax.random.key(0), x, None, ctx)["params"]
    outs[placement] = Block(c).apply({"params": params}, x, None, ctx)[0]
  p = params
  norm = lambda name, v: RMSNorm(c.norm_eps, jnp.float32).apply({"params": p[name]}, v)
  h = x + norm("attention_norm", Attention(c).apply(
      {"params": p["attention"]}, x, ctx[0], ids, ctx[2], None, None)[0])
  want = h + norm("mlp_norm", SwiGLU(64, jnp.float32).apply({"params": p["mlp"]}, h))
  np.testing.assert_allclose(outs["chameleon"], want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs["pre"], outs["chameleon"])
  c.norm_placement = "post"
  with pytest.raises(ValueError, match="model.norm_placement"):
    Block(c).init(jax.random.key(0), x, None, ctx)


def test_trains_generates_and_captions(setup):
  from tfjax.chameleon.generate import ChameleonGenerator
  from tfjax.data import shapes, sources
  from tfjax.data.tokenizer import Tokenizer
  from tfjax.eval import suite
  work, config, vq = setup
  run_dir = os.path.join(work, "run")
  result = stages.train_model(config, run_dir, codebook_size=vq.codebook_size,
                             devices=jax.devices()[:1])
  assert result.step == 3
  m = result.last_metrics
  assert np.isfinite(m["loss"]) and m["loss_diffusion"] == 0.0 and m["num_images"] == 0.0
  # LM loss over text and image tokens starts near log(vocab).
  assert 0.5 * np.log(config.model.vocab_size) < m["loss_lm"] < 2 * np.log(config.model.vocab_size)

  tok = Tokenizer.load(sources.tokenizer_path(config, config.data.dir))
  gen = ChameleonGenerator(config, result.state.params, tok, vq)
  _, _, captions = shapes.generate_split("test", 3, 32, seed=0)
  codes = gen.sample_codes(captions, jax.random.key(1))
  assert codes.shape == (3, 4, 4) and (codes >= 0).all() and (codes < CODEBOOK).all()
  np.testing.assert_array_equal(gen.text_to_image(captions, jax.random.key(1)), codes)
  images = gen.decode_latents(codes)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  # The project's evaluation suite runs on the Chameleon generator unchanged.
  scores = suite.run(gen, "all", num_samples=3, batch_size=3)
  assert 0.0 <= scores["shapes_accuracy"] <= 1.0 and scores["caption_cider"] >= 0.0
  assert scores["perplexity"] > 1.0
  assert all(isinstance(e["generated"], str)
             for e in scores["details"]["captioning"]["examples"])
