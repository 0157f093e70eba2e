"""Shapes generator, tokenizer and latent encoder stand-in."""
import hashlib
import itertools
import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from tfjax.config import BOI_ID, EOI_ID
from tfjax.data import latents, shapes
from tfjax.data.tokenizer import NUM_SPECIAL, Tokenizer, train_tokenizer


def test_colors_are_far_apart():
  cols = list(shapes.COLORS.values()) + list(shapes.BACKGROUNDS.values())
  assert len(shapes.COLORS) >= 6 and set(shapes.SHAPES) >= {"circle", "square", "triangle"}
  for a, b in itertools.combinations(cols, 2):
    assert np.linalg.norm(np.subtract(a, b)) > 140, (a, b)


def test_render_draws_each_object_in_its_colour():
  rng = np.random.default_rng(0)
  for _ in range(50):
    scene = shapes.random_scene(rng)
    json.dumps(scene)  # serialisable
    img = shapes.render(scene, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    colours_present = {tuple(c) for c in img.reshape(-1, 3)}
    want = {tuple(shapes.COLORS[o["color"]]) for o in scene["objects"]} | {
        tuple(scene["background"])}
    assert colours_present == want  # no anti-aliasing: only exact colours
    for o in scene["objects"]:
      cx, cy = int(o["x"] * 64), int(o["y"] * 64)
      assert tuple(img[cy, cx]) == shapes.COLORS[o["color"]]
    for a, b in itertools.combinations(scene["objects"], 2):
      assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > (shapes.SIZES[a["size"]]
                                                            + shapes.SIZES[b["size"]])


def test_splits_disjoint_deterministic_and_captions_true():
  tr_img, tr, tr_cap = shapes.generate_split("train", 300, 32, seed=3)
  va_img, va, _ = shapes.generate_split("validation", 60, 32, seed=3)
  te_img, te, _ = shapes.generate_split("test", 60, 32, seed=3)
  keys = [{shapes.canonical(s) for s in ss} for ss in (tr, va, te)]
  assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
  again, _, again_cap = shapes.generate_split("train", 300, 32, seed=3)
  np.testing.assert_array_equal(tr_img, again)
  assert tr_cap == again_cap
  other, _, _ = shapes.generate_split("train", 300, 32, seed=4)
  assert not np.array_equal(tr_img, other)
  plain = [c for c in tr_cap if c.count(" ") == 2 and c.startswith("a ")]
  assert plain, "the plain 'a red circle' form must occur"
  assert any(c.startswith(("two ", "three ")) for c in tr_cap)
  assert any(r in c for c in tr_cap for r in ("above", "below", "left of", "right of"))
  for scene, cap in zip(tr, tr_cap):
    for word in cap.replace(",", " ").replace(":", " ").split():
      if word in shapes.COLORS:
        assert word in {o["color"] for o in scene["objects"]}, (cap, scene)
      if word.rstrip("s") in shapes.SHAPES:
        assert word.rstrip("s") in {o["shape"] for o in scene["objects"]}, (cap, scene)


def test_max_objects_limits_scenes_and_corpus():
  one = shapes.SceneOptions(max_objects=1)
  _, scenes, captions = shapes.generate_split("train", 100, 32, seed=0, options=one)
  assert all(len(s["objects"]) == 1 for s in scenes)
  assert not any(c.startswith(("two ", "three ")) for c in captions)
  _, four, _ = shapes.generate_split("train", 200, 32, seed=0,
                                     options=shapes.SceneOptions(max_objects=4))
  assert max(len(s["objects"]) for s in four) == 4
  docs = shapes.text_corpus("train", 50, seed=0, options=one)
  assert not any("shows two" in d or "shows three" in d for d in docs)
  with pytest.raises(ValueError, match="data.max_objects"):
    shapes.SceneOptions(max_objects=5)
  _, big, _ = shapes.generate_split("train", 50, 32, options=shapes.SceneOptions(sizes=("large",)))
  assert {o["size"] for s in big for o in s["objects"]} == {"large"}
  with pytest.raises(ValueError, match="data.object_sizes"):
    shapes.SceneOptions(sizes=("huge",))


def test_text_corpus():
  docs = shapes.text_corpus("train", 50, seed=0)
  assert len(docs) == 50 and all(isinstance(d, str) and d for d in docs)
  assert docs == shapes.text_corpus("train", 50, seed=0)


@pytest.fixture(scope="module")
def corpus():
  return shapes.text_corpus("train", 400, seed=0) + shapes.generate_split("train", 200, 16)[2]


def test_train_tokenizer_roundtrip(corpus, tmp_path):
  tok = train_tokenizer(corpus, 400, str(tmp_path / "tok"))
  assert NUM_SPECIAL + 256 < tok.vocab_size <= 400
  text = "a small red circle above a blue square"
  ids = tok.encode(text)
  assert min(ids) >= NUM_SPECIAL and tok.decode(ids) == text
  assert tok.decode([1, BOI_ID] + ids + [EOI_ID, 2, 0]) == text
  loaded = Tokenizer.load(str(tmp_path / "tok"))
  assert loaded.encode(text) == ids and loaded.vocab_size == tok.vocab_size
  meta = json.load(open(tmp_path / "tok" / "tokenizer.json"))
  assert meta["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "boi": 3, "eoi": 4}
  assert pickle.loads(pickle.dumps(tok)).encode(text) == ids  # Grain workers


def test_llama_layout_model_loads_as_is(corpus, tmp_path):
  prefix = str(tmp_path / "llama")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=350, model_type="bpe",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2,
      hard_vocab_limit=False)
  raw = spm.SentencePieceProcessor(model_file=prefix + ".model")
  assert raw.id_to_piece(0) == "<unk>" and raw.id_to_piece(1) == "<s>"
  tok = Tokenizer.load(prefix + ".model")  # no tokenizer.json next to it
  text = "a green triangle, unseen: é漢"
  ids = tok.encode(text)
  assert ids == [i + NUM_SPECIAL for i in raw.encode(text)]
  assert tok.decode(ids) == text  # byte fallback keeps unseen characters
  assert tok.vocab_size == raw.get_piece_size() + NUM_SPECIAL
  tok.save(str(tmp_path / "saved"))
  assert Tokenizer.load(str(tmp_path / "saved")).encode(text) == ids


def test_tokenizer_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.tokenizer"):
    Tokenizer.load(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    Tokenizer.load(str(bad))


def test_pixel_patch_encoder():
  enc = latents.PixelPatchEncoder(downsample=8, channels=8)
  imgs = shapes.generate_split("train", 4, 64)[0].astype(np.float32) / 127.5 - 1
  z = enc.encode(imgs)
  assert z.shape == (4, 8, 8, 8) and z.dtype == np.float32
  # The first channels are patch mean colours, so decoding keeps block means
  # (up to clipping to [-1, 1]).
  rec = enc.decode(z)
  block = lambda x: x.reshape(4, 8, 8, 8, 8, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(block(rec), block(imgs), atol=0.05)  # up to clipping
  assert isinstance(enc.scale, float) and isinstance(enc.shift, float)


def test_max_objects_names_its_own_tfds_config(tmp_path):
  from tfjax.config import default_config, validate
  from tfjax.data import tfds_shapes
  c = default_config()
  default_name = tfds_shapes.builder(c, str(tmp_path)).builder_config.name
  c.data.max_objects = 1
  assert tfds_shapes.builder(c, str(tmp_path)).builder_config.name == default_name + "_obj1"
  c.data.object_sizes = "medium,large"
  assert (tfds_shapes.builder(c, str(tmp_path)).builder_config.name
          == default_name + "_obj1_medium-large")
  c.data.max_objects = 0
  with pytest.raises(ValueError, match="data.max_objects"):
    validate(c)
  c.data.max_objects = 1
  c.data.object_sizes = "large,huge"
  with pytest.raises(ValueError, match="data.object_sizes"):
    validate(c)


def test_scene_option_errors_name_the_editing_section():
  from tfjax.config import ConfigError, default_config, validate
  c = default_config()
  c.editing.max_objects = 5
  with pytest.raises(ValueError, match=r"^config key editing\.max_objects: must be in 1\.\.4"):
    shapes.SceneOptions.from_config(c.editing, "editing")
  with pytest.raises(ConfigError, match=r"^config key editing\.max_objects"):
    validate(c)
  c.editing.max_objects = 2
  c.editing.object_sizes = "large,huge"
  with pytest.raises(ValueError, match=r"^config key editing\.object_sizes"):
    shapes.SceneOptions.from_config(c.editing, "editing")
  with pytest.raises(ConfigError, match=r"^config key editing\.object_sizes"):
    validate(c)
  c.editing.object_sizes = "large"
  options = shapes.SceneOptions.from_config(c.editing, "editing")
  # The section only names errors: the same scenes are the same options.
  assert options == shapes.SceneOptions(max_objects=2, sizes=("large",))


def test_scene_stream_is_pinned():
  """Scenes, captions and stories for a seed never change: stored GPU runs
  (benchmarks/science_gpu/runs) and the README's figures were measured on them."""
  o = shapes.SceneOptions(max_objects=3, sizes=("small", "medium", "large"))
  images, scenes, captions = shapes.generate_split("train", 300, 32, 0, o)
  docs = shapes.text_corpus("train", 100, 0, o)
  digest = hashlib.sha256(images.tobytes() + json.dumps([scenes, captions, docs]).encode())
  assert digest.hexdigest() == "d1486bd5b125ca30530bc67801759864d410d0255c7696938c57c654ae6fea54"
