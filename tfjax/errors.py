"""The error a person fixes: tfjax-* commands print its message alone (exit 2).

Library code raises it (or `tfjax.config.ConfigError`, or a built-in
FileNotFoundError / ValueError with a message naming what to fix) for input it
cannot use; tfjax.cli.common turns those into one or two lines.
"""


import errno
import json
import re


class UserError(Exception):
  """A mistake in a command's inputs; the message says what to fix."""


def short_error(e: BaseException, limit: int = 240) -> str:
  """One line for an exception from a deep stack (Orbax, TensorStore): its type
  and first line, keeping the most specific (last) clauses when too long."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = re.sub(r"\s*\[(tensorstore_spec|source locations)[^\]]*\]?.*$", "", text)
  if len(text) > limit:
    parts = text.split(": ")
    tail = ""
    while parts and len(parts[-1]) + len(tail) + 2 < limit - len(parts[0]) - 5:
      tail = ": " + parts.pop() + tail
    text = parts[0] + ": ..." + tail if len(parts) > 1 else text[:limit] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def is_damaged_data(e: BaseException) -> bool:
  """Does an Orbax/TensorStore read error say the files are damaged (not a
  mismatch between the checkpoint and the requested structure)?"""
  text = str(e)
  return isinstance(e, json.JSONDecodeError) or any(code in text for code in (
      "DATA_LOSS", "OUT_OF_RANGE", "Error decoding", "Error reading", "Error opening",
      "CRC", "corrupt"))


def disk_full(e: BaseException) -> str | None:
  """The path of a disk-full error anywhere in e's cause chain (Orbax wraps it,
  TensorStore reports it as RESOURCE_EXHAUSTED), or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return e.filename or ""
    text = str(e)
    if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and
                                              "space" in text.lower()):
      m = re.search(r"\"(/[^\"]+)\"", text)  # TensorStore quotes the file it was writing
      path = m.group(1) if m else ""
      return re.sub(r"\.orbax-checkpoint-tmp.*$", "", path)  # the checkpoint, not its temp files
    e = e.__cause__ or e.__context__
  return None
