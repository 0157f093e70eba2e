"""Export -> load_pretrained -> generate reproduces generating from the checkpoint;
the generate / eval command functions run end to end on the export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from tfjax import export
from tfjax.data import shapes
from tfjax.data.tokenizer import train_tokenizer
from tfjax.generate.diffusion import DiffusionParams
from tfjax.generate.sampling import SamplingParams
from tfjax.model import init_params
from tfjax.train import mesh as mesh_lib
from tfjax.train.checkpoint import Checkpointer
from tfjax.train.optimizer import make_optimizer
from tfjax.train.state import create_train_state
from tfjax.vae import autoencoder, io as vae_io

DP = DiffusionParams(num_steps=2, sampler="ddim", cfg_scale=2.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A training workdir: checkpoint (params + distinct EMA), tokenizer, VAE."""
  wd = str(tmp_path_factory.mktemp("run"))
  c = get_config()
  m = c.model
  m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size = 64, 2, 4, 2, 512
  c.data.dir = os.path.join(wd, "data")
  c.data.batch_size = 4
  c.train.ema_decay = 0.99
  c.diffusion.sample_steps, c.diffusion.sampler, c.diffusion.cfg_scale = 2, "ddim", 2.0
  c.sample.max_text_tokens = 6
  _, _, captions = shapes.generate_split("train", 200, 64, seed=0)
  train_tokenizer(shapes.text_corpus("train", 200) + captions, 400,
                  os.path.join(c.data.dir, "tokenizer"))
  arch = autoencoder.AutoencoderConfig(channels=(8, 8, 8, 8), blocks_per_level=1,
                                       latent_channels=8, norm_groups=4, mid_attention=False)
  vae_io.save(os.path.join(wd, "vae"),
              {"kind": "kl", "architecture": arch.to_json(), "scale": 1.5, "shift": 0.1},
              autoencoder.init_params(arch, jax.random.key(1), 64))
  state = create_train_state(c, mesh_lib.make_mesh(c.mesh), make_optimizer(c.train), init_params)
  state = state.replace(ema=jax.tree_util.tree_map(lambda x: x * 0.5, state.params))
  ckpt = Checkpointer(os.path.join(wd, "checkpoints"), c.train, async_save=False)
  ckpt.save(5, state, config=c)
  ckpt.close()
  return c, wd, state


def _same_tree(a, b, **tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


def _outputs(gen):
  image = shapes.render(shapes.random_scene(np.random.default_rng(0)), 64)
  key = jax.random.key(3)
  latents = gen.text_to_image(["a red circle", "two blue squares"], key, diffusion_params=DP)
  text = gen.image_to_text([image], key, sampling=SamplingParams(temperature=0.0))
  return latents, gen.decode_latents(latents), text


def test_export_roundtrip_reproduces_checkpoint_generation(run_dir, tmp_path):
  config, wd, state = run_dir
  from_ckpt = export.load_pretrained(wd)
  _same_tree(from_ckpt.params, state.ema)  # EMA preferred when the run kept one
  out = export.export(wd, str(tmp_path / "export"), dtype="float32")
  assert sorted(os.listdir(out)) == ["config.json", "params.safetensors", "tfjax_export.json",
                                     "tokenizer", "vae"]
  meta = json.load(open(os.path.join(out, "tfjax_export.json")))
  assert meta["step"] == 5 and meta["ema"] and meta["dtype"] == "float32"
  from_export = export.load_pretrained(out)
  assert from_export.config.to_dict() == from_ckpt.config.to_dict()
  assert from_export.config.mesh.rules == config.mesh.rules  # tuples survive JSON
  _same_tree(from_export.params, from_ckpt.params, rtol=0, atol=0)
  a, b = _outputs(from_ckpt), _outputs(from_export)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[2] == b[2] and isinstance(a[2][0], str)
  assert a[1].shape == (2, 64, 64, 3) and a[1].dtype == np.uint8


def test_bfloat16_export_and_raw_params(run_dir, tmp_path):
  _, wd, state = run_dir
  out = export.export(wd, str(tmp_path / "bf16"), dtype="bfloat16", use_ema=False)
  gen = export.load_pretrained(out)
  assert {x.dtype for x in jax.tree_util.tree_leaves(gen.params)} == {jnp.dtype(jnp.bfloat16)}
  _same_tree(gen.params, state.params, rtol=1e-2, atol=1e-2)  # raw params, not EMA
  latents = gen.text_to_image(["a red circle"], jax.random.key(0), diffusion_params=DP)
  assert latents.shape == (1, 8, 8, 8) and np.isfinite(latents).all()
  with pytest.raises(FileNotFoundError, match="neither an export"):
    export.load_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="dtype"):
    export.export(wd, str(tmp_path / "x"), dtype="float16")


