"""The text tokenizer: a sentencepiece model behind fixed special ids.

Every vocabulary starts with the five special ids of `tfjax.config`
(PAD=0 BOS=1 EOS=2 BOI=3 EOI=4). A sentencepiece model's own ids are shifted up
by `offset` (5) so that any `.model` file, a Llama 2 tokenizer included (whose
<unk>=0 <s>=1 </s>=2 would otherwise collide), loads as is. The mapping is
recorded in `tokenizer.json` next to the model file:

  {"offset": 5, "sp_vocab_size": N, "vocab_size": N + 5,
   "special_ids": {"pad": 0, "bos": 1, "eos": 2, "boi": 3, "eoi": 4},
   "model_file": "tokenizer.model"}
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable

import sentencepiece as spm

from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID

NUM_SPECIAL = 5
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "boi": BOI_ID, "eoi": EOI_ID}
MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"


class Tokenizer:
  """sentencepiece with the project's special ids in front of its vocabulary."""

  def __init__(self, model_proto: bytes, offset: int = NUM_SPECIAL):
    if offset < NUM_SPECIAL:
      raise ValueError(f"offset {offset} would overlap the {NUM_SPECIAL} special ids")
    self._proto = model_proto
    self.offset = offset
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  # Pickled by its model bytes, so Grain worker processes can rebuild it.
  def __getstate__(self):
    return {"proto": self._proto, "offset": self.offset}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["offset"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size() + self.offset

  @property
  def sp_vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without BOS/EOS (the packer adds document boundaries)."""
    return [i + self.offset for i in self._sp.encode(text)]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; special ids (BOS, EOS, BOI, EOI, PAD) are dropped."""
    return self._sp.decode([int(i) - self.offset for i in ids
                            if self.offset <= int(i) < self.vocab_size])

  def metadata(self) -> dict:
    return {"offset": self.offset, "sp_vocab_size": self.sp_vocab_size,
            "vocab_size": self.vocab_size, "special_ids": dict(SPECIAL_IDS),
            "model_file": MODEL_FILE}

  def save(self, directory: str) -> str:
    """Writes tokenizer.model and tokenizer.json into `directory`; returns it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
      f.write(self._proto)
    with open(os.path.join(directory, META_FILE), "w") as f:
      json.dump(self.metadata(), f, indent=2)
    return directory

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads a directory written by `save`, or any sentencepiece `.model` file.

    A bare `.model` file (e.g. Llama 2's) gets the default offset; a
    `tokenizer.json` beside it, if present, supplies the recorded one.
    """
    model_path, meta_path = path, None
    if os.path.isdir(path):
      model_path = os.path.join(path, MODEL_FILE)
      meta_path = os.path.join(path, META_FILE)
    else:
      meta_path = os.path.join(os.path.dirname(path), META_FILE)
    if not os.path.exists(model_path):
      raise FileNotFoundError(
          f"no sentencepiece model at {model_path} (config key data.tokenizer; "
          f"train one with `tfjax-data tokenizer`)")
    with open(model_path, "rb") as f:
      proto = f.read()
    offset = NUM_SPECIAL
    if meta_path and os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
      if meta.get("special_ids", SPECIAL_IDS) != SPECIAL_IDS:
        raise ValueError(f"{meta_path}: special ids {meta.get('special_ids')} differ from "
                         f"this project's {SPECIAL_IDS}")
      offset = int(meta.get("offset", NUM_SPECIAL))
    try:
      return cls(proto, offset)
    except RuntimeError as e:
      raise ValueError(f"{model_path} is not a sentencepiece model: {e}") from e


def train_tokenizer(corpus_lines: Iterable[str], vocab_size: int, out_dir: str,
                    model_type: str = "unigram") -> Tokenizer:
  """Trains a sentencepiece model of `vocab_size` ids in all (specials included).

  The model uses the Llama layout (<unk>=0 <s>=1 </s>=2, byte fallback), so a
  file trained here and a Llama 2 file load the same way. On a small corpus the
  vocabulary may come out smaller than asked (the limit is soft).
  """
  sp_size = vocab_size - NUM_SPECIAL
  if sp_size < 300:
    raise ValueError(f"config key data.vocab_size={vocab_size}: byte fallback needs at least "
                     f"{300 + NUM_SPECIAL}")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([l for l in corpus_lines if l.strip()]), model_writer=model,
      vocab_size=sp_size, model_type=model_type, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2, num_threads=1)
  tok = Tokenizer(model.getvalue())
  tok.save(out_dir)
  return tok

