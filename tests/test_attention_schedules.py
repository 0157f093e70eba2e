"""The attention plan's pieces against the dense Transfusion mask: key
intervals, tile states, work lists, and the Mosaic GPU kernels' per-warpgroup
schedules and dS^T routes (pure XLA, any backend)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_layouts import random_layout

from tfjax.ops.kernels import block_map as bmap
from tfjax.ops.kernels import mosaic_gpu_fwd, mosaic_gpu_vjp
from tfjax.ops.kernels.mosaic_gpu_vjp import DqKernel, VjpConfig
from tfjax.ops.mask import key_ranges, transfusion_mask


@pytest.mark.parametrize("seed", range(4))
def test_key_ranges_and_tile_states_match_mask(seed):
  rng = np.random.default_rng(seed)
  seg, img = random_layout(rng, 3, 512)
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  mask = transfusion_mask(seg, img)
  ks, ke = key_ranges(seg, img)
  kpos = jnp.arange(512)[None, None, :]
  assert bool(jnp.all(mask == ((kpos >= ks[..., None]) & (kpos < ke[..., None]))))
  for bq, bk in ((64, 64), (128, 64), (64, 128)):
    got = bmap.tile_states(ks, ke, bq, bk)
    want = bmap.dense_tile_states(mask, bq, bk)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_bound_tiles_need_only_that_bound():
  """split_partial: a LOWER tile's mask is k >= k_start alone and an UPPER
  tile's k < k_end alone (what the Mosaic kernels test on them), for every
  row, padding rows included; collapsed, the states are tile_states' and
  coarsen reads them alike."""
  rng = np.random.default_rng(3)
  seg, img = random_layout(rng, 2, 512)
  seg[1, -90:] = 0  # padding rows: their tiles test both bounds
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = (np.asarray(x) for x in key_ranges(seg, img))
  mask = np.asarray(transfusion_mask(seg, img))
  kpos = np.arange(512)
  for bq, bk in ((64, 64), (64, 128)):
    plain = bmap.tile_states(jnp.asarray(ks), jnp.asarray(ke), bq, bk)
    split = np.asarray(bmap.tile_states(jnp.asarray(ks), jnp.asarray(ke), bq, bk,
                                        split_partial=True))
    np.testing.assert_array_equal(np.where(split >= bmap.LOWER, bmap.PARTIAL, split), plain)
    np.testing.assert_array_equal(bmap.coarsen(jnp.asarray(split), 2, 1),
                                  bmap.coarsen(plain, 2, 1))
    for kind, bound in ((bmap.LOWER, kpos[None, :] >= ks[:, :, None]),
                        (bmap.UPPER, kpos[None, :] < ke[:, :, None])):
      tiles = np.argwhere(split == kind)
      assert len(tiles) > 3
      for b, i, j in tiles:
        rows, keys = slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk)
        np.testing.assert_array_equal(mask[b, rows, keys], bound[b, rows, keys])
    dead = np.asarray(ke <= ks).reshape(2, -1, bq).any(axis=-1)   # blocks with padding rows
    assert np.all(np.isin(split[dead], (bmap.EMPTY, bmap.PARTIAL)))


def test_coarsened_tile_states_match_the_mask():
  """States of tile groups from the fine states (what the Mosaic schedules
  share) equal the dense mask's at the coarse tiling; padding adds empty."""
  rng = np.random.default_rng(5)
  seg, img = random_layout(rng, 2, 768)
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = key_ranges(seg, img)
  mask = transfusion_mask(seg, img)
  fine = bmap.tile_states(ks, ke, 64, 64)
  for fq, fk in ((2, 2), (3, 1), (1, 3), (2, 1)):
    got = bmap.coarsen(fine, fq, fk)
    want = bmap.dense_tile_states(mask, 64 * fq, 64 * fk)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  padded = np.asarray(bmap.pad_states(fine, 14, 15))
  assert padded.shape == (2, 14, 15)
  np.testing.assert_array_equal(padded[:, :12, :12], np.asarray(fine))
  assert np.all(padded[:, 12:] == bmap.EMPTY) and np.all(padded[:, :, 12:] == bmap.EMPTY)


def test_work_lists_are_the_nonempty_tiles():
  rng = np.random.default_rng(7)
  seg, img = random_layout(rng, 2, 512)
  ks, ke = key_ranges(jnp.asarray(seg), jnp.asarray(img))
  bm = bmap.block_map(ks, ke, 64, 128)
  states = np.asarray(bmap.tile_states(ks, ke, 64, 128))
  for wl, st in ((bm.q_blocks, states), (bm.kv_blocks, states.transpose(0, 2, 1))):
    blocks, full, counts = map(np.asarray, wl)
    for b in range(st.shape[0]):
      for i in range(st.shape[1]):
        n = counts[b, i]
        want = np.nonzero(st[b, i])[0]
        np.testing.assert_array_equal(blocks[b, i, :n], want)
        np.testing.assert_array_equal(full[b, i, :n], st[b, i, want] == bmap.FULL)
        assert np.all(blocks[b, i, n:] == (want[-1] if n else 0))
        assert np.all(full[b, i, n:] == 0)


