"""Writing files whole, with the permissions the process's umask gives.

Some writers create files mode 0600 whatever the umask (safetensors'
`save_file` does), which hides a shared machine's exports and VAEs from other
users; `write_atomic` writes to a temporary file in the same directory, sets
the umask's mode, and renames it into place, so no reader sees half a file.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def umask_mode(executable: bool = False) -> int:
  """The mode a plain `open(path, "w")` (or mkdir) would give: 0o666 (0o777) & ~umask."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if executable else 0o666) & ~mask


def write_atomic(path: str, write: Callable[[str], None]) -> str:
  """Calls write(tmp_path) for a temporary file next to `path`, then gives it
  the umask's mode and renames it to `path`. Returns `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def utf8_lines(path: str):
  """(line number, text) of each line of a UTF-8 text file, newline included;
  a byte that is not UTF-8 raises ValueError naming the file and line."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      try:
        yield n, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1}); save the file as UTF-8") from None
