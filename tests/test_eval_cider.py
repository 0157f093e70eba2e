"""CIDEr-D against values worked out by hand from the paper's equations."""
import math

import pytest

from tfjax.eval.cider import cider_d, tokenize


def test_two_images_all_orders():
  # |I| = 2, so idf = log(2) for every n-gram except "a" (in both images: 0)
  # and candidate-only n-grams get log(2 / max(1, 0)) = log(2) too.
  # Image A is its own reference: cosine 1 for n = 1, 2, 3; no 4-grams -> 0.
  #   score_A = 10 * (1 + 1 + 1 + 0) / 4 = 7.5
  # Image B "a red square" vs "a blue square": unigrams share only "square"
  # (weights L, L; norms sqrt(2) L each): cosine 1/2; no shared 2-, 3-grams.
  #   score_B = 10 * 0.5 / 4 = 1.25
  mean, per = cider_d(["a red circle", "a red square"],
                      [["a red circle"], ["A blue square."]])
  assert per == pytest.approx([7.5, 1.25])
  assert mean == pytest.approx(4.375)


def _pen(lc, lr):
  return math.exp(-(lc - lr) ** 2 / 72.0)  # sigma = 6


def test_clipping_length_penalty_and_tf_modes():
  cands = ["red red red circle", "blue square", "green"]
  refs = [["red circle", "a red circle"], ["blue square"], ["green triangle"]]
  # Every unigram appears in one image's references: idf = log 3 =: K for all,
  # and K cancels inside each cosine.
  # Image 1, raw counts: cand (red 3, circle 1), |c| = sqrt(10).
  #   ref "red circle": clipped dot min(3,1)*1 + 1*1 = 2, |r| = sqrt(2)
  #   ref "a red circle": dot 2, |r| = sqrt(3)
  s1 = 10 * (_pen(4, 2) * 2 / math.sqrt(20) + _pen(4, 3) * 2 / math.sqrt(30)) / 2
  s2 = 10.0
  s3 = 10 * _pen(1, 2) * 1 / math.sqrt(2)
  mean, per = cider_d(cands, refs, max_n=1)
  assert per == pytest.approx([s1, s2, s3])
  assert mean == pytest.approx((s1 + s2 + s3) / 3)
  # Paper's normalized tf: cand (red 3/4, circle 1/4).
  #   ref (1/2, 1/2): dot min(3/4,1/2)/2 + (1/4)/2 = 3/8
  #   ref (1/3, 1/3, 1/3): dot (1/3)/3 + (1/4)/3 = 7/36
  nc = math.sqrt(0.5625 + 0.0625)
  n1 = 10 * (_pen(4, 2) * (3 / 8) / (nc * math.sqrt(0.5))
             + _pen(4, 3) * (7 / 36) / (nc * math.sqrt(1 / 3))) / 2
  # Image 3: cand (green 1) vs ref (1/2, 1/2): clipped dot 1/4.
  n3 = 10 * _pen(1, 2) * 0.25 / math.sqrt(0.5)
  _, per_n = cider_d(cands, refs, max_n=1, term_frequency="normalized")
  assert per_n == pytest.approx([n1, s2, n3])
  assert per_n[0] != pytest.approx(s1)  # clipping binds: the modes differ


def test_errors_and_tokenizer():
  assert tokenize("A Red, circle!") == ["a", "red", "circle"]
  with pytest.raises(ValueError, match="reference sets"):
    cider_d(["a"], [])
  with pytest.raises(ValueError, match="image 0 has no reference"):
    cider_d(["a"], [[]])
