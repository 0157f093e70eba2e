"""Experiment sweeps' evaluation and results (the sweep job itself: tfjax/jobs/sweep.py).

  evaluate.py  the per-run evaluation shared by Transfusion and Chameleon runs
  plots.py     power-law fits, parity-FLOP ratios, log-log plots, the table
"""
