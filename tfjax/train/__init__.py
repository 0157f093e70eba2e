"""Training: mesh and sharding rules, TrainState, the pure step, the loop,
Orbax checkpoints, metrics, FLOPs, ahead-of-time compiles.

`train(config, workdir)` is the loop (tfjax/train/loop.py); tfjax/jobs/ runs
the stages around it (dataset, VAE, latents, samples, report).
"""
