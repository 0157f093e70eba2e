"""Copy of ../shared/bench/attention_layout.py (the GPU machine receives only the
project tree); keep it identical below this line.

Deterministic packed Transfusion layout shared by every benchmark (torch and JAX).

mask(q, k) = doc[q] == doc[k] and (k <= q or (img[q] == img[k] and img[q] > 0))

Layout per sequence (each sequence b has its own RNG stream default_rng([seed, b]),
so the L=4096 layout is the prefix of the L=8192 one):
  fill with documents until the sequence is full, truncate the last at L.
  50% image-caption pairs: caption of U[20,60] text tokens, BOI, 256 image patches,
     EOI; 80% caption first, 20% image first (BOI, 256, EOI, caption).
  50% text-only documents of U[200,1500] tokens.
BOI/EOI are text tokens (img=0); only the 256 patch positions carry the image id.
doc ids start at 1 per sequence; image ids are unique positive ints per sequence.
"""
import numpy as np

N_PATCH = 256
SEED = 0


def make_layout(B, L, seed=SEED):
    doc = np.zeros((B, L), np.int32)
    img = np.zeros((B, L), np.int32)
    for b in range(B):
        rng = np.random.default_rng([seed, b])
        pos, d, im = 0, 0, 0
        while pos < L:
            d += 1
            toks_img = []  # per-token image flag for this document
            if rng.random() < 0.5:
                cap = int(rng.integers(20, 61))
                im += 1
                image = [0] + [im] * N_PATCH + [0]  # BOI, patches, EOI
                if rng.random() < 0.8:
                    toks_img = [0] * cap + image
                else:
                    toks_img = image + [0] * cap
            else:
                toks_img = [0] * int(rng.integers(200, 1501))
            n = min(len(toks_img), L - pos)
            doc[b, pos:pos + n] = d
            img[b, pos:pos + n] = np.asarray(toks_img[:n], np.int32)
            pos += n
    return doc, img


def dense_mask(doc, img):
    """(B, L, L) bool, [b, q, k]."""
    L = doc.shape[1]
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = np.arange(L)[None, :, None] >= np.arange(L)[None, None, :]
    same_img = (img[:, :, None] == img[:, None, :]) & (img[:, :, None] > 0)
    return same_doc & (causal | same_img)


def _runs(x):
    """Lengths of maximal runs of equal values (returns list of (value, length))."""
    out = []
    start = 0
    for i in range(1, len(x) + 1):
        if i == len(x) or x[i] != x[start]:
            out.append((int(x[start]), i - start))
            start = i
    return out


def counts(doc, img):
    """Per-sequence allowed-pair counts, closed form (no L^2 memory).

    returns dict of int arrays (per sequence):
      transfusion: the Transfusion mask
      doc_causal : same doc and k <= q (what a causal+segment_ids kernel computes)
      causal     : k <= q
      full       : L*L
    """
    B, L = doc.shape
    tf, dc = [], []
    for b in range(B):
        n_dc = sum(n * (n + 1) // 2 for _, n in _runs(doc[b]))
        # each image span adds its strict upper triangle (bidirectional inside span)
        extra = sum(m * (m - 1) // 2 for v, m in _runs(img[b]) if v > 0)
        dc.append(n_dc)
        tf.append(n_dc + extra)
    B_ = np.ones(B, np.int64)
    return dict(transfusion=np.asarray(tf, np.int64), doc_causal=np.asarray(dc, np.int64),
                causal=B_ * (L * (L + 1) // 2), full=B_ * L * L)


def make_inputs(B, L, H, D, seed=1):
    """Random normal q, k, v, dO as float32 numpy arrays of shape (B, L, H, D)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, L, H, D), dtype=np.float32) for _ in range(4)]


def block_stats(mask_bl, bs):
    """mask_bl: (L, L) bool for one sequence. Counts of bs x bs tiles that are
    empty / full / partial."""
    L = mask_bl.shape[0]
    t = mask_bl.reshape(L // bs, bs, L // bs, bs).sum(axis=(1, 3))
    full = int((t == bs * bs).sum())
    empty = int((t == 0).sum())
    return dict(tiles=(L // bs) ** 2, full=full, partial=(L // bs) ** 2 - full - empty, empty=empty)


if __name__ == "__main__":
    import json, sys
    B = 2
    for L in (4096, 8192):
        doc, img = make_layout(B, L)
        c = counts(doc, img)
        m = dense_mask(doc, img)
        assert int(m[0].sum()) == c["transfusion"][0] and int(m[1].sum()) == c["transfusion"][1]
        print(L, {k: (v / L / L).round(4).tolist() for k, v in c.items()})


def k_ranges(doc, img):
    """The Transfusion mask as one key interval per query row:
    allowed k = [k_start[q], k_end[q]) with k_start = first position of q's document and
    k_end = q+1 for text tokens, (last position of q's image span)+1 for image tokens.
    (Union of the causal prefix of the document and the contiguous image span.)"""
    B, L = doc.shape
    ks = np.zeros((B, L), np.int32)
    ke = np.zeros((B, L), np.int32)
    for b in range(B):
        pos = 0
        for _, n in _runs(doc[b]):
            ks[b, pos:pos + n] = pos
            pos += n
        ke[b] = np.arange(1, L + 1)
        pos = 0
        for v, n in _runs(img[b]):
            if v > 0:
                ke[b, pos:pos + n] = pos + n
            pos += n
    return ks, ke
