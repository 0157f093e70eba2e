"""Training: mesh and sharding rules, TrainState, the pure step, the loop,
Orbax checkpoints, metrics, FLOPs, ahead-of-time compiles, the main job.

`train(config, workdir)` is the loop (tfjax/train/loop.py); `main_job.run`
adds the stages around it (dataset, VAE, latents, samples, report).
"""
