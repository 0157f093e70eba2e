"""Experiment sweeps: many training runs, one evaluation, one table and plots.

  runner.py    sweep config -> runs (train + evaluate each, resumable) -> results
  evaluate.py  the per-run evaluation shared by Transfusion and Chameleon runs
  plots.py     power-law fits, parity-FLOP ratios, log-log plots, the table
"""
