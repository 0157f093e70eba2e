"""Config files: `--config=configs/NAME.py[:ARG]`; get_config(ARG) returns a ConfigDict.

Shared pieces live in configs/common.py; every key is documented in
tfjax/config/defaults.py.
"""
