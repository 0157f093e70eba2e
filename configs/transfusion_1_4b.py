"""Same as `--config=configs/transfusion.py:1_4b` (this file name is kept for old commands)."""
from configs import transfusion


def get_config():
  return transfusion.get_config("1_4b")
