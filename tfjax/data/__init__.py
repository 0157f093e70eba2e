"""Input side: shapes dataset, tokenizer, latent cache, Grain packing pipeline.

The main entry points are importable from here (lazily, so that
`tfjax.data.shapes` stays light for users who only render scenes):

  make_train_iterator, make_eval_iterator      (pipeline.py)
  build_all, build_latents                     (build.py)
  Tokenizer, train_tokenizer                   (tokenizer.py)
  PixelPatchEncoder, build_latent_cache        (latents.py)
  run_latent_job, run_text_job                 (latent_job.py: stream sources, sharded)
"""
import importlib

_EXPORTS = {
    "make_train_iterator": "pipeline", "make_eval_iterator": "pipeline",
    "build_all": "build", "build_latents": "build",
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "PixelPatchEncoder": "latents", "build_latent_cache": "latents",
    "run_latent_job": "latent_job", "run_text_job": "latent_job",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"tfjax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'tfjax.data' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
