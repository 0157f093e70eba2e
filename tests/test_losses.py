"""The Transfusion objective: masking, counts, caption dropout, and that it trains."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfjax import config as config_lib
from tfjax.batch import Batch
from tfjax.config import BOI_ID
from tfjax.losses import drop_captions, transfusion_loss
from tfjax.model import Transfusion, init_params
from tfjax.train.synthetic import synthetic_batch


def tiny_config():
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=48, dim=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      dtype="float32", attention_impl="xla", remat_policy="none",
                      latent_size=4, latent_channels=4, patch_size=2, time_embed_dim=16))
  c.data.update(seq_len=64, batch_size=2, max_images_per_seq=3)
  c.diffusion.caption_dropout = 0.0
  return c


def make_batch(c, seed=0):
  arrays = synthetic_batch(c, 0, seed, whole_documents=True)  # padding at rows' ends
  return Batch.from_dict({k: jnp.asarray(v) for k, v in arrays.items()})


@pytest.fixture(scope="module")
def setup():
  c = tiny_config()
  params = init_params(c.model, jax.random.key(0))
  model = Transfusion(c.model)
  loss_fn = jax.jit(lambda p, b, r: transfusion_loss(p, b, r, model=model, config=c))
  return c, params, loss_fn, make_batch(c)


def test_metrics_count_scored_tokens_and_images(setup):
  c, params, loss_fn, b = setup
  loss, m = loss_fn(params, b, jax.random.key(1))
  assert float(m["num_text_tokens"]) == float(np.sum(np.asarray(b.text_loss_mask)))
  assert float(m["num_images"]) == float(np.sum(np.asarray(b.image_valid)))
  np.testing.assert_allclose(float(loss), float(m["loss_lm"]) + 5.0 * float(m["loss_diffusion"]),
                             rtol=1e-6)


def test_no_lm_loss_where_input_is_boi_or_padding(setup):
  c, params, loss_fn, b = setup
  tokens = np.asarray(b.tokens)
  assert not np.asarray(b.text_loss_mask)[tokens == BOI_ID].any()
  assert not np.asarray(b.text_loss_mask)[np.asarray(b.segment_ids) == 0].any()
  rng = jax.random.key(2)
  base = loss_fn(params, b, rng)[1]["loss_lm"]
  targets = np.asarray(b.text_targets).copy()
  targets[tokens == BOI_ID] = 11                      # what follows BOI is a patch
  targets[np.asarray(b.segment_ids) == 0] = 13        # padding
  changed = loss_fn(params, b.replace(text_targets=jnp.asarray(targets)), rng)[1]["loss_lm"]
  assert float(changed) == float(base)
  pad = np.asarray(b.segment_ids) == 0
  assert pad.any()
  tokens2 = np.where(pad, 17, tokens)                 # padding inputs are not seen either
  changed = loss_fn(params, b.replace(tokens=jnp.asarray(tokens2)), rng)[1]["loss"]
  assert float(changed) == pytest.approx(float(loss_fn(params, b, rng)[1]["loss"]), rel=1e-6)


def test_clean_images_carry_no_diffusion_loss(setup):
  c, params, loss_fn, b = setup
  clean = b.image_valid.at[:, 1:].set(False)          # only the first slot of each row clean
  _, m = loss_fn(params, b.replace(image_clean=clean), jax.random.key(3))
  assert float(m["num_images"]) == float(np.sum(np.asarray(b.image_valid & ~clean)))


def test_caption_dropout_gives_the_image_its_own_document():
  c = tiny_config()
  b = make_batch(c, seed=3)
  seg = np.asarray(drop_captions(jax.random.key(0), b, 1.0))
  old = np.asarray(b.segment_ids)
  dropped = 0
  for row in range(2):
    for slot in np.flatnonzero(np.asarray(b.image_valid[row])):
      start = int(b.image_starts[row, slot])
      boi = start - 1
      if bool(b.image_before_caption[row, slot]):
        assert seg[row, start] == old[row, start]
        continue
      dropped += 1
      doc = old[row] == old[row, boi]
      assert seg[row, boi] != old[row, boi]
      assert np.all(seg[row, doc & (np.arange(64) >= boi)] == seg[row, boi])
      assert np.all(seg[row, doc & (np.arange(64) < boi)] == old[row, boi])
      assert np.sum(seg[row] == seg[row, boi]) == np.sum(doc & (np.arange(64) >= boi))
  assert dropped > 0
  np.testing.assert_array_equal(np.asarray(drop_captions(jax.random.key(0), b, 0.0)), old)


def test_tiny_model_drives_both_losses_down_on_a_fixed_batch(setup):
  c, params, _, b = setup
  model = Transfusion(c.model)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, rng):
    (_, m), g = jax.value_and_grad(
        lambda p: transfusion_loss(p, b, rng, model=model, config=c), has_aux=True)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, m

  opt_state = opt.init(params)
  history = []
  for i in range(150):
    params, opt_state, m = step(params, opt_state, jax.random.key(i))
    history.append((float(m["loss_lm"]), float(m["loss_diffusion"])))
  first = np.mean(history[:10], axis=0)
  last = np.mean(history[-10:], axis=0)
  assert last[0] < 0.5 * first[0], (first, last)     # the text is memorised
  assert last[1] < 0.8 * first[1], (first, last)     # noise prediction improves


@pytest.mark.parametrize("chunk", [8, 24, 64])
def test_chunked_lm_head_matches_whole_logits_in_value_and_gradient(setup, chunk):
  """The chunked head + cross-entropy is the same function as the whole-logits one,
  including a chunk size that does not divide the sequence and one chunk for all."""
  c, params, _, batch = setup
  chunked = c.copy_and_resolve_references()
  chunked.model.lm_head_chunk = chunk
  rng = jax.random.key(3)

  def loss(config):
    fn = lambda p: transfusion_loss(p, batch, rng, model=Transfusion(config.model),
                                    config=config)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (value, metrics), grads = loss(c)
  (value_c, metrics_c), grads_c = loss(chunked)
  np.testing.assert_allclose(metrics_c["loss_lm"], metrics["loss_lm"], rtol=1e-5)
  np.testing.assert_allclose(value_c, value, rtol=1e-5)
  assert metrics_c["num_text_tokens"] == metrics["num_text_tokens"]
  for g, g_c in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_c)):
    np.testing.assert_allclose(g_c, g, rtol=1e-4, atol=1e-6)


def test_chunked_lm_head_skips_chunks_past_the_scored_positions():
  """Chunks past every row's last scored position are not computed: a head full of
  NaN beyond them cannot reach the loss, while the scored positions are counted."""
  from tfjax.losses import chunked_lm_loss, lm_loss
  h = jax.random.normal(jax.random.key(0), (2, 16, 8))
  head = jax.random.normal(jax.random.key(1), (8, 11))
  targets = jax.random.randint(jax.random.key(2), (2, 16), 0, 11)
  mask = jnp.zeros((2, 16), bool).at[0, 3].set(True).at[1, 9].set(True).at[1, 15].set(True)
  value, count = chunked_lm_loss(h, head, targets, mask, chunk=4)
  ref, _ = lm_loss(jnp.einsum("bsd,dv->bsv", h, head), targets, mask)
  assert count == 3
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  # Scored positions move to the front: with chunk 2 only chunk 0 runs; NaN
  # hidden states at unscored positions cannot leak in.
  h_nan = jnp.where(mask[..., None], h, jnp.nan)
  value_nan, _ = chunked_lm_loss(h_nan, head, targets, mask, chunk=2)
  np.testing.assert_allclose(value_nan, ref, rtol=1e-5)
