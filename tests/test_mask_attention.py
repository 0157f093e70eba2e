"""The Transfusion mask and the XLA reference attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax.ops import attention, causal_mask, key_ranges, transfusion_mask, xla_attention


def random_layout(rng: np.random.Generator, seq: int):
  """A packed row: documents of text and whole images, then padding."""
  seg = np.zeros(seq, np.int32)
  img = np.zeros(seq, np.int32)
  pos, doc, image = 0, 0, 0
  while pos < seq - 2 and rng.random() > 0.1:
    doc += 1
    length = int(rng.integers(1, max(2, seq // 3)))
    end = min(seq, pos + length)
    seg[pos:end] = doc
    p = pos
    while p < end:  # images of 1..6 patches anywhere in the document, adjacent allowed
      if rng.random() < 0.3:
        n = min(int(rng.integers(1, 7)), end - p)
        image += 1
        img[p:p + n] = image
        p += n
      else:
        p += 1
    pos = end
  return seg, img


def brute_force_mask(seg, img):
  seq = len(seg)
  m = np.zeros((seq, seq), bool)
  for q in range(seq):
    for k in range(seq):
      if seg[q] != 0 and seg[q] == seg[k]:
        m[q, k] = k <= q or (img[q] != 0 and img[q] == img[k])
  return m


FIXED_LAYOUTS = [
    # image at sequence start, adjacent images, one-patch image, image at the end
    ([1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 2, 0, 3, 0, 4, 4]),
    ([1, 1, 2, 2, 2, 0, 0, 0], [0, 5, 5, 5, 0, 0, 0, 0]),
    ([0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]),
    ([1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 2, 0, 0, 0, 0, 3]),
]


@pytest.mark.parametrize("seed", range(20))
def test_mask_matches_brute_force_on_random_layouts(seed):
  rng = np.random.default_rng(seed)
  seg, img = random_layout(rng, 40)
  got = np.asarray(transfusion_mask(jnp.asarray(seg)[None], jnp.asarray(img)[None]))[0]
  np.testing.assert_array_equal(got, brute_force_mask(seg, img))


@pytest.mark.parametrize("seg,img", FIXED_LAYOUTS)
def test_mask_fixed_edge_layouts(seg, img):
  seg, img = np.array(seg), np.array(img)
  got = np.asarray(transfusion_mask(jnp.asarray(seg)[None], jnp.asarray(img)[None]))[0]
  np.testing.assert_array_equal(got, brute_force_mask(seg, img))


@pytest.mark.parametrize("seed", range(10))
def test_key_ranges_equal_the_mask(seed):
  rng = np.random.default_rng(100 + seed)
  rows = [random_layout(rng, 48) for _ in range(3)]
  seg = jnp.asarray(np.stack([r[0] for r in rows]))
  img = jnp.asarray(np.stack([r[1] for r in rows]))
  k_start, k_end = key_ranges(seg, img)
  k = np.arange(48)[None, None, :]
  interval = (k >= np.asarray(k_start)[..., None]) & (k < np.asarray(k_end)[..., None])
  np.testing.assert_array_equal(interval, np.asarray(transfusion_mask(seg, img)))


def test_causal_mask_ignores_images():
  seg = jnp.array([[1, 1, 1, 1]])
  img = jnp.array([[0, 1, 1, 0]])
  np.testing.assert_array_equal(causal_mask(seg), transfusion_mask(seg, jnp.zeros_like(img)))
  assert bool(transfusion_mask(seg, img)[0, 1, 2]) and not bool(causal_mask(seg)[0, 1, 2])


def numpy_attention(q, k, v, mask):
  """float64 softmax attention with GQA by head repetition; empty rows -> 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  m = np.asarray(mask)[:, None]
  logits = np.where(m, logits, -np.inf)
  mx = np.max(np.where(m, logits, -1e300), axis=-1, keepdims=True)
  w = np.where(m, np.exp(logits - mx), 0.0)
  p = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seed, batch=2, seq=32, q_heads=4, kv_heads=4, head_dim=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  rows = [random_layout(rng, seq) for _ in range(batch)]
  seg = jnp.asarray(np.stack([r[0] for r in rows]))
  img = jnp.asarray(np.stack([r[1] for r in rows]))
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
  return q, k, v, seg, img


@pytest.mark.parametrize("seed,kv_heads", [(0, 4), (1, 2), (2, 1)])
def test_reference_attention_matches_float64_numpy(seed, kv_heads):
  q, k, v, seg, img = _inputs(seed, kv_heads=kv_heads)
  # Full float32 products: a GPU's default (TF32) misses 1e-5 by design.
  with jax.default_matmul_precision("highest"):
    out = attention(q, k, v, seg, img, impl="xla")
  ref = numpy_attention(q, k, v, transfusion_mask(seg, img))
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 1e-5, err


def test_grouped_query_equals_repeated_heads():
  q, k, v, seg, img = _inputs(3, kv_heads=2)
  mask = transfusion_mask(seg, img)
  grouped = xla_attention(q, k, v, mask)
  repeated = xla_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
  np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)


def test_padded_rows_are_zero_and_gradients_finite():
  q, k, v, _, _ = _inputs(4)
  seg = jnp.array([[1] * 20 + [0] * 12, [0] * 32])
  img = jnp.zeros_like(seg)
  out = attention(q, k, v, seg, img, impl="xla")
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_array_equal(np.asarray(out[0, 20:]), 0.0)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, seg, img, impl="xla") ** 2),
                   argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_unknown_impl_names_the_config_key():
  q, k, v, seg, img = _inputs(5)
  with pytest.raises(ValueError, match="model.attention_impl"):
    attention(q, k, v, seg, img, impl="flash")
