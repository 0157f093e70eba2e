"""Jobs: the stage chain "data -> tokenizer -> VAE -> latents -> train -> samples
-> report" and its configurations.

  runner.py       Stage, Barrier, Job and run_stages (skip-if-done, timing)
  stages.py       the stages every job shares
  samples.py      the main job's samples stage and in-training sample grids
  transfusion.py  the main job (tfjax-train)
  chameleon.py    the Chameleon baseline (tfjax-chameleon)
  sweep.py        families x sizes x budgets, each run a job (tfjax-sweep)
"""
