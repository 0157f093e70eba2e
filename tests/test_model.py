"""The Transfusion model: layers, patching, masking through the network, scan, sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import transfusion
from tfjax import config as config_lib
from tfjax.batch import Batch
from tfjax.model import KVCache, Transfusion, abstract_params, count_params, init_params
from tfjax.model.layers import apply_rope
from tfjax.model.patch import patchify, unpatchify
from tfjax.train.synthetic import synthetic_batch


def small_model_config(**overrides):
  c = config_lib.default_config().model
  c.update(dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                dtype="float32", attention_impl="xla", remat_policy="none",
                latent_size=4, latent_channels=4, patch_size=2, time_embed_dim=16,
                unet_channels=(8, 16)))
  c.update(overrides)
  return c


def apply(model_config, params, b, noisy=None, t=None):
  noisy = b.image_latents if noisy is None else noisy
  t = jnp.zeros(b.image_starts.shape) if t is None else t

  @jax.jit
  def forward(params, b, noisy, t):
    return Transfusion(model_config).apply(
        {"params": params}, b.tokens, b.positions, b.segment_ids, b.image_ids, noisy, t,
        b.image_starts, b.image_valid)
  return forward(params, b, noisy, t)


def make_batch(mc, seed=0, batch=2, seq=48, max_images=3):
  c = config_lib.default_config()
  c.model = mc
  c.data.update(seq_len=seq, max_images_per_seq=max_images)
  arrays = synthetic_batch(c, 0, seed, batch_size=batch, whole_documents=True)
  return Batch.from_dict({k: jnp.asarray(v) for k, v in arrays.items()})


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    return float(jnp.sum(apply_rope(q, jnp.array([[m]]), 10000.0) *
                         apply_rope(k, jnp.array([[n]]), 10000.0)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)
  assert abs(score(7, 3) - score(3, 7)) > 1e-3  # direction matters


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_roundtrip_and_order(p):
  x = jnp.arange(2 * 1 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 1, 8, 8, 3)
  patches = patchify(x, p)
  assert patches.shape == (2, 1, (8 // p) ** 2, p * p * 3)
  np.testing.assert_array_equal(unpatchify(patches, p, 8, 8), x)
  # patches run left-to-right, then top-to-bottom
  if p < 8:
    np.testing.assert_array_equal(patches[0, 0, 1, :3], x[0, 0, 0, p, :])
    np.testing.assert_array_equal(patches[0, 0, 8 // p, :3], x[0, 0, p, 0, :])


@pytest.mark.parametrize("patch_type,patch_size,channels", [("linear", 2, (8,)), ("unet", 4, (8, 8, 8))])
def test_output_shapes(patch_type, patch_size, channels):
  mc = small_model_config(patch_type=patch_type, patch_size=patch_size, latent_size=8,
                          unet_channels=channels)
  b = make_batch(mc, seq=64, max_images=2)
  params = init_params(mc, jax.random.key(0))
  out = apply(mc, params, b)
  assert out.logits.shape == (2, 64, 64)
  assert out.image_out.shape == b.image_latents.shape
  assert np.isfinite(np.asarray(out.logits)).all() and np.isfinite(np.asarray(out.image_out)).all()


@pytest.fixture(scope="module")
def small():
  mc = small_model_config()
  return mc, init_params(mc, jax.random.key(1)), make_batch(mc)


def test_documents_do_not_see_each_other_and_text_is_causal(small):
  mc, params, b = small
  base = apply(mc, params, b).logits
  seg = np.asarray(b.segment_ids[0])
  last_doc = seg.max()
  first_pos_last_doc = int(np.argmax(seg == last_doc))
  tokens = b.tokens.at[0, first_pos_last_doc:].set(7)  # rewrite the last document
  changed = apply(mc, params, b.replace(tokens=tokens)).logits
  np.testing.assert_allclose(changed[0, :first_pos_last_doc], base[0, :first_pos_last_doc],
                             atol=1e-5)
  np.testing.assert_allclose(changed[1], base[1], atol=1e-5)  # other row untouched


def test_image_patches_see_later_patches_of_their_image(small):
  mc, params, b = small
  slot = int(np.argmax(np.asarray(b.image_valid[0])))
  start = int(b.image_starts[0, slot])
  noisy = b.image_latents
  bumped = noisy.at[0, slot, -1, -1].add(5.0)  # the last patch of that image changes
  h0 = apply(mc, params, b, noisy=noisy).image_out
  h1 = apply(mc, params, b, noisy=bumped).image_out
  # the first patch (top-left latent) of the same image responds: bidirectional
  assert float(jnp.abs(h1[0, slot, 0, 0] - h0[0, slot, 0, 0]).max()) > 1e-6
  # with the causal ablation it cannot
  mc_causal = small_model_config(image_attention="causal")
  c0 = apply(mc_causal, params, b, noisy=noisy).image_out
  c1 = apply(mc_causal, params, b, noisy=bumped).image_out
  np.testing.assert_allclose(c1[0, slot, 0, 0], c0[0, slot, 0, 0], atol=1e-5)
  del start


def test_scan_and_unrolled_layers_agree(small):
  mc, params, b = small
  mc_unrolled = small_model_config(scan_layers=False)
  layers = params["transformer"]["layers"]
  unrolled = dict(params)
  unrolled["transformer"] = {f"layer_{i}": jax.tree.map(lambda x: x[i], layers)
                             for i in range(mc.num_layers)}
  a = apply(mc, params, b)
  u = apply(mc_unrolled, unrolled, b)
  np.testing.assert_allclose(a.logits, u.logits, atol=1e-5)
  np.testing.assert_allclose(a.image_out, u.image_out, atol=1e-5)
  # The scan unrolled (model.scan_unroll): the same parameters, the same outputs.
  r = apply(small_model_config(scan_unroll=mc.num_layers), params, b)
  np.testing.assert_allclose(a.logits, r.logits, atol=1e-5)
  np.testing.assert_allclose(a.image_out, r.image_out, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_xla_path_builds_the_mask_once_for_all_layers(small, monkeypatch, scan):
  """Training on the XLA path: one Transfusion mask per call, shared by every
  layer (forward and backward), with the outputs and gradients of a mask per layer."""
  import importlib
  transformer_lib = importlib.import_module("tfjax.model.transformer")
  attention_lib = importlib.import_module("tfjax.ops.attention")  # the module, not the function
  _, _, b = small
  mc = small_model_config(scan_layers=scan, num_layers=3)
  params = init_params(mc, jax.random.key(0))
  calls = []
  real_mask = transformer_lib.transfusion_mask

  def counting_mask(*args, **kwargs):
    calls.append(1)
    return real_mask(*args, **kwargs)
  monkeypatch.setattr(transformer_lib, "transfusion_mask", counting_mask)
  monkeypatch.setattr(attention_lib, "transfusion_mask", counting_mask)

  def loss(params, mc):
    out = Transfusion(mc).apply({"params": params}, b.tokens, b.positions, b.segment_ids,
                                b.image_ids, b.image_latents, jnp.zeros(b.image_starts.shape),
                                b.image_starts, b.image_valid)
    return jnp.sum(out.logits ** 2) + jnp.sum(out.image_out ** 2)
  grad = lambda mc: jax.value_and_grad(lambda p: loss(p, mc))  # a fresh function: traced anew
  jax.eval_shape(grad(mc), params)  # traces, compiles nothing
  assert len(calls) == 1
  # "auto" resolves to the XLA reference on CPU: it shares the mask as well.
  auto = small_model_config(scan_layers=scan, num_layers=3, attention_impl="auto")
  jax.eval_shape(grad(auto), params)
  assert len(calls) == 2
  # Without the shared mask, each attention call builds its own.
  monkeypatch.setattr(transformer_lib, "transfusion_mask", lambda *a, **k: None)
  calls.clear()
  jax.eval_shape(grad(mc), params)
  assert len(calls) >= 1 if scan else len(calls) == 3  # scanned: once per trace of the body
  if not scan:  # same values and gradients either way (one compile pair suffices)
    per_layer = jax.jit(grad(mc))(params)
    monkeypatch.setattr(transformer_lib, "transfusion_mask", counting_mask)
    shared = jax.jit(grad(mc))(params)
    np.testing.assert_allclose(shared[0], per_layer[0], rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 shared[1], per_layer[1])


@pytest.mark.parametrize("policy", ["nothing_saveable", "save_all", "save_all_names", "save_attention",
                                    "save_qkv_attention"])
def test_remat_policy_keeps_values_and_gradients(small, policy):
  mc, params, b = small
  remat = small_model_config(remat_policy=policy)

  def grads(config):
    def loss(p):
      out = Transfusion(config).apply(
          {"params": p}, b.tokens, b.positions, b.segment_ids, b.image_ids, b.image_latents,
          jnp.zeros(b.image_starts.shape), b.image_starts, b.image_valid)
      return jnp.mean(out.logits ** 2) + jnp.mean(out.image_out ** 2)
    return jax.jit(jax.grad(loss))(params)

  np.testing.assert_allclose(apply(remat, params, b).logits, apply(mc, params, b).logits,
                             atol=1e-5)
  for g, ref in zip(jax.tree_util.tree_leaves(grads(remat)), jax.tree_util.tree_leaves(grads(mc))):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_named_remat_policy_saves_what_it_names(small):
  """save_attention keeps q/k/v and the attention output across the layer scan
  and recomputes the MLP products; save_all_names keeps those too (residuals
  of the scan are [layers, batch, seq, ...]; the MLP's have mlp_dim last)."""
  mc, params, b = small
  import jax._src.ad_checkpoint as adc  # saved_residuals: the public print's data
  mlp = config_lib.mlp_dim(mc)

  def scan_residuals(policy):
    config = small_model_config(remat_policy=policy)
    def loss(p):
      out = Transfusion(config).apply(
          {"params": p}, b.tokens, b.positions, b.segment_ids, b.image_ids, b.image_latents,
          jnp.zeros(b.image_starts.shape), b.image_starts, b.image_valid)
      return jnp.mean(out.logits)
    return [aval.shape for aval, why in adc.saved_residuals(loss, params)
            if "scan" in why and aval.shape[:3] == (mc.num_layers,) + b.tokens.shape]

  attention = scan_residuals("save_attention")
  everything = scan_residuals("save_all_names")
  with_norms = scan_residuals("save_all")
  nothing = scan_residuals("nothing_saveable")
  heads = (mc.num_heads, mc.dim // mc.num_heads)
  assert sum(s[3:] == heads for s in attention) == 2            # q, attention output
  assert not any(s[-1] == mlp for s in attention)
  assert sum(s[-1] == mlp for s in everything) == 2             # gate, up
  dim_wide = lambda saved: sum(s[3:] == (mc.dim,) for s in saved)
  assert dim_wide(with_norms) == dim_wide(everything) + 2       # + both norm outputs
  assert nothing == [(mc.num_layers,) + b.tokens.shape + (mc.dim,)]  # the block inputs


def test_kv_cache_prefill_then_decode_matches_full_forward(small):
  mc, params, _ = small
  seq = 12
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 64, (2, seq)), jnp.int32)
  ones = jnp.ones((2, seq), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
  lat = jnp.zeros((2, 1, 4, 4, 4))
  none = jnp.zeros((2, 1), jnp.int32)
  model = Transfusion(mc)
  model_apply = jax.jit(model.apply)
  full = model_apply({"params": params}, tokens, positions, ones, 0 * ones, lat,
                     jnp.zeros((2, 1)), none, none.astype(bool)).logits
  cache = KVCache.empty(mc, 2, 16, jnp.float32)
  out = model_apply({"params": params}, tokens[:, :8], positions[:, :8], ones[:, :8],
                    0 * ones[:, :8], lat, jnp.zeros((2, 1)), none, none.astype(bool), cache)
  steps = [out.logits]
  cache = out.cache
  for i in range(8, seq):
    out = model_apply({"params": params}, tokens[:, i:i + 1], positions[:, i:i + 1],
                      ones[:, i:i + 1], 0 * ones[:, i:i + 1], lat, jnp.zeros((2, 1)), none,
                      none.astype(bool), cache)
    cache = out.cache
    steps.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4)
  assert int(cache.length) == seq


