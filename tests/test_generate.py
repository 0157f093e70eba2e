"""Generation equivalences on a tiny random-init model (float32 on CPU).

KV-cache decoding vs full recomputation, the prefix-cached denoising step vs
the full forward pass, CFG at scale 1 vs the conditional prediction, image
guidance (InstructPix2Pix) vs its formula, and the mode-switching decoder's
cached and uncached paths.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from tfjax.config import BOI_ID, BOS_ID, EOI_ID
from tfjax.generate import context as context_lib
from tfjax.generate import diffusion as diff
from tfjax.generate import lm, mixed
from tfjax.generate.sampling import SamplingParams, filter_logits, sample_tokens
from tfjax.model import init_params

LATENT = (8, 8, 8)


@pytest.fixture(scope="module")
def setup():
  config = get_config()
  m = config.model
  m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size = 64, 2, 4, 2, 64
  params = init_params(m, jax.random.key(0))
  gen = mixed.Generator(config, params)
  return config, params, gen


def _left_pad(ctx, length):
  """The same context left-padded to `length` slots (one shape: one compile)."""
  pad = length - ctx.length
  p = lambda a: np.pad(a, ((0, 0), (pad, 0)))
  return context_lib.Context(p(ctx.tokens), p(ctx.segment_ids), p(ctx.image_ids),
                             p(ctx.positions), ctx.latents, ctx.image_starts + pad * ctx.image_valid,
                             ctx.image_valid, ctx.patch_size)


def _jnp(ctx):
  return {k: jnp.asarray(v) for k, v in ctx.model_inputs().items()}


def test_kv_cache_decoding_matches_full_recomputation(setup):
  config, params, gen = setup
  steps = 10
  image = np.random.default_rng(0).normal(size=LATENT).astype(np.float32)
  rows = [[("tokens", [BOS_ID, 7, 8, 9, 10, 11])],
          [("tokens", [BOS_ID, BOI_ID]), ("image", image), ("tokens", [EOI_ID, 12])]]
  ctx = context_lib.from_rows(rows, LATENT, 2)
  cache = lm.empty_cache(config.model, 2, 64)
  logits, cache = lm.prefill(gen.forward, params, ctx, cache)
  decode = lm.make_decode(gen.model, config.model, SamplingParams(temperature=0.0), steps)
  res = lm.run_decode(decode, params, cache, logits, ctx, np.array([True, True]),
                      jax.random.key(1), steps)
  assert res.tokens.shape == (2, steps) and res.active.all()
  # Reference: re-run the whole sequence for every new token, no cache.
  ref = context_lib.from_rows(rows, LATENT, 2)
  fixed = ref.length + steps
  expected = []
  for _ in range(steps):
    out = gen.forward(params, _jnp(_left_pad(ref, fixed)))
    tok = np.asarray(jnp.argmax(out.logits[:, -1], axis=-1), np.int32)
    expected.append(tok)
    ref.append_tokens(tok[:, None], np.array([True, True]))
  np.testing.assert_array_equal(res.tokens, np.stack(expected, 1))
  # Each row alone (no left padding) decodes the same tokens as in the batch.
  solo = context_lib.from_rows(rows[:1], LATENT, 2)
  l1, c1 = lm.prefill(gen.forward, params, solo, lm.empty_cache(config.model, 1, 64))
  r1 = lm.run_decode(decode, params, c1, l1, solo, np.array([True]), jax.random.key(1), steps)
  np.testing.assert_array_equal(r1.tokens[0], res.tokens[0])


def test_stop_tokens_end_rows_and_leave_padding(setup):
  config, params, gen = setup
  ctx = context_lib.from_rows([[("tokens", [BOS_ID, 5])], [("tokens", [BOS_ID, 6, 7])]],
                              LATENT, 2)
  logits, cache = lm.prefill(gen.forward, params, ctx, lm.empty_cache(config.model, 2, 32))
  greedy = SamplingParams(temperature=0.0)
  free = lm.run_decode(lm.make_decode(gen.model, config.model, greedy, 6), params, cache,
                       logits, context_lib.from_rows([[("tokens", [BOS_ID, 5])],
                                                      [("tokens", [BOS_ID, 6, 7])]], LATENT, 2),
                       np.array([True, True]), jax.random.key(0), 6)
  stop = int(free.tokens[0, 2])  # row 0's third token becomes a stop token
  dec = lm.make_decode(gen.model, config.model, greedy, 6, stop_ids=(stop,))
  res = lm.run_decode(dec, params, cache, logits, ctx, np.array([True, True]),
                      jax.random.key(0), 6)
  first = int(np.argmax(free.tokens[0] == stop))
  assert res.stop_token[0] == stop
  assert res.active[0, :first + 1].all() and not res.active[0, first + 1:].any()
  # Padding slots after the stop are invisible: the next real slot's position follows on.
  assert ctx.next_position()[0] == 2 + first + 1


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  neg = jnp.finfo(jnp.float32).min
  assert (filter_logits(logits, top_k=2)[0, 2:] == neg).all()
  kept = filter_logits(logits, top_p=0.7)[0] > neg
  np.testing.assert_array_equal(kept, [True, True, False, False])  # 0.5 < 0.7 <= 0.8
  assert (filter_logits(logits, top_p=0.4)[0] > neg).sum() == 1
  toks = jax.vmap(lambda k: sample_tokens(k, logits, SamplingParams(1.0, top_k=2)))(
      jax.random.split(jax.random.key(0), 200))
  assert set(np.unique(toks)) <= {0, 1} and len(np.unique(toks)) == 2
  assert sample_tokens(jax.random.key(0), logits, SamplingParams(temperature=0.0))[0] == 0
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)


@pytest.fixture(scope="module")
def prefix(setup):
  """A batch of two captions of different lengths ending in BOI, with its cache."""
  config, params, gen = setup
  image = np.random.default_rng(1).normal(size=LATENT).astype(np.float32)
  rows = [[("tokens", [BOS_ID, 9, 10, 11, BOI_ID])],
          [("tokens", [BOS_ID, 12, BOI_ID]), ("image", image), ("tokens", [EOI_ID, 13, BOI_ID])]]
  ctx = context_lib.from_rows(rows, LATENT, 2)
  _, cache = lm.prefill(gen.forward, params, ctx, lm.empty_cache(config.model, 2, 64))
  x_t = jax.random.normal(jax.random.key(2), (2, *LATENT))
  args = (jnp.asarray(ctx.next_position()), jnp.asarray(ctx.num_images() + 1),
          jnp.ones((2,), bool))
  return ctx, cache, x_t, args


def test_cached_denoising_step_matches_full_forward(setup, prefix):
  config, params, gen = setup
  ctx, cache, x_t, args = prefix
  t = jnp.asarray([700.0, 250.0])
  cached = diff.make_denoiser(gen.model, gen.num_patches, use_cache=True)
  full = diff.make_denoiser(gen.model, gen.num_patches, use_cache=False)
  a = jax.jit(cached)(params, cache, x_t, t, *args)
  b = jax.jit(full)(params, _jnp(ctx), x_t, t, *args)
  assert a.shape == (2, *LATENT)
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  # Guided (cond + uncond batched) with and without the cache agree too.
  uncond_cache = diff.uncond_prefix_cache(gen.forward, params, config.model,
                                          lm.empty_cache(config.model, 2, 64), ctx.length)
  ga = jax.jit(diff.guided_prediction, static_argnums=(0,))(
      cached, params, cache, uncond_cache, x_t, t, *args, 4.0)
  gb = jax.jit(diff.guided_prediction, static_argnums=(0,))(
      full, params, _jnp(ctx), _jnp(diff.uncond_context(ctx)), x_t, t, *args, 4.0)
  np.testing.assert_allclose(ga, gb, atol=1e-4, rtol=1e-4)


def test_cfg_scale_one_equals_conditional(setup, prefix):
  config, params, gen = setup
  ctx, cache, x_t, args = prefix
  t = jnp.asarray([500.0, 500.0])
  cached = diff.make_denoiser(gen.model, gen.num_patches, use_cache=True)
  uncond_cache = diff.uncond_prefix_cache(gen.forward, params, config.model,
                                          lm.empty_cache(config.model, 2, 64), ctx.length)
  guided_fn = jax.jit(diff.guided_prediction, static_argnums=(0,))
  guided = guided_fn(cached, params, cache, uncond_cache, x_t, t, *args, 1.0)
  cond = jax.jit(cached)(params, cache, x_t, t, *args)
  np.testing.assert_allclose(guided, cond, atol=1e-5, rtol=1e-5)
  # The unconditional half is the caption-dropped context, as training drops
  # captions (tfjax.losses.drop_captions): a document that starts at BOI.
  solo = context_lib.from_rows([[("tokens", [BOI_ID])]] * 2, LATENT, 2)
  alone = jax.jit(diff.make_denoiser(gen.model, gen.num_patches, use_cache=False))(
      params, _jnp(solo), x_t, t, jnp.asarray([1, 1]), jnp.asarray([1, 1]), jnp.ones(2, bool))
  at3 = guided_fn(cached, params, cache, uncond_cache, x_t, t, *args, 3.0)
  np.testing.assert_allclose(at3, alone + 3.0 * (cond - alone), atol=1e-4, rtol=1e-4)


def test_mixed_decoder_switches_modes_cached_equals_uncached(setup):
  config, params, gen = setup
  # Make greedy decoding pick BOI or token 5 only (output columns +v / -v), so
  # rows switch to diffusion within a few tokens.
  p = dict(params)
  v = p["output"][:, 6]
  p["output"] = jnp.zeros_like(p["output"]).at[:, BOI_ID].set(v).at[:, 5].set(-v)
  g = mixed.Generator(config, p)  # same architecture: reuses gen's compilations
  image = mixed.Latents(np.random.default_rng(3).normal(size=LATENT).astype(np.float32))
  prompts = [[image], [image, image]]
  dp = diff.DiffusionParams(num_steps=3, sampler="ddim", cfg_scale=2.0)
  kw = dict(mode="auto", sampling=SamplingParams(temperature=0.0), diffusion_params=dp,
            max_text_tokens=8, max_images=2)
  outs = g.generate(prompts, rng=jax.random.key(0), **kw)
  ctx = g.last_context
  assert any(o.images for o in outs)
  for r, o in enumerate(outs):
    assert o.tokens.count(BOI_ID) == len(o.images) == o.tokens.count(EOI_ID)
    assert all(im.shape == LATENT and np.isfinite(im).all() for im in o.images)
    # Generated images sit in the context as BOI, n patch slots, EOI.
    real = ctx.segment_ids[r] != 0
    toks, ids = ctx.tokens[r][real], ctx.image_ids[r][real]
    for k in range(1, ctx.num_images()[r] + 1):
      where = np.nonzero(ids == k)[0]
      assert len(where) == g.num_patches and toks[where[0] - 1] == BOI_ID
      assert toks[where[-1] + 1] == EOI_ID
  again = g.generate(prompts, rng=jax.random.key(0), use_cache=False, **kw)
  for a, b in zip(outs, again):
    assert a.tokens == b.tokens
    for x, y in zip(a.images, b.images):
      # A random model's DDIM x0 estimates are large (~1e4): compare relatively.
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3 * np.abs(x).max())


def test_prompt_errors(setup):
  # (Text-to-image and captioning with a real tokenizer and VAE run in test_export.py.)
  _, _, gen = setup
  with pytest.raises(ValueError, match="tokenizer"):
    gen.text_to_image(["a red circle"], jax.random.key(0))
  with pytest.raises(ValueError, match="VAE"):
    gen.image_to_text([np.zeros((64, 64, 3), np.uint8)], jax.random.key(0))
  with pytest.raises(ValueError, match="mode"):
    gen.generate([[mixed.Latents(np.zeros(LATENT, np.float32))]], rng=jax.random.key(0),
                 mode="video")


def test_strength_keeps_the_schedule_tail_and_refuses_bad_values():
  full = diff.DiffusionParams(num_steps=10).timesteps()
  half = diff.DiffusionParams(num_steps=10, strength=0.5).timesteps()
  assert half.max() <= 500 and len(half) < len(full)
  np.testing.assert_array_equal(half, full[len(full) - len(half):])
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="diffusion.strength"):
      diff.DiffusionParams(strength=bad)
  assert list(diff.DiffusionParams(num_steps=10, strength=0.05).timesteps()) == [0]


def test_strength_starts_from_the_init_latents(setup):
  """SDEdit: at a strength that leaves only t <= 1, the drawn image is the init
  image (whatever the model); at strength 1 the init is not used."""
  _, _, gen = setup
  rng = np.random.default_rng(0)
  prompt = [[mixed.Latents(rng.normal(size=LATENT).astype(np.float32))]] * 2
  init = rng.normal(size=(2, *LATENT)).astype(np.float32)
  low = diff.DiffusionParams(num_steps=1000, sampler="ddim", cfg_scale=0.0, strength=0.001)
  assert list(low.timesteps()) == [1, 0]
  outs = gen.generate(prompt, rng=jax.random.key(0), mode="image", diffusion_params=low,
                      init_latents=init)
  np.testing.assert_allclose(np.stack([o.images[0] for o in outs]), init, atol=0.05)
  full = diff.DiffusionParams(num_steps=3, sampler="ddim", cfg_scale=0.0)
  kw = dict(rng=jax.random.key(0), mode="image", diffusion_params=full)
  with_init = gen.generate(prompt, init_latents=init, **kw)
  without = gen.generate(prompt, **kw)
  for a, b in zip(with_init, without):
    np.testing.assert_array_equal(a.images[0], b.images[0])
  with pytest.raises(ValueError, match="init_latents"):
    gen.generate(prompt, rng=jax.random.key(0), mode="image", diffusion_params=low)
  with pytest.raises(ValueError, match='mode="image"'):
    gen.generate(prompt, rng=jax.random.key(0), mode="auto", diffusion_params=low,
                 init_latents=init)


def test_image_guidance_adds_the_text_free_branch(setup, prefix):
  """InstructPix2Pix guidance: one call over cond / text-free / uncond rows is
  eq. 3 of the three predictions, cached and uncached alike; equal scales give
  the usual guidance."""
  config, params, gen = setup
  image = np.random.default_rng(4).normal(size=LATENT).astype(np.float32)
  full = [("tokens", [BOS_ID, BOI_ID]), ("image", image), ("tokens", [EOI_ID, 9, 10, 11, BOI_ID])]
  free = [("tokens", [BOS_ID, BOI_ID]), ("image", image), ("tokens", [EOI_ID, BOI_ID])]
  ctx = context_lib.from_rows([full] * 2, LATENT, 2)
  img_ctx = context_lib.from_rows([free] * 2, LATENT, 2, min_length=ctx.length)
  # BOS BOI, 16 patches, EOI BOI; left-padded to the full prompt's length.
  assert img_ctx.length == ctx.length and list(img_ctx.next_position()) == [20, 20]
  empty = lambda: lm.empty_cache(config.model, 2, 64)
  _, cache = lm.prefill(gen.forward, params, ctx, empty())
  _, img_cache = lm.prefill(gen.forward, params, img_ctx, empty())
  unc_cache = diff.uncond_prefix_cache(gen.forward, params, config.model, empty(), ctx.length)
  x_t = jax.random.normal(jax.random.key(5), (2, *LATENT))
  t = jnp.asarray([600.0, 300.0])
  act = jnp.ones((2,), bool)
  pos = lambda c: (jnp.asarray(c.next_position()), jnp.asarray(c.num_images() + 1))
  predict = diff.make_denoiser(gen.model, gen.num_patches, use_cache=True)
  cached = jax.jit(predict)
  cond = cached(params, cache, x_t, t, *pos(ctx), act)
  free_pred = cached(params, img_cache, x_t, t, *pos(img_ctx), act)
  unc = cached(params, unc_cache, x_t, t, jnp.ones(2, jnp.int32), jnp.ones(2, jnp.int32), act)
  assert float(jnp.abs(cond - free_pred).mean()) > 1e-3  # the text matters
  want = unc + 1.5 * (free_pred - unc) + 4.0 * (cond - free_pred)
  guided = jax.jit(diff.guided_from_combined, static_argnums=(0,))
  got = guided(predict, params, diff.combine_prefixes(cache, img_cache, unc_cache), x_t, t,
               *pos(ctx), act, 4.0, pos(img_ctx), 1.5)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  uncached = diff.make_denoiser(gen.model, gen.num_patches, use_cache=False)
  rows = diff.combine_prefixes(_jnp(ctx), _jnp(img_ctx), _jnp(diff.uncond_context(ctx)))
  got_full = guided(uncached, params, rows, x_t, t, *pos(ctx), act, 4.0, pos(img_ctx), 1.5)
  np.testing.assert_allclose(got_full, want, atol=1e-4, rtol=1e-4)
  same = guided(predict, params, diff.combine_prefixes(cache, img_cache, unc_cache), x_t, t,
                *pos(ctx), act, 4.0, pos(img_ctx), 4.0)
  np.testing.assert_allclose(same, unc + 4.0 * (cond - unc), atol=1e-4, rtol=1e-4)


def test_image_guidance_in_generate(setup):
  """A text-free prompt is its own text-free branch: image scale s draws what
  plain guidance at s draws, cached or not; bad settings are refused."""
  _, _, gen = setup
  rng = np.random.default_rng(6)
  prompt = [[mixed.Latents(rng.normal(size=LATENT).astype(np.float32))]] * 2
  ddim = lambda **kw: diff.DiffusionParams(num_steps=3, sampler="ddim", **kw)
  for use_cache in (True, False):
    kw = dict(rng=jax.random.key(0), mode="image", use_cache=use_cache)
    plain = gen.generate(prompt, diffusion_params=ddim(cfg_scale=2.5), **kw)
    split = gen.generate(prompt, diffusion_params=ddim(cfg_scale=7.0, image_cfg_scale=2.5), **kw)
    for a, b in zip(plain, split):
      np.testing.assert_allclose(a.images[0], b.images[0], atol=1e-3, rtol=1e-3)
  with pytest.raises(ValueError, match='mode="image"'):
    gen.generate(prompt, rng=jax.random.key(0), mode="auto",
                 diffusion_params=ddim(cfg_scale=3.0, image_cfg_scale=1.5))
  for bad in (dict(cfg_scale=0.0, image_cfg_scale=1.5), dict(image_cfg_scale=-1.0)):
    with pytest.raises(ValueError, match="diffusion.image_cfg_scale"):
      ddim(**bad)


def test_clip_prediction_bounds_x0_and_keeps_consistent_eps():
  from tfjax import diffusion as dlib
  ab = dlib.cosine_alphas_cumprod(1000)
  x = jax.random.normal(jax.random.key(0), (2, *LATENT))
  eps = x * 0.9  # an eps prediction slightly off at t = 999: x0 estimate ~ 0.1 x / 5e-5
  t = jnp.asarray(999)
  assert float(jnp.abs(dlib.predict_x0(x, eps, ab[999])).max()) > 100
  clipped = diff.clip_prediction(x, eps, t, ab, 6.0)
  x0 = dlib.predict_x0(x, clipped, ab[999])
  assert float(jnp.abs(x0).max()) <= 6.0 + 1e-3
  # Within the limit nothing changes.
  small = diff.clip_prediction(x, eps, jnp.asarray(10), ab, 1e6)
  np.testing.assert_allclose(small, eps, rtol=1e-4, atol=1e-4)
  # Where alpha_bar is below the floor the x0 estimate is the prior mean: 0.
  prior = diff.clip_prediction(x, eps, t, ab, 6.0, min_alpha_bar=1e-3)
  np.testing.assert_allclose(dlib.predict_x0(x, prior, ab[999]), 0.0, atol=1e-3)
  above = diff.clip_prediction(x, eps, jnp.asarray(10), ab, 1e6, min_alpha_bar=1e-3)
  np.testing.assert_allclose(above, eps, rtol=1e-4, atol=1e-4)
