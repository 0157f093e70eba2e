"""Same as `--config=configs/transfusion.py:370m` (this file name is kept for old commands)."""
from configs import transfusion


def get_config():
  return transfusion.get_config("370m")