@pytest.mark.parametrize("size,nominal", [("160m", 0.16e9), ("370m", 0.37e9), ("760m", 0.76e9),
                                          ("1_4b", 1.4e9), ("7b", 7e9)])
def test_table2_parameter_counts_within_ten_percent(size, nominal):
  c = config_lib.validate(transfusion.get_config(size))
  counts = count_params(abstract_params(c.model))
  assert abs(counts["total"] - nominal) / nominal < 0.10, counts
  assert counts["transformer"] > counts["embeddings"] > counts["patch"] > 0


def test_params_carry_logical_axes():
  mc = small_model_config()
  specs = nn.get_partition_spec(abstract_params(mc))
  assert tuple(specs["embedding"]) == ("vocab", "embed")
  assert tuple(specs["transformer"]["layers"]["mlp"]["w_gate"]) == ("layers", "embed", "mlp")


def test_cached_image_step_kernel_path_matches_xla_path():
  """Denoising against a KV cache: the block-sparse kernel (interpret mode here)
  gives what the XLA path gives."""
  mc = small_model_config(dim=128, num_heads=2, num_kv_heads=1, latent_size=16, patch_size=2)
  params = init_params(mc, jax.random.key(3))
  prefix, n = 9, 64                                 # 64 patches: the kernel path
  rng = np.random.default_rng(1)
  lat = jnp.asarray(rng.standard_normal((1, 1, 16, 16, 4)), jnp.float32)

  def run(impl):
    c = small_model_config(dim=128, num_heads=2, num_kv_heads=1, latent_size=16, patch_size=2,
                           attention_impl=impl)
    model_apply = jax.jit(Transfusion(c).apply)
    tokens = jnp.asarray(rng.integers(5, 64, (1, prefix)), jnp.int32)
    cache = KVCache.empty(c, 1, 128, jnp.float32)
    none = jnp.zeros((1, 1), jnp.int32)
    out = model_apply({"params": params}, tokens, jnp.arange(prefix)[None], jnp.ones_like(tokens),
                      0 * tokens, lat, jnp.zeros((1, 1)), none, none.astype(bool), cache)
    pos = jnp.arange(prefix, prefix + n)[None]
    image = model_apply({"params": params}, jnp.zeros((1, n), jnp.int32), pos,
                        jnp.ones((1, n), jnp.int32), jnp.ones((1, n), jnp.int32), lat,
                        jnp.full((1, 1), 500.0), none, jnp.ones((1, 1), bool), out.cache)
    return image.image_out
  rng = np.random.default_rng(1)
  xla = run("xla")
  rng = np.random.default_rng(1)
  kernel = run("pallas")
  # On a GPU the Triton kernel's float32 dots run in TF32 (METHOD.md: ~3e-4 relative).
  tol = 2e-4 if jax.default_backend() == "cpu" else 3e-3
  np.testing.assert_allclose(kernel, xla, atol=tol, rtol=tol)