@pytest.mark.parametrize("n_dkv,n_dq", [(2, 3), (3, 3), (2, 2)])
def test_ds_route_gives_every_visited_dq_tile_the_row_its_dkv_consumer_stored(n_dkv, n_dq):
  """dq_from_ds: every tile a dk/dv consumer computes gets its own row of the
  head's packed buffer, below the total, and each tile a dq consumer computes
  reads the row that the dk/dv consumer owning its key block stored for that
  query tile; the rows are packed key chunk after key chunk."""
  rng = np.random.default_rng(5)
  seg, img = random_layout(rng, 2, 512)
  ks, ke = key_ranges(jnp.asarray(seg), jnp.asarray(img))
  sched = mosaic_gpu_vjp.bwd_schedule(ks, ke, VjpConfig(
      consumers_dkv=n_dkv, consumers_dq=n_dq, dq=DqKernel.FROM_DS))
  kv_blocks, kv_counts, kv_states = map(np.asarray, sched.dkv[:3])
  q_blocks, q_counts, q_states = map(np.asarray, sched.dq)
  rows, dq_rows, total = (np.asarray(x) for x in sched.ds_route)
  stored = {}  # row -> (batch, query tile, key block)
  for b in range(2):
    for j in range(kv_counts.shape[1]):
      for t in range(kv_counts[b, j]):
        for w in range(n_dkv):
          if kv_states[b, j, w, t] != bmap.EMPTY:
            r = int(rows[b, j, w, t])
            assert 0 <= r < total and r not in stored
            stored[r] = (b, int(kv_blocks[b, j, t]), j * n_dkv + w)
  assert int(total) == (kv_counts * n_dkv).sum()
  visited = 0
  for b in range(2):
    for qi in range(q_counts.shape[1]):
      for t in range(q_counts[b, qi]):
        for c in range(n_dq):
          if q_states[b, qi, c, t] != bmap.EMPTY:
            assert stored[int(dq_rows[b, qi, t, c])] == (b, qi * n_dq + c, int(q_blocks[b, qi, t]))
            visited += 1
  assert visited == len(stored) > 20  # 45 of the 64 tiles of this layout


@pytest.mark.parametrize("consumers", [2, 3])
def test_mosaic_schedules_give_each_warpgroup_its_own_tiles(consumers):
  """The Mosaic kernels' schedules (CTAs of `consumers` warpgroups, 64 rows or
  keys each; with 3 the last CTA reaches past 512): every CTA lists exactly
  the key (query) blocks its warpgroups meet, and each warpgroup's state per
  entry is the dense mask's state of its own tile; beyond the sequence, empty."""
  rng = np.random.default_rng(11)
  seg, img = random_layout(rng, 2, 512)
  seg, img = jnp.asarray(seg), jnp.asarray(img)
  ks, ke = key_ranges(seg, img)
  cta = consumers * 64
  padded = -(-512 // cta) * cta
  mask = np.zeros((2, padded, padded), bool)
  mask[:, :512, :512] = np.asarray(transfusion_mask(seg, img))
  fwd = mosaic_gpu_fwd.fwd_schedule(
      ks, ke, mosaic_gpu_fwd.FwdConfig(64, 64, consumers=consumers))
  bwd = mosaic_gpu_vjp.bwd_schedule(ks, ke, VjpConfig(
      consumers_dkv=consumers, consumers_dq=consumers, dq=DqKernel.RECOMPUTE))
  by_rows = np.asarray(bmap.dense_tile_states(jnp.asarray(mask[:, :, :512]), 64, 64))
  by_keys = np.asarray(bmap.dense_tile_states(jnp.asarray(mask[:, :512]), 64, 64))
  by_keys = by_keys.transpose(0, 2, 1)
  one_bound = lambda states: np.where(states >= bmap.LOWER, bmap.PARTIAL, states)
  for (blocks, counts, states), dense in (
      (fwd[1:], by_rows), (bwd.dq, by_rows), (bwd.dkv[:3], by_keys)):
    blocks, counts, states = map(np.asarray, (blocks, counts, states))
    states = one_bound(states)  # LOWER/UPPER: partial tiles testing one bound
    assert blocks.shape[1] == padded // cta and states.shape[2] == consumers
    for b in range(2):
      for c in range(blocks.shape[1]):
        own = dense[b, c * consumers:(c + 1) * consumers]   # [consumers, other side]
        n = counts[b, c]
        np.testing.assert_array_equal(blocks[b, c, :n], np.nonzero(own.any(axis=0))[0])
        np.testing.assert_array_equal(states[b, c, :, :n], own[:, blocks[b, c, :n]])
  assert np.all(by_rows[:, 512 // 64:] == bmap.EMPTY)

