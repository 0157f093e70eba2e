"""tfjax: Transfusion models in JAX/Flax.

`tfjax.load_pretrained(dir)` rebuilds a model from an export or a training
workdir (see tfjax/export.py); everything else lives in the subpackages.
"""
__version__ = "0.1.0"


def __getattr__(name):
  if name == "load_pretrained":  # lazy: importing tfjax stays cheap
    from tfjax.export import load_pretrained
    return load_pretrained
  raise AttributeError(f"module 'tfjax' has no attribute {name!r}")
