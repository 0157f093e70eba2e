"""FID / CLIP-score arithmetic, user-supplied extractors, caption scene checks, NLL."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax.data import shapes
from tfjax.eval import caption_scene, clip_score, extractor, fid
from tfjax.eval.perplexity import text_nll


def test_frechet_distance_of_known_gaussians():
  rng = np.random.default_rng(0)
  s = np.cov(rng.normal(size=(500, 4)), rowvar=False)
  mu = rng.normal(size=4)
  assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
  # Isotropic: |d|^2 + d * (a - b)^2 for covariances a^2 I and b^2 I.
  eye = np.eye(4)
  d = np.array([1.0, 2.0, 0.0, -2.0])
  assert fid.frechet_distance(d, 4 * eye, 0 * d, 9 * eye) == pytest.approx(9.0 + 4 * 1.0)


def test_fid_with_a_serialized_extractor(tmp_path):
  pytest.importorskip("flatbuffers")  # jax.export serialization needs it (setup.py pin)
  def features(x):  # [b, 16, 16, 3] -> [b, 6]: channel means and stds
    return jnp.concatenate([x.mean((1, 2)), x.std((1, 2))], -1)
  exported = jax.export.export(jax.jit(features))(jax.ShapeDtypeStruct((4, 16, 16, 3),
                                                                         jnp.float32))
  path = tmp_path / "feat.jax_export"
  path.write_bytes(exported.serialize())
  images, _, _ = shapes.generate_split("test", 10, 32, seed=0)
  assert fid.fid_from_images(str(path), images, images) == pytest.approx(0.0, abs=1e-6)
  noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
  assert fid.fid_from_images(str(path), images, noise) > 100.0
  with pytest.raises(ValueError, match="not a jax.export"):
    bad = tmp_path / "bad"
    bad.write_bytes(b"nope")
    extractor.load(str(bad))


def test_clip_cosine_score():
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  assert clip_score.cosine_score(a, a) == pytest.approx(100.0)
  assert clip_score.cosine_score(a, -a) == 0.0
  assert clip_score.cosine_score(a, np.array([[1.0, 1.0], [1.0, 1.0]])) == pytest.approx(
      100 / math.sqrt(2))


def test_caption_scene_accuracy():
  scene = {"objects": [dict(shape="circle", color="red", size="small", x=0.2, y=0.2),
                       dict(shape="square", color="blue", size="large", x=0.7, y=0.7)],
           "background": list(shapes.BACKGROUNDS["white"])}
  ok = caption_scene.scene_accurate
  assert ok("a small red circle above a blue square", scene)
  assert ok("a blue square to the right of a red circle", scene)
  assert ok("two shapes: a red circle and a large blue square", scene)
  assert not ok("a red circle below a blue square", scene)        # false relation
  assert not ok("a large red circle and a blue square", scene)    # false size
  assert not ok("a red circle", scene)                            # incomplete
  assert not ok("two squares: red and blue", scene)               # wrong shape
  assert not ok("", scene)
  _, scenes, captions = shapes.generate_split("test", 200, 64, seed=2)
  assert all(ok(c, s) for c, s in zip(captions, scenes))  # every true caption reads back


def test_text_nll_hand_value():
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  total, count = text_nll(logits, jnp.asarray([[0, 1]]), jnp.asarray([[True, False]]))
  assert float(count) == 1.0 and float(total) == pytest.approx(math.log(2.0), rel=1e-5)
