"""CIDEr-D (Vedantam, Zitnick and Parikh, CVPR 2015), written from the paper.

For each n in 1..4, every sentence becomes a TF-IDF vector over its n-grams:

  g_k(s) = tf_k(s) * log(|I| / max(1, df_k))

where |I| is the number of images being scored and df_k the number of images
whose reference set contains n-gram k (document frequency counts references
only). CIDEr-D for a candidate c against references S = {s_1 .. s_m} is

  CIDEr-D_n(c, S) = 10/m * sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                    * <min(g(c), g(s_j)), g(s_j)> / (|g(c)| |g(s_j)|)
  CIDEr-D(c, S)   = 1/4 * sum_n CIDEr-D_n(c, S)

with sigma = 6 and l() the sentence length in words. The min() clips the
candidate's n-gram weights by the reference's, which is what stops a candidate
gaining by repeating a confident n-gram.

`term_frequency` picks tf: "count" (raw n-gram counts, the convention of the
COCO caption evaluation server, so numbers compare with published COCO CIDEr)
or "normalized" (counts divided by the number of n-grams in the sentence, the
paper's equation 1). They agree unless the clipping binds. The corpus-level
score is the mean over images.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Mapping, Sequence

Ngrams = collections.Counter

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(sentence: str) -> list[str]:
  """Lower-cases and splits on anything that is not a letter or digit."""
  return _WORD.findall(sentence.lower())


def ngram_counts(words: Sequence[str], n: int) -> Ngrams:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _tfidf(counts: Ngrams, df: Mapping[tuple[str, ...], int], log_num_images: float,
           term_frequency: str) -> tuple[dict[tuple[str, ...], float], float]:
  """TF-IDF weights and their L2 norm for one sentence's n-grams of one order."""
  total = sum(counts.values())
  vec = {}
  for gram, count in counts.items():
    tf = count / total if term_frequency == "normalized" else float(count)
    vec[gram] = tf * (log_num_images - math.log(max(1.0, df.get(gram, 0))))
  return vec, math.sqrt(sum(x * x for x in vec.values()))


def _clipped_cosine(cand: dict, cand_norm: float, ref: dict, ref_norm: float) -> float:
  if cand_norm == 0.0 or ref_norm == 0.0:
    return 0.0
  dot = sum(min(w, ref[g]) * ref[g] for g, w in cand.items() if g in ref)
  return dot / (cand_norm * ref_norm)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
            max_n: int = 4, sigma: float = 6.0,
            term_frequency: str = "count") -> tuple[float, list[float]]:
  """Corpus CIDEr-D.

  Args:
    candidates: one generated caption per image, `[num_images]`.
    references: the human captions of each image, `[num_images][m_i]`, m_i >= 1.
    max_n: highest n-gram order (4 in the paper).
    sigma: width of the length penalty (6 in the paper).
    term_frequency: "count" (COCO server convention) or "normalized" (paper).

  Returns:
    (mean score, per-image scores).
  """
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
  if term_frequency not in ("count", "normalized"):
    raise ValueError(f"term_frequency must be 'count' or 'normalized', got {term_frequency!r}")
  for i, refs in enumerate(references):
    if not refs:
      raise ValueError(f"image {i} has no reference captions")
  if not candidates:
    return 0.0, []
  cand_words = [tokenize(c) for c in candidates]
  ref_words = [[tokenize(r) for r in refs] for refs in references]
  log_num_images = math.log(float(len(candidates)))
  per_image = [0.0] * len(candidates)
  for n in range(1, max_n + 1):
    df: collections.Counter = collections.Counter()
    for refs in ref_words:
      df.update(set().union(*(ngram_counts(r, n).keys() for r in refs)))
    for i, (cw, refs) in enumerate(zip(cand_words, ref_words)):
      cvec, cnorm = _tfidf(ngram_counts(cw, n), df, log_num_images, term_frequency)
      total = 0.0
      for rw in refs:
        rvec, rnorm = _tfidf(ngram_counts(rw, n), df, log_num_images, term_frequency)
        penalty = math.exp(-((len(cw) - len(rw)) ** 2) / (2.0 * sigma ** 2))
        total += penalty * _clipped_cosine(cvec, cnorm, rvec, rnorm)
      per_image[i] += 10.0 * total / len(refs) / max_n
  return sum(per_image) / len(per_image), per_image
