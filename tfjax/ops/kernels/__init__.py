"""Block-sparse attention kernels for the Transfusion mask.

  block_map.py  per-tile empty/full/partial states and compacted work lists
  gpu.py        Pallas kernels, Triton lowering (fwd, dk/dv, dq), custom_vjp
  tpu.py        Pallas kernels, Mosaic TPU lowering, custom_vjp
  dispatch.py   backend choice, padding, shard_map over batch/heads

Import `dispatch` (or use `tfjax.ops.attention(..., impl="pallas"|"auto")`).
"""
