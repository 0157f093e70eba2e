"""Sweep files for the paper's ablations (tfjax-sweep --config=configs/ablations/NAME.py)."""
