"""The dq_from_ds backward with dq overlapped (MosaicBwdConfig.overlap_dq).

dq from stored dS^T tiles (`gpu_mosaic_bwd_ds.dq_from_ds`) is bound by memory
bandwidth: on half the SMs it runs nearly as fast as on all of them, while the
dk/dv kernel is latency-bound on every SM (NOTES_attention.md M45). Run
separately, each leaves the other's resource idle. Here the q heads go in
`overlap_dq` groups and the launches are

  dk/dv(group 0), [dk/dv(group 1) | dq(group 0)], ..., dq(last group)

where [a | b] is one grid whose CTAs do either a's or b's work, interleaved in
launch order (`interleave`), so that dq's CTAs of one group run among dk/dv's
of the next. A group's dq needs all of that group's dS^T tiles, which the
launch before wrote: the launch boundary is the only synchronisation. The
outputs (dk, dv, the dS^T buffer, dq) are mutable refs that every launch
writes its heads of in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tfjax.ops.kernels.gpu_mosaic_bwd import KernelParts, _launch_with_refs


def head_groups(cfg, q_heads: int) -> int:
  """Groups the overlapped backward splits q_heads into: cfg.overlap_dq, or the
  largest divisor of q_heads below it; under 2 (no overlap possible) 0."""
  g = min(cfg.overlap_dq, q_heads)
  while g > 1 and q_heads % g:
    g -= 1
  return g if g >= 2 else 0


def interleave(n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
  """(role, index) int32[n_a + n_b]: CTA i runs kernel a's CTA index[i]
  (role 0) or kernel b's (role 1), b's CTAs spread evenly over the launch
  order (CTA i is b's where floor((i + 1) r) > floor(i r), r = n_b / n)."""
  n = n_a + n_b
  i = np.arange(n, dtype=np.int64)
  role = ((i + 1) * n_b // n - i * n_b // n).astype(np.int32)
  index = np.where(role == 1, np.cumsum(role) - 1, np.cumsum(1 - role) - 1)
  return role, index.astype(np.int32)


def run_side_by_side(a: KernelParts, b: KernelParts):
  """One launch doing the CTAs of kernel a and of kernel b (`interleave`): each
  CTA runs one of the two bodies, in shared memory that the two alias (a
  `plgpu.RefUnion`), with both kernels' barriers. Inputs passed to both (the
  same array or ref) are passed once. Returns a's outputs then b's."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  if a.threads != b.threads:
    raise ValueError(f"side-by-side kernels need equal warpgroups, got {a.threads} and "
                     f"{b.threads} (overlap_dq needs consumers_dkv == consumers_dq == 2)")
  inputs, where = [], {}
  for x in a.inputs + b.inputs:
    if id(x) not in where:
      where[id(x)] = len(inputs)
      inputs.append(x)
  pick_a = [where[id(x)] for x in a.inputs]
  pick_b = [where[id(x)] for x in b.inputs]
  role, index = interleave(a.ctas, b.ctas)
  n_in, n_out_a = len(inputs), len(a.out_type)

  def entry(role_ref, index_ref, *refs):
    outs = refs[n_in:]
    refs_a = [refs[j] for j in pick_a] + list(outs[:n_out_a])
    refs_b = [refs[j] for j in pick_b] + list(outs[n_out_a:])

    def body(union, *barriers):
      smem_a, smem_b = union
      bars_a, bars_b = barriers[:len(a.barriers)], barriers[len(a.barriers):]
      cta = lax.axis_index("cta")
      i = index_ref[cta]
      role_here = role_ref[cta]

      @pl.when(role_here == 0)
      def _():
        a.body(*refs_a, (smem_a, *bars_a), position=lambda: a.position(i))

      @pl.when(role_here == 1)
      def _():
        b.body(*refs_b, (smem_b, *bars_b), position=lambda: b.position(i))

    pl.run_scoped(body, plgpu.RefUnion(a.smem, b.smem), *a.barriers, *b.barriers,
                  collective_axes="wg")

  return _launch_with_refs(entry, list(a.out_type) + list(b.out_type),
                           (jnp.asarray(role), jnp.asarray(index), *inputs), grid=(len(role),),
                           grid_names=("cta",), threads=a.threads, lean=a.lean)


def backward_from_ds(q, k, v, do, lse, delta, ks, ke, sched, *, scale, cfg, groups: int):
  """(dq, dk, dv per q head) of the dq_from_ds backward in `groups` head
  groups, dq of each group beside dk/dv of the next (module docstring)."""
  from tfjax.ops.kernels import gpu_mosaic_bwd_ds as from_ds
  from tfjax.ops.kernels import gpu_mosaic_bwd_two_kernel as two_kernel

  hq = q.shape[2]
  per = hq // groups
  route = sched.ds_route

  def dkv(g, **kw):
    return two_kernel.dkv(q, k, v, do, lse, delta, ks, ke, sched.dkv, scale=scale, cfg=cfg,
                          ds_route=route, heads=(g * per, per), **kw)

  def dq(g, dst, **kw):
    return from_ds.dq_from_ds(k, dst, route, sched.dq, scale=scale, cfg=cfg, q_shape=q.shape,
                              heads=(g * per, per), **kw)

  dk, dv, dst = (jax.new_ref(x) for x in dkv(0))
  dq_ref = None
  for g in range(1, groups):
    outs = run_side_by_side(dkv(g, into=(dk, dv, dst), parts=True),
                            dq(g - 1, dst, into=dq_ref, parts=True))
    if dq_ref is None:
      dq_ref = jax.new_ref(outs[0])
  dq(groups - 1, dst, into=dq_ref)
  return dq_ref[...], dk[...], dv[...]
