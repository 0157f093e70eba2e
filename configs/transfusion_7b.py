"""Same as `--config=configs/transfusion.py:7b` (this file name is kept for old commands)."""
from configs import transfusion


def get_config():
  return transfusion.get_config("7b")
