"""What every command shares: config loading and validation, quiet start-up, and
one error path.

Exit status of every tfjax-* command:
  0   done (also `--help`)
  1   a failure that is not the user's input (a bug, a crash): traceback shown
  2   a user mistake (flag, config key, file, value out of range): one or two
      lines naming what to fix, no traceback unless --verbose
  75  pre-empted (SIGTERM/SIGINT): a checkpoint was saved and the command
      stopped; running it again resumes (tfjax/train/preemption.py says why 75)
  130 interrupted (a second Ctrl-C, or Ctrl-C in a command that saves nothing)
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys

from absl import app, flags
import ml_collections

from tfjax.config import ConfigError, validate
from tfjax.errors import UserError, disk_full  # noqa: F401 - UserError for the commands
from tfjax.train.preemption import EXIT_PREEMPTED, Preempted

EXIT_USER_ERROR = 2
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def quiet_jax_startup() -> None:
  """Keep an installed libtpu from probing for TPU hardware on CPU machines."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def load_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validate a config parsed by config_flags (the command line already applied)."""
  if config is None:
    raise UserError("--config=configs/NAME.py is required")
  return validate(config)


def check_workdir(path: str | None, flag: str = "--workdir") -> str:
  """`path` usable as a run directory: given, and not an existing file."""
  if not path:
    raise UserError(f"{flag}=DIR is required")
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file, not a directory: give a directory (a new one "
                    "is created)")
  return path


# Orbax warnings that say nothing is wrong: a healthy workdir's checkpoints
# predate the metadata file; saves without the best metric are kept by recency.
_ORBAX_CHATTER = ("Metadata file does not exist", "did not provide metrics")


class _QuietOrbax(logging.Filter):
  """Orbax logs every save and restore step at INFO (and a "Metadata file does
  not exist" warning on healthy workdirs): keep records from `level` up."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level
    self._seen: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < self.level or any(t in record.getMessage() for t in _ORBAX_CHATTER):
      return False
    # A failed async save logs the same error from several threads, each with
    # its traceback; the error itself reaches the command, which reports it.
    # Keep one line per distinct message.
    text = re.sub(r"^(\[[^\]]*\])+\s*", "", record.getMessage().splitlines()[0])[:300]
    if text in self._seen:
      return False
    self._seen.add(text)
    record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
    return True


def quiet_orbax(level: int = logging.WARNING) -> None:
  """Drops Orbax's records below `level` from absl's and Python's root loggers.

  Training keeps Orbax's warnings; generate/eval/export pass ERROR: what goes
  wrong in a read reaches them as an exception, reported once. Orbax's async
  I/O also leaves asyncio's "Event loop is closed" errors behind when a read
  or write fails, which say nothing about the failure: asyncio's logger is
  limited to CRITICAL (and `run` drops those unraisable exceptions).
  """
  targets = [logging.getLogger("absl"), logging.getLogger()] + logging.getLogger().handlers
  for target in targets:
    for f in [f for f in target.filters if isinstance(f, _QuietOrbax)]:
      target.removeFilter(f)
    target.addFilter(_QuietOrbax(level))
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _silence_closed_loop_noise() -> None:
  """`RuntimeError: Event loop is closed` raised in finalizers after a failed
  Orbax read reaches sys.unraisablehook (one traceback per pending task)."""
  previous = sys.unraisablehook
  if getattr(previous, "_tfjax", False):
    return

  def hook(unraisable):
    if "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)
  hook._tfjax = True
  sys.unraisablehook = hook


def _flag_error_message(e: BaseException, argv: list[str]) -> str:
  """One line for an error raised while parsing the command line."""
  text = str(e).strip()
  # ml_collections: unknown override key -> KeyError/AttributeError "'key'\nDid you mean ..."
  m = re.search(r"'?\\?'?(\w+)\\?'?\\?'?(?:\\n|\n)Did you mean \"?(\w+)\"? instead", text)
  if isinstance(e, (KeyError, AttributeError)) or m:
    bad = m.group(1) if m else text.strip("'\"")
    hint = f" (did you mean {m.group(2)!r}?)" if m else ""
    for arg in argv:
      key = arg.split("=", 1)[0].lstrip("-")
      if key.startswith("config.") and key.split(".")[-1] == bad:
        return f"{arg.split('=', 1)[0]}: no such config key{hint}; see tfjax/config/defaults.py"
    return f"no such config key {bad!r}{hint}; see tfjax/config/defaults.py"
  if "Error whilst parsing config file" in text:  # get_config raised; config_flags adds the trace
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
    return re.sub(r"^[\w.]*(Error|Exception): ", "", last)
  if "Failed loading config file" in text or isinstance(e, OSError):
    for arg in argv:
      if arg.startswith("--config="):
        path = arg.split("=", 1)[1].split(":", 1)[0]
        if not os.path.exists(path):
          return f"--config={path}: no such file"
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        return f"--config={path}: cannot load it: {last}"
  first = text.splitlines()[0] if text else type(e).__name__
  return first


def _is_user_error(e: BaseException) -> bool:
  if isinstance(e, OSError) and e.errno == errno.ENOSPC:
    return False
  return isinstance(e, (UserError, ConfigError, ValueError, FileNotFoundError,
                        NotADirectoryError, IsADirectoryError, FileExistsError,
                        PermissionError))


def _message(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  if isinstance(e, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1].replace("\\n", " ")
  return " ".join(text.split("\n")[:2])


def run(main_fn, module_name: str) -> None:
  """absl's app.run with one error path (module docstring: exit statuses).

  absl's --help shows the flags of the module named by sys.argv[0]; a console
  script's argv[0] is the wrapper, so the command's own flags are registered
  for it too.
  """
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the Python traceback of an error.")
  by_module = flags.FLAGS.flags_by_module_dict()
  for flag in by_module.get(module_name, []):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None:  # usage text = the command's docstring
    main_module.__doc__ = sys.modules[module_name].__doc__
  prog = os.path.basename(sys.argv[0])
  if prog.endswith(".py"):  # python -m tfjax.cli.NAME
    prog = "tfjax-" + prog[:-3]
  if any(a in HELP_FLAGS for a in sys.argv[1:]):
    app.usage(shorthelp="--helpfull" not in sys.argv, writeto_stdout=True, exitcode=0)
  verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in sys.argv)
  quiet_jax_startup()
  _silence_closed_loop_noise()
  try:
    argv = flags.FLAGS(sys.argv)
  except Exception as e:  # noqa: BLE001 - the command line alone: always the user's input
    if verbose:
      raise
    print(f"{prog}: error: {_flag_error_message(e, sys.argv)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  try:
    app.run(main_fn, argv=argv, flags_parser=lambda _: argv)
  except SystemExit as e:
    if isinstance(e.code, str):  # raise SystemExit("message"): a usage mistake
      print(f"{prog}: error: {e.code}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    raise
  except Preempted as e:
    print(f"{prog}: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except KeyboardInterrupt:
    if verbose:
      raise
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # noqa: BLE001 - sorted into user mistakes and the rest
    if "Failed loading config file" in str(e) and not verbose:
      # config_flags reports an unreadable --config file when the config is first used.
      print(f"{prog}: error: {_flag_error_message(e, sys.argv)}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    full = disk_full(e)
    if full is not None and not verbose:
      print(f"{prog}: error: disk full{' writing ' + full if full else ''}: free space "
            "(or choose another directory) and run the command again", file=sys.stderr)
      sys.exit(1)
    if verbose or not _is_user_error(e):
      raise
    print(f"{prog}: error: {_message(e)}", file=sys.stderr)
    print(f"{prog}: (--verbose shows the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