def test_generate_and_eval_commands(run_dir, tmp_path):
  from PIL import Image
  from tfjax.eval.suite import evaluate_to_files
  from tfjax.generate.files import generate_to_dir, read_image
  _, wd, _ = run_dir
  model = export.export(wd, str(tmp_path / "export"), dtype="float32")
  out = str(tmp_path / "gen")
  rec = generate_to_dir(model, "a red circle", [], 2, 0, out, steps=2)
  assert rec["mode"] == "image" and [s["images"] for s in rec["samples"]] == [
      ["sample0_image0.png"], ["sample1_image0.png"]]
  assert Image.open(os.path.join(out, "sample1_image0.png")).size == (64, 64)
  assert json.load(open(os.path.join(out, "generation.json")))["diffusion"]["num_steps"] == 2
  png = str(tmp_path / "in.png")
  Image.fromarray(shapes.render(shapes.random_scene(np.random.default_rng(1)), 80)).save(png)
  rec = generate_to_dir(model, "", [png], 1, 0, str(tmp_path / "cap"), temperature=0.0)
  assert rec["mode"] == "text" and rec["samples"][0]["images"] == []
  # Image-to-image: a strength that leaves only t = 0 returns the init image
  # (through the VAE), whatever the model.
  rec = generate_to_dir(model, "a red circle", [], 1, 0, str(tmp_path / "i2i"), steps=50,
                        sampler="ddim", strength=0.001, init_image=png)
  assert rec["init_image"] == png and rec["diffusion"]["strength"] == 0.001
  drawn = np.asarray(Image.open(str(tmp_path / "i2i" / "sample0_image0.png")), np.float32)
  gen = export.load_pretrained(model)
  trip = gen.decode_latents(gen.encode_images(read_image(png, 64)[None]))[0].astype(np.float32)
  noise_drawn = np.asarray(Image.open(os.path.join(out, "sample0_image0.png")), np.float32)
  assert np.abs(drawn - trip).mean() < 0.1 * np.abs(noise_drawn - trip).mean()
  with pytest.raises(ValueError, match="--init_image or --image"):
    generate_to_dir(model, "a red circle", [], 1, 0, str(tmp_path / "x"), strength=0.5)
  # Image guidance (InstructPix2Pix) through the CLI path: at the text scale it
  # is the usual guidance; another scale moves the image (the text-free
  # branch is the input image alone).
  def draw(name, **kw):
    generate_to_dir(model, "a red circle", [png], 1, 0, str(tmp_path / name), mode="image",
                    steps=5, sampler="ddim", cfg_scale=3.0, **kw)
    return np.asarray(Image.open(str(tmp_path / name / "sample0_image0.png")), np.float32)
  plain, split = draw("cfg3"), draw("img3", image_cfg_scale=3.0)
  low = draw("img1", image_cfg_scale=1.0)
  # (Measured: 8e-5 and 0.39 mean absolute difference; this model barely reads text.)
  assert np.abs(plain - split).max() <= 2.0
  assert np.abs(plain - split).mean() < 0.01 < np.abs(plain - low).mean()
  with pytest.raises(ValueError, match="--mode=image"):
    generate_to_dir(model, "", [png], 1, 0, str(tmp_path / "y"), image_cfg_scale=1.5)
  results = evaluate_to_files(model, "all", 2, str(tmp_path / "eval" / "r.json"))
  for key in ("shapes_accuracy", "caption_cider", "caption_scene_accuracy", "perplexity"):
    assert isinstance(results[key], float), key
  assert results["perplexity"] > 1.0
  assert results["fid"]["status"] == "skipped" and results["clip_score"]["status"] == "skipped"
  table = open(str(tmp_path / "eval" / "r.md")).read()
  assert "| shapes_accuracy |" in table and "| perplexity |" in table


def test_init_from_a_workdir_reads_its_ema_onto_the_runs_shardings(run_dir, tmp_path):
  """train.init_from=WORKDIR (or WORKDIR/checkpoints): the EMA, alone, on the new mesh."""
  from tfjax.train import loop
  from tfjax.train.state import state_shardings
  c, wd, state = run_dir
  abstract, _ = state_shardings(c, mesh_lib.make_mesh(c.mesh), make_optimizer(c.train),
                                init_params)
  for path in (wd, os.path.join(wd, "checkpoints")):
    params = loop._restore_params_from(path, abstract, c, None)
    _same_tree(params, state.ema, rtol=0, atol=0)
    for got, want in zip(jax.tree_util.tree_leaves(params),
                         jax.tree_util.tree_leaves(abstract.params)):
      assert got.sharding == want.sharding
  with pytest.raises(FileNotFoundError, match="train.init_from"):
    loop._restore_params_from(str(tmp_path), abstract, c, None)
