"""The shapes pixel checker: right on ground truth, near zero on noise."""
import numpy as np
import pytest
from scipy import ndimage

from tfjax.data import shapes
from tfjax.eval import shapes_checker


@pytest.fixture(scope="module")
def test_split():
  images, scenes, _ = shapes.generate_split("test", 200, 64, seed=3)
  return images, scenes


def test_ground_truth_scores_at_least_99_percent(test_split):
  images, scenes = test_split
  result = shapes_checker.accuracy(images, scenes)
  assert result["num_images"] == 200
  assert result["accuracy"] >= 0.99, result
  for cat in ("presence", "count", "color", "shape", "position", "size"):
    assert result["per_category"][cat] >= 0.99, (cat, result)
  assert 0 < result["counts"]["position"] < 200  # only multi-object scenes


def test_noise_scores_near_zero(test_split):
  _, scenes = test_split
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (100, 64, 64, 3), dtype=np.uint8)
  result = shapes_checker.accuracy(noise, scenes[:100])
  assert result["accuracy"] <= 0.02, result


def test_wrong_scene_and_degraded_images(test_split):
  images, scenes = test_split
  shuffled = shapes_checker.accuracy(images, scenes[1:] + scenes[:1])
  assert shuffled["accuracy"] <= 0.1, shuffled
  # A blurred, noisy copy (roughly what a VAE decode does) still mostly passes.
  rng = np.random.default_rng(1)
  blurred = ndimage.gaussian_filter(images[:100].astype(np.float32), sigma=(0, 0.7, 0.7, 0))
  degraded = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255)
  assert shapes_checker.accuracy(degraded, scenes[:100])["accuracy"] >= 0.95


def test_detect_reads_back_a_known_scene():
  scene = {"objects": [dict(shape="triangle", color="red", size="large", x=0.3, y=0.3),
                       dict(shape="square", color="blue", size="small", x=0.75, y=0.75)],
           "background": [15, 15, 15]}
  dets = sorted(shapes_checker.detect(shapes.render(scene, 128)), key=lambda d: d.color)
  assert [(d.shape, d.color, d.size) for d in dets] == [("square", "blue", "small"),
                                                         ("triangle", "red", "large")]
  assert dets[1].x == pytest.approx(0.3, abs=0.02) and dets[1].y == pytest.approx(0.3, abs=0.02)
  with pytest.raises(ValueError, match="shape"):
    shapes_checker.detect(np.zeros((8, 8)))


def test_eval_overrides_set_config_keys_and_refuse_model_keys():
  from tfjax.config import default_config
  from tfjax.eval.suite import apply_overrides
  c = default_config()
  apply_overrides(c, ["editing.max_objects=2", "editing.object_sizes=large",
                      "diffusion.cfg_scale=3.5"])
  assert c.editing.max_objects == 2 and c.editing.object_sizes == "large"
  assert c.diffusion.cfg_scale == 3.5
  with pytest.raises(ValueError, match="model keys"):
    apply_overrides(c, ["model.dim=64"])
  with pytest.raises(ValueError, match="editing.nope"):
    apply_overrides(c, ["editing.nope=1"])
  with pytest.raises(ValueError, match="KEY=VALUE"):
    apply_overrides(c, ["editing.max_objects"])
