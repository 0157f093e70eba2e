"""The attention kernels' test configurations, shared by the kernel tests and
tools/kernel_lab/lowering.py (which records each case's lowered program).

Append new cases at the end of a list: tools/kernel_lab/lowered_programs.json
names the recorded programs by their position here.
"""
from __future__ import annotations

import jax.numpy as jnp

from tfjax.ops.kernels.mosaic_gpu_fwd import FwdConfig as Fwd
from tfjax.ops.kernels.mosaic_gpu_vjp import DqKernel, SdpGrouping
from tfjax.ops.kernels.mosaic_gpu_vjp import VjpConfig as Vjp

G, OWN_DELTA, RECOMPUTE = SdpGrouping.GROUPED, DqKernel.RECOMPUTE_OWN_DELTA, DqKernel.RECOMPUTE

MOSAIC_CASES = [
    # (head_dim, q_heads, kv_heads, seq, forward config)
    (64, 4, 2, 512, Fwd(num_stages=3, heads=2)),     # GQA, 2 heads per CTA (2 kv heads)
    (128, 2, 2, 384, Fwd()),                          # CTA rows (128) != key tile
    # MQA, narrow key tiles, grid order, heads inner
    (128, 4, 1, 512, Fwd(block_k=64, heads=4, lpt=False, heads_outer=False)),
    (64, 2, 2, 320, Fwd(block_k=64, num_stages=4, heads=2)),  # padded to 384
    (128, 2, 2, 384, Fwd(skip_empty=False)),          # no empty-tile skipping
    # three consumers: 192-row CTAs, the last one reaching past 512
    (64, 4, 2, 512, Fwd(consumers=3)),
    (128, 2, 2, 384, Fwd(block_k=64, heads=2, consumers=3)),  # 3 consumers, 2 heads
    (128, 4, 2, 448, Fwd(block_k=64, consumers=3)),   # the L>=8192 default, GQA
    # persistent grids of 5 and 3 CTAs (several items each, Q tiles in turn):
    # the L>=8192 default's tiles at 128 (GQA, the last CTA's rows past 448),
    # two consumers in ping-pong, and the head-dim-64 default (GQA, past 512)
    (128, 4, 2, 448, Fwd(block_k=64, consumers=3, persistent=True, persistent_ctas=5)),
    (64, 4, 2, 512, Fwd(persistent=True, persistent_ctas=3)),
    (64, 4, 2, 512, Fwd(consumers=3, persistent=True, persistent_ctas=5)),
]

MOSAIC_BWD_CASES = [
    # (head_dim, q_heads, kv_heads, seq, backward config; defaults: head dim 128's)
    # GQA, delta in dq
    (64, 4, 2, 512, Vjp(stages_dq=2, consumer_regs=232, sdp=G, dq=OWN_DELTA, consumers_dq=2)),
    # wide dq key tiles, S then dP
    (128, 2, 2, 384, Vjp(stages_dkv=3, block_k_dq=128, stages_dq=2, consumer_regs=232,
                         sdp=SdpGrouping.SEPARATE, dq=RECOMPUTE, consumers_dq=2)),
    # no skip, delta in dq
    (128, 2, 2, 384, Vjp(stages_dq=2, consumer_regs=232, sdp=G, skip_empty=False, dq=OWN_DELTA,
                         consumers_dq=2)),
    # three consumers in both kernels: the last 192-key and 192-row CTAs
    # reach past 512 (GQA, delta in dq); dq alone at head dim 128
    (64, 4, 2, 512, Vjp(stages_dq=2, consumer_regs=232, sdp=G, dq=OWN_DELTA, consumers_dkv=3)),
    (128, 2, 2, 320, Vjp(stages_dq=2, consumer_regs=232, sdp=G, dq=RECOMPUTE)),
    # 240 registers, S^T and dP^T apart in dk/dv only, GQA
    (128, 4, 2, 384, Vjp(stages_dq=2, dq=OWN_DELTA, consumers_dq=2)),
    # dq from the dk/dv kernel's dS^T tiles: the head-dim-128 kernels with a
    # 2-deep dq ring (GQA), and three consumers each at 64 past the end
    (128, 4, 2, 384, Vjp(stages_dq=2, ds_capacity=100)),
    (64, 2, 2, 320, Vjp(stages_dq=2, consumer_regs=232, sdp=G, consumers_dkv=3, ds_capacity=100)),
    # buffers of 30% and 60% of the dq lists' padded tiles, this layout
    # listing 53%: the cond takes the recomputing fallback
    # (`mosaic_gpu_vjp.recompute_config`), then the packed tiles
    (64, 2, 2, 384, Vjp(stages_dq=2, consumer_regs=232, sdp=G, consumers_dq=2)),
    (64, 2, 2, 384, Vjp(stages_dq=2, consumer_regs=232, sdp=G, consumers_dq=2, ds_capacity=60)),
    # the head-dim-128 default (3-deep dq ring, GQA) with a full buffer (the
    # packed tiles) and as it ships (30%: here the fallback)
    (128, 4, 2, 384, Vjp(ds_capacity=100)),
    (128, 4, 2, 384, Vjp()),
    # the persistent dk/dv kernel on 5 CTAs (several work items each, the
    # K/V buffers in turn): the head-dim-64 default (three consumers past the
    # end, delta in dq, GQA) and the head-dim-128 one storing dS^T tiles
    (64, 4, 2, 512, Vjp(stages_dq=2, consumer_regs=232, sdp=G, dq=OWN_DELTA, consumers_dkv=3,
                        persistent_dkv=True, persistent_ctas=5)),
    (128, 4, 2, 384, Vjp(ds_capacity=100, persistent_dkv=True, persistent_ctas=5)),
]

TRITON_CASES = [
    # (dtype, head_dim, q_heads, kv_heads, seq, block_q, block_k)
    (jnp.float32, 64, 4, 2, 256, 64, 64),     # GQA
    (jnp.bfloat16, 128, 2, 2, 256, 64, 128),  # unequal blocks
    (jnp.bfloat16, 64, 4, 1, 320, 128, 64),   # multi-query; padded to 384
    (jnp.float32, 128, 2, 1, 200, None, None),  # default blocks, padded
]

# Triton at its shipped tiles (lowering only: the dispatch's picks)
TRITON_DEFAULT_CASES = [
    (jnp.bfloat16, 64, 4, 2, 256, None, None),
    (jnp.bfloat16, 128, 4, 2, 256, None, None),
]
