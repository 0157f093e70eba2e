"""Block-sparse attention kernels for the Transfusion mask, one module per backend and pass.

  api.py                    kernel choice, padding, plans, shard_map (the entry point)
  reference.py              the XLA reference every kernel is held against
  block_map.py              tile states, compacted work lists, the shared custom_vjp wiring
  triton.py                 Pallas Triton kernels (fwd, dk/dv, dq): GPUs other than Hopper
  mosaic_gpu.py             the Hopper op: Mosaic GPU forward + backward, config, schedule
  mosaic_gpu_fwd.py         its forward kernel
  mosaic_gpu_vjp.py         its backward: config, schedule, the kernels' order
  mosaic_gpu_vjp_dkv.py     the backward's dk/dv kernel
  mosaic_gpu_vjp_dq.py      the backward's recomputing dq kernel
  mosaic_gpu_vjp_ds.py      dq from the dk/dv kernel's stored dS^T tiles
  mosaic_gpu_common.py      pieces every Mosaic GPU kernel shares
  mosaic_tpu.py             Pallas Mosaic TPU kernels (fwd, dk/dv, dq)

Use `tfjax.ops.attention(..., impl="pallas"|"auto")` or `api.attention`.
"""
