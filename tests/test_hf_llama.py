"""train.init_from=hf_llama:DIR: a Hugging Face Llama's weights and tokenizer in tfjax.

A small random `LlamaForCausalLM` (GQA, a non-default RoPE theta) is made and
saved here with `transformers`, beside a sentencepiece model trained here;
tfjax's text logits must match HF's in float32, config mismatches must name
both keys, and `tfjax-train` must train from the directory.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tfjax.config import (BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID, ConfigError,  # noqa: E402
                          apply_overrides, default_config)
from tfjax.data.tokenizer import NUM_SPECIAL, train_tokenizer  # noqa: E402
from tfjax.model import Transfusion, abstract_params, dummy_inputs, hf_llama  # noqa: E402
from tfjax import checkpoints  # noqa: E402
from tfjax.train import pretrained  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THETA = 1000.0  # not the default 10000: the check and the rotation must both use it
# tfjax model.* keys matching the HF architecture below (vocab_size added per checkpoint).
MODEL = dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96, norm_eps=1e-5,
             rope_theta=THETA)
WORDS = ("red green blue yellow circle square triangle above below left of right a the "
         "small large picture shows there is an and").split()


def _hf_model(vocab: int, tie: bool, seed: int):
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      max_position_embeddings=64, tie_word_embeddings=tie,
      rope_parameters={"rope_type": "default", "rope_theta": THETA})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1: make them carry information too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.mul_(1 + 0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """{name: (dir, model)}: untied in one file; tied in shards (index file)."""
  root = tmp_path_factory.mktemp("hf")
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]
  tok = train_tokenizer(lines, 320, str(root / "tok"))
  out = {}
  for name, tie, shard in (("untied", False, None), ("tied_sharded", True, "20KB")):
    model = _hf_model(tok.sp_vocab_size, tie, seed=len(out))
    path = root / name
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    shutil.copy(root / "tok" / "tokenizer.model", path / "tokenizer.model")
    with open(path / "tokenizer.json", "w") as f:  # HF's fast tokenizer file shares the name
      json.dump({"version": "1.0", "added_tokens": [], "model": {"type": "Unigram"}}, f)
    out[name] = (str(path), model)
  assert os.path.exists(os.path.join(out["tied_sharded"][0], hf_llama.INDEX_FILE))
  assert not os.path.exists(os.path.join(out["untied"][0], hf_llama.INDEX_FILE))
  return out


def _config(path: str, vocab: int, tie: bool, scan: bool = True):
  c = default_config()
  c.model.update(vocab_size=vocab + NUM_SPECIAL, tie_embeddings=tie, dtype="float32",
                 attention_impl="xla", remat_policy="none", scan_layers=scan, patch_type="linear",
                 latent_size=4, latent_channels=4, patch_size=2, **MODEL)
  c.train.init_from = f"hf_llama:{path}"
  return c


def _fresh(c):
  """Random stand-ins for a fresh init (the loader only reads shapes and dtypes;
  a jitted init would compile the whole model once more)."""
  rng = np.random.default_rng(2)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                nn.unbox(abstract_params(c.model)))


@pytest.mark.parametrize("name,scan", [("untied", True), ("tied_sharded", False)])
def test_text_logits_match_transformers(hf, name, scan, tmp_path):
  path, model = hf[name]
  vocab = model.config.vocab_size
  c = _config(path, vocab, model.config.tie_word_embeddings, scan)
  c.data.dir = str(tmp_path)
  fresh = _fresh(c)
  params = pretrained.load_hf_llama_params(c, fresh)
  assert c.data.tokenizer == os.path.join(path, "tokenizer.model")

  hf_ids = np.random.default_rng(1).integers(3, vocab, (2, 16))
  hf_ids[:, 0] = model.config.bos_token_id  # HF's <s> is tfjax's BOS
  with torch.no_grad():
    want = model(torch.tensor(hf_ids)).logits.numpy()
  tokens = hf_ids + NUM_SPECIAL
  tokens[:, 0] = BOS_ID
  inputs = dummy_inputs(c.model, batch=2, seq=16)
  inputs.update(tokens=jax.numpy.asarray(tokens, jax.numpy.int32),
                positions=jax.numpy.broadcast_to(jax.numpy.arange(16, dtype=jax.numpy.int32),
                                                 (2, 16)))
  with jax.default_matmul_precision("highest"):  # no TF32 where a GPU runs the suite
    got = np.asarray(jax.jit(Transfusion(c.model).apply)({"params": params}, **inputs).logits)
  assert np.abs(want).max() > 0.3  # logits of this size: the tolerance is meaningful
  np.testing.assert_allclose(got[..., NUM_SPECIAL:NUM_SPECIAL + vocab], want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[..., EOS_ID], want[..., model.config.eos_token_id],
                             atol=1e-5, rtol=0)
  # The image side kept its fresh init; the text side did not.
  for key in ("patch_encoder", "patch_decoder", "timestep_embedding"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[key], fresh[key])
  assert not np.allclose(params["embedding"], fresh["embedding"])


def test_loads_onto_the_state_shardings(hf):
  """On a 2x2x2 (data, fsdp, tensor) mesh each text leaf lands on its leaf's
  sharding with the values of an unsharded load; model.vocab_size above HF's
  + 5 gets mean rows."""
  from tfjax.model import init_params
  from tfjax.train import mesh as mesh_lib
  from tfjax.train.optimizer import make_optimizer
  from tfjax.train.state import state_shardings
  path, model = hf["untied"]
  vocab = model.config.vocab_size
  c = _config(path, vocab, tie=False)
  c.model.vocab_size = 2 * ((vocab + NUM_SPECIAL) // 2 + 1)  # even (tensor axis), > needed
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:8])
  abstract, _ = state_shardings(c, mesh, make_optimizer(c.train), init_params)
  sharded = checkpoints.flatten(pretrained.load_hf_llama_params(c, abstract.params))
  plain = checkpoints.flatten(pretrained.load_hf_llama_params(c, _fresh(c)))
  want = checkpoints.flatten(abstract.params)
  text = [k for k in want if not k.startswith(("patch_", "timestep_"))]
  assert len(text) == 12
  for key in text:
    assert sharded[key].sharding == want[key].sharding, key
    np.testing.assert_array_equal(np.asarray(sharded[key]), plain[key], err_msg=key)
  assert any(len(want[k].sharding.device_set) > 1 and not want[k].sharding.is_fully_replicated
             for k in text)
  rows = plain["embedding"]
  mean = rows[NUM_SPECIAL:NUM_SPECIAL + vocab].mean(0)
  for new_row in (PAD_ID, BOI_ID, EOI_ID, -1):  # no HF counterpart: the mean row
    np.testing.assert_allclose(rows[new_row], mean, atol=1e-6)


def test_bfloat16_checkpoint(hf, tmp_path):
  """Real checkpoints are stored in bfloat16: read exactly, as float32 master weights."""
  path, model = hf["untied"]
  half = tmp_path / "bf16"
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(half)  # the fixture's stays float32
  shutil.copy(os.path.join(path, "tokenizer.model"), half / "tokenizer.model")
  c = _config(str(half), model.config.vocab_size, tie=False)
  params = pretrained.load_hf_llama_params(c, _fresh(c))
  want = model.model.layers[1].self_attn.k_proj.weight.detach().to(torch.bfloat16).float().numpy()
  got = params["transformer"]["layers"]["attention"]["wk"][1]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want.T.reshape(64, 2, 16))


@pytest.mark.parametrize("key,value,hf_key", [
    ("num_kv_heads", 4, "num_key_value_heads"),
    ("mlp_dim", 128, "intermediate_size"),
    ("rope_theta", 10000.0, "rope_theta"),
    ("norm_eps", 1e-6, "rms_norm_eps"),
    ("num_layers", 3, "num_hidden_layers"),
    ("vocab_size", NUM_SPECIAL - 1, "vocab_size"),  # added to the HF vocabulary
    ("tie_embeddings", True, "tie_word_embeddings"),
])
def test_config_mismatch_names_both_keys(hf, key, value, hf_key):
  path, model = hf["untied"]
  c = _config(path, model.config.vocab_size, tie=False)
  c.model[key] = value + model.config.vocab_size if key == "vocab_size" else value
  with pytest.raises(ConfigError, match=rf"model\.{key}=.*{hf_key}.*--config\.model\.{key}="):
    pretrained.resolve_hf_llama(c)


def test_unsupported_checkpoints_are_refused(hf, tmp_path):
  path, model = hf["untied"]
  c = _config(path, model.config.vocab_size, tie=False)
  hf_cfg = hf_llama.read_config(path)
  scaled = dict(hf_cfg, rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                         "rope_theta": THETA})
  with pytest.raises(ConfigError, match="rope_scaling"):
    hf_llama.check_config(c.model, scaled, path, NUM_SPECIAL)
  # transformers 4's layout: rope_theta and rope_scaling at the top level.
  old = {k: v for k, v in hf_cfg.items() if k not in ("rope_parameters", "head_dim")}
  hf_llama.check_config(c.model, dict(old, rope_theta=THETA, rope_scaling=None), path,
                        NUM_SPECIAL)
  with pytest.raises(ConfigError, match=r"model\.rope_theta=.*'rope_theta'=10000"):
    hf_llama.check_config(c.model, old, path, NUM_SPECIAL)
  with pytest.raises(ConfigError, match="rope_scaling"):
    hf_llama.check_config(c.model, dict(old, rope_theta=THETA, rope_scaling={"type": "linear"}),
                          path, NUM_SPECIAL)
  with pytest.raises(ConfigError, match="model_type"):
    hf_llama.check_config(c.model, dict(hf_cfg, model_type="mistral"), path, NUM_SPECIAL)
  c.model.qk_norm = True
  with pytest.raises(ConfigError, match="model.qk_norm"):
    hf_llama.check_config(c.model, hf_cfg, path, NUM_SPECIAL)
  # No tokenizer.model and no data.tokenizer: the error names the key.
  bare = tmp_path / "bare"
  shutil.copytree(path, bare, ignore=shutil.ignore_patterns("tokenizer.model"))
  c = _config(str(bare), model.config.vocab_size, tie=False)
  with pytest.raises(FileNotFoundError, match="data.tokenizer"):
    pretrained.resolve_hf_llama(c)
  # A tensor tfjax has no place for is not silently dropped.
  from safetensors.numpy import save_file
  save_file({"model.extra.weight": np.zeros(3, np.float32)}, str(bare / "extra.safetensors"))
  shutil.copy(os.path.join(path, "tokenizer.model"), bare / "tokenizer.model")
  c = _config(str(bare), model.config.vocab_size, tie=False)
  with pytest.raises(ValueError, match="model.extra.weight"):
    pretrained.load_hf_llama_params(c, _fresh(c))


def test_tfjax_train_starts_from_the_checkpoint(hf, tmp_path):
  """`tfjax-train --config=configs/tiny.py --config.train.init_from=hf_llama:DIR`:
  the checkpoint's tokenizer (none trained), a few steps, weights near HF's."""
  from tfjax.data import build, latents
  from configs import tiny
  path, model = hf["untied"]
  work, steps, lr = tmp_path / "run", 3, 1e-3
  overrides = [f"train.init_from=hf_llama:{path}", f"data.dir={work / 'data'}",
               f"model.vocab_size={model.config.vocab_size + NUM_SPECIAL}",
               "model.patch_type=linear", f"train.num_steps={steps}",
               f"train.learning_rate={lr}", "train.warmup_steps=0", "train.log_every=1",
               "train.eval_every=0", "data.num_train_scenes=48", "data.num_eval_scenes=8",
               "data.num_text_docs=64", "data.batch_size=4", "data.seq_len=64"]
  overrides += [f"model.{k}={v}" for k, v in MODEL.items()]
  c = apply_overrides(tiny.get_config(), overrides)
  build.build_all(c)  # the VAE stage's stand-in: fixed pixel-patch latents
  build.build_latents(c, None, latents.PixelPatchEncoder(downsample=8, channels=8))
  xla_flags = os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")  # one CPU device: the plain CLI run
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags)
  run = subprocess.run(
      [sys.executable, "-m", "tfjax.cli.train", "--config=configs/tiny.py",
       f"--workdir={work}", "--stages=data,train"] + [f"--config.{o}" for o in overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert not os.path.exists(work / "data" / "tokenizer")  # none trained
  with open(work / "config.json") as f:
    assert json.load(f)["data"]["tokenizer"] == os.path.join(path, "tokenizer.model")
  with open(work / "metrics.jsonl") as f:
    logged = [json.loads(l) for l in f]
  assert [m["step"] for m in logged if "loss" in m] == list(range(1, steps + 1))
  params, _ = checkpoints.restore_params(str(work), config=c)
  hf_rows = model.model.embed_tokens.weight.detach().numpy()
  moved = np.abs(params["embedding"][NUM_SPECIAL:NUM_SPECIAL + len(hf_rows)] - hf_rows).max()
  assert 0 < moved <= 2.5 * lr * steps  # Adam moves a weight ~lr per step
