"""tfjax-data: build datasets, train a tokenizer, encode the latent cache, inspect batches.

  tfjax-data build     --config=configs/tiny.py [--data_dir=DIR]
      shapes (or folder) dataset as TFDS ArrayRecord, text corpus, tokenizer
  tfjax-data tokenizer --config=configs/tiny.py [--corpus=a.txt,b.txt] [--out=DIR]
      train a sentencepiece tokenizer (data.vocab_size ids) on text files,
      or on the config's corpus when --corpus is not given
  tfjax-data latents   --config=configs/tiny.py [--vae=PATH | --pixel_patch]
                       [--process_index=I --process_count=N]
      encode the image-text source once into the latent cache (data.latents);
      for webdataset:/parquet: sources, this host's share of the shards (run
      one per host with its index, or under jax.distributed), resumable
  tfjax-data show      --config=configs/tiny.py [--num_batches=2]
      print packed batches: fill, documents, images, decoded text, skip counts

Every stage already built is skipped; delete its directory to rebuild.
"""
from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import load_config, run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override any key with --config.KEY=VALUE.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Root of built data (default: the config's data.dir).")
_CORPUS = flags.DEFINE_list(
    "corpus", [], "tokenizer: text files, one document per line (default: the config's corpus).")
_OUT = flags.DEFINE_string(
    "out", None, "tokenizer: output directory (default: data.tokenizer or DATA_DIR/tokenizer).")
_VAE = flags.DEFINE_string(
    "vae", None, "latents: VAE directory for tfjax.vae.load (default: the config's vae.path).")
_PIXEL_PATCH = flags.DEFINE_bool(
    "pixel_patch", False, "latents: use the fixed PixelPatchEncoder stand-in instead of a VAE.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 2, "show: batches to print.")
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", None, "latents: this host's index among --process_count hosts sharing the "
    "shards (default: jax.process_index()).")
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", None, "latents: hosts sharing the input shards (default: "
    "jax.process_count()).")
_PROGRESS = flags.DEFINE_bool("progress", True, "latents: show a progress bar.")

COMMANDS = ("build", "tokenizer", "latents", "show")


def _encoder(config):
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.data.latents import PixelPatchEncoder
  path = _VAE.value or config.vae.path
  if _PIXEL_PATCH.value or not path:
    if not _PIXEL_PATCH.value:
      raise SystemExit("latents: give --vae=PATH (or config vae.path), or --pixel_patch for the "
                       "stand-in encoder")
    down = config.data.image_size // config.model.latent_size
    return PixelPatchEncoder(downsample=down, channels=config.model.latent_channels)
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.vae import load
  return load(path)


def _show(config, data_dir):
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.data import pipeline, sources
  from tfjax.data.tokenizer import Tokenizer
  tok = Tokenizer.load(sources.tokenizer_path(config, data_dir))
  it = pipeline.make_train_iterator(config, data_dir, process_index=0, process_count=1)
  for _ in range(_NUM_BATCHES.value):
    batch = next(it)
    print(pipeline.describe(batch))
    row, seg = batch["tokens"][0], batch["segment_ids"][0]
    for s in sorted(set(seg[seg > 0]))[:3]:
      n_img = len(set(batch["image_ids"][0][seg == s]) - {0})
      print(f"  doc {s}: {n_img} image(s): {tok.decode(row[seg == s])!r}")
  print("skip counts:", json.dumps(it.skip_counts()))
  it.close()


def _main(argv) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"usage: tfjax-data {{{'|'.join(COMMANDS)}}} --config=... "
                     f"(got {argv[1:]})")
  config = load_config(_CONFIG.value)
  data_dir = _DATA_DIR.value
  cmd = argv[1]
  if cmd == "build":
    # Local: JAX loads after the flags parse (--help answers at once).
    from tfjax.data.build import build_all
    print(json.dumps(build_all(config, data_dir), indent=2))
  elif cmd == "tokenizer":
    # Local: JAX loads after the flags parse (--help answers at once).
    from tfjax.data import build, sources
    from tfjax.data.tokenizer import train_tokenizer
    if not (_OUT.value or config.data.tokenizer) and sources.given_tokenizer(config):
      raise SystemExit(f"tokenizer: train.init_from={config.train.init_from} brings its own "
                       f"tokenizer ({sources.given_tokenizer(config)}); pass --out=DIR to "
                       f"train another")
    out = _OUT.value or sources.tokenizer_path(config, data_dir)
    if _CORPUS.value:
      lines = []
      for path in _CORPUS.value:
        lines.extend(build.read_text_lines(path))
      tok = train_tokenizer(lines, config.data.vocab_size, out)
    else:
      tok = train_tokenizer(build._tokenizer_corpus(config, sources.data_root(config, data_dir)),
                            config.data.vocab_size, out)
    print(json.dumps({"out": out, **tok.metadata()}, indent=2))
  elif cmd == "latents":
    # Local: JAX loads after the flags parse (--help answers at once).
    from tfjax.data.build import build_latents
    print(json.dumps(build_latents(config, data_dir, _encoder(config),
                                   process_index=_PROCESS_INDEX.value,
                                   process_count=_PROCESS_COUNT.value,
                                   progress=_PROGRESS.value), indent=2))
  elif cmd == "show":
    _show(config, data_dir)


def main() -> None:
  run(_main, __name__)


if __name__ == "__main__":
  main()
