"""The pieces every Mosaic GPU attention kernel is built from.

Warpgroup register splits, per-warpgroup work lists, shared-memory layouts,
the partial-tile mask, a producer's ring of slots and a persistent grid's
work share. JAX 0.10 (CI) and 0.11 (the device) spell some Mosaic GPU calls
differently; the wrappers here take both.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from tfjax.ops.kernels.block_map import EMPTY, FULL, LOWER, UPPER, WorkList, coarsen, compact

LOG2E = math.log2(math.e)


class DqKernel(enum.Enum):
  """How the backward computes dq."""
  RECOMPUTE = "recompute"              # S and dP again; delta from one XLA pass
  RECOMPUTE_OWN_DELTA = "own_delta"    # the same, run first, delta from its own tiles
  FROM_DS = "from_ds"                  # one product per tile from the stored dS^T tiles


class SdpGrouping(enum.Enum):
  """Whether S and dP of a tile are issued as one wgmma group."""
  SEPARATE = "separate"     # S first, dP after the softmax, in both kernels
  GROUPED = "grouped"       # one group in both kernels
  DQ_ONLY = "dq_only"       # one group in the dq kernel only (dk/dv: fewer registers)


def warpgroup_registers(consumers: int, consumer_regs: int = 232) -> tuple[int, int]:
  """(consumer, producer) registers per thread: the SM's 64K over one CTA of
  `consumers` + 1 warpgroups of 128 threads; two consumers take 232 (producer
  40) or 240 (producer 24).

  Only these splits: `setmaxnreg` can hand out no more than the CTA was
  launched with (64K over its threads), and a request beyond that waits
  forever instead of failing.
  """
  if consumers not in (2, 3):
    raise ValueError(f"consumer warpgroups per CTA must be 2 or 3, got {consumers}")
  if consumers == 3:
    return 160, 24
  if consumer_regs not in (232, 240):
    raise ValueError(f"VjpConfig.consumer_regs must be 232 or 240, got {consumer_regs}: "
                     "two consumers and the producer share the SM's 64K registers")
  return consumer_regs, 40 if consumer_regs == 232 else 24


def length_multiple(consumers: int, block: int) -> int:
  """What a kernel whose CTAs split `consumers` blocks of `block` rows (or
  keys) needs the length to be a multiple of: two-consumer CTAs stay whole,
  three pad their last CTA themselves."""
  return 2 * block if consumers == 2 else block


def clamp_start(start, length: int, block: int, ragged: bool):
  """A warpgroup's first row (or key) for loads: inside the sequence.

  A surplus warpgroup of a ragged last CTA starts past the end; it reads the
  last real block instead (and stores nothing), so no input needs padding.
  """
  return lax.min(start, jnp.int32(length - block)) if ragged else start


def when_inside(pl, start, length: int, ragged: bool):
  """Decorator: run the body when a warpgroup's first row (or key) `start`
  lies inside the sequence; unconditionally when no CTA reaches past it."""
  if not ragged:
    return lambda body: body()
  return pl.when(start < length)


_PROFILE: dict = {}


@contextlib.contextmanager
def profiling(directory: str, space: int = 64):
  """A diagnostic: kernels traced inside record Mosaic GPU's in-kernel profile,
  one Perfetto trace per call in `directory`, with the start and end of every
  `jax.named_scope` region of each warpgroup (`space` regions per warpgroup;
  the buffer takes shared memory)."""
  _PROFILE.update(profile_dir=directory, profile_space=space)
  try:
    yield
  finally:
    _PROFILE.clear()


def mosaic_params(plgpu, lean: bool):
  """Compiler settings of every Mosaic GPU kernel here; `lean` drops Pallas's
  automatic warpgroup barriers and cross-warp reduction scratch."""
  params = dict(approx_math=True)
  if lean:
    params.update(unsafe_no_auto_barriers=True, reduction_scratch_bytes=0)
  params.update(_PROFILE)
  return plgpu.CompilerParams(**params)


def smem_transforms(plgpu, dtype, width, swizzle=128):
  """Tiling + swizzle of a shared-memory tile whose rows hold `width` elements
  (wgmma operands that meet in one instruction need the same swizzle)."""
  elem = jnp.dtype(dtype).itemsize
  swizzle = min(swizzle, width * elem)
  return (plgpu.TilingTransform((8, swizzle // elem)), plgpu.SwizzleTransform(swizzle))


def transposed(plgpu, ref):
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # jax 0.10


def load_vec(plgpu, ref, layout, optimized=False):
  try:
    return plgpu.load(ref, layout=layout, optimized=optimized)
  except TypeError:  # jax 0.10: the index is a positional argument
    return plgpu.load(ref, (), layout=layout, optimized=optimized)


def longest_first(counts):
  """Launch order of the flattened work lists, longest first: a shorter tail of
  lone CTAs at the end of the grid."""
  return jnp.argsort(-counts.reshape(-1), stable=True).astype(jnp.int32)


def warpgroup_schedule(states, per_cta: int, *, by_keys: bool = False
                       ) -> tuple[WorkList, jax.Array]:
  """A CTA's work lists and each consumer warpgroup's tile per entry.

  states: int32[batch, nq, nk] `block_map` states at one warpgroup's tile
    (`tile_states`), padded with empty tiles to whole CTAs on the side the
    CTAs split: rows, or keys when `by_keys`.
  Returns (lists, own): the compacted non-empty tiles of each CTA of
  per_cta warpgroups (`block_map.WorkList` over CTAs: key blocks, or query
  blocks when `by_keys`), and int32[batch, n_cta, per_cta, list], warpgroup
  w's own tile state at every entry. One tile-state pass serves both, and is
  shared by every schedule at the same tiling.
  """
  if by_keys:
    states = jnp.swapaxes(states, 1, 2)
  batch, n, m = states.shape
  lists = compact(coarsen(states, per_cta, 1))
  own = states.reshape(batch, n // per_cta, per_cta, m)
  return lists, jnp.take_along_axis(own, lists.blocks[:, :, None, :], axis=3)


def mask_tile(plgpu, s, state, key_axis: int, k0, lo, hi):
  """Logits s of keys k0.. (along key_axis) with -inf where a key lies outside
  its row's [k_start, k_end), by the tile's `block_map` state (a scalar):
  FULL keeps s, LOWER and UPPER test their one bound (one comparison per
  element), PARTIAL (and EMPTY) test both in one unsigned comparison,
  (k - k_start) < (k_end - k_start). lo(), hi(): the rows' int32 bounds as
  vectors along the other axis, in its reduced layout (called only by the
  branches that use them).

  """
  other = 1 - key_axis
  b = lambda x: lax.broadcast_in_dim(x, s.shape, [other])
  iota = lambda: plgpu.broadcasted_iota(jnp.int32, s.shape, key_axis, layout=plgpu.Layout.WGMMA)
  cut = lambda keep: jnp.where(keep, s, -jnp.inf)

  def both():
    u = lambda x: lax.bitcast_convert_type(x, jnp.uint32)
    start = lo()
    width = jnp.maximum(hi() - start, 0)  # a dead row (empty interval): 0
    return cut(u(iota() - b(start - k0)) < u(b(width)))

  branches = [lambda: s, both, lambda: cut(iota() >= b(lo() - k0)),
              lambda: cut(iota() < b(hi() - k0))]
  # Anything else tests both bounds: PARTIAL, and EMPTY where a kernel runs
  # without skip_empty (its rows then meet no key: all -inf).
  index = jnp.where(state == FULL, 0, jnp.where(state == LOWER, 2,
                                                jnp.where(state == UPPER, 3, 1)))
  return lax.switch(index, branches)


def fill_ring(pl, n, stages, issue, refill):
  """A producer warpgroup's ring of `stages` shared-memory slots: items 0 ..
  stages-1 (of n) by issue(t, slot) at once, then item t + stages into slot
  t mod stages by refill(t + stages, slot), which waits for the slot first."""
  for i in range(stages):
    pl.when(i < n)(functools.partial(issue, jnp.int32(i), i))

  @pl.loop(0, jnp.maximum(n - stages, 0))
  def _(t):
    slot = lax.rem(t, jnp.int32(stages))
    refill(t + stages, slot)


def continue_ring(n, stages, g0, issue):
  """A persistent producer's ring running on from one work item to the next:
  the item's n tiles into slots g0, g0 + 1, ... mod `stages` by issue(t,
  slot, g), g counting the CTA's tiles so far (where g >= stages the slot
  holds an earlier tile, to be released first). Returns the count after the
  item."""

  def one(t, g):
    issue(t, lax.rem(g, jnp.int32(stages)), g)
    return g + 1

  return lax.fori_loop(0, n, one, g0)


def unless_empty(skip_empty, state, tile, skip):
  """A consumer's step over one listed tile: tile() (the products), or, with
  skip_empty, skip() where its own part of the tile is EMPTY (the same
  barrier waits and releases, no products; the outputs unchanged)."""
  return lax.cond(state == EMPTY, skip, tile) if skip_empty else tile()


def persistent_share(n_items: int, n_ctas: int, heads: int, order_ref):
  """A persistent CTA's work items: (how many, i -> (head, order entry)).

  CTA c takes ranks i * n_ctas + (c, or n_ctas - 1 - c on odd rounds) of
  the n_items (head, order entry) pairs, the entries sorted longest list
  first (snake order keeps the CTAs' sums of work close) and the `heads`
  heads of one entry at adjacent ranks.
  """
  c = lax.axis_index("cta")
  rounds, rem = divmod(n_items, n_ctas)
  snake = lambda i: jnp.where(lax.rem(i, 2) == 0, c, n_ctas - 1 - c)
  n_mine = rounds + (snake(jnp.int32(rounds)) < rem).astype(jnp.int32)

  def share(i):
    r = i * n_ctas + snake(i)
    entry = order_ref[lax.div(r, jnp.int32(heads))]
    return lax.rem(r, jnp.int32(heads)), entry

  return n_mine, share


def sm_count() -> int:
  """Streaming multiprocessors of the first GPU (a persistent grid's size);
  132 (an H100/H200 SXM) where no GPU is attached, as when lowering on a CPU."""
  try:
    return int(jax.devices("gpu")[0].core_count)
  except (RuntimeError, AttributeError, IndexError):
    return 132


def products_in_one_group(plgpu, pl, pairs, shape):
  """(a @ b for each (a, b) in pairs): float32 [shape] products issued as one
  wgmma group into fresh accumulators (S and dP of a tile, transposed or not)."""
  def issue(refs):
    for acc_ref, (a, b) in zip(refs, pairs):
      plgpu.wgmma(acc_ref, a, b)

  zeros = lambda: plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)
  return pl.run_state(issue)(tuple(plgpu.ACC.init(zeros()) for _ in pairs))


def grid_position(blocks: str):
  """(q head, key chunk or query CTA, batch row, warpgroup) of the running
  thread in the backward kernels' grid (heads, `blocks`, batch) x warpgroups."""
  return tuple(lax.axis_index(n) for n in ("heads", blocks, "batch", "wg"))
