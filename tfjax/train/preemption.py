"""Pre-emption: SIGTERM or SIGINT stops a command after the next save, with its
own exit status.

A pre-empted VM or a SLURM time limit sends SIGTERM (Ctrl-C sends SIGINT).
While training, the signal becomes a flag the loop checks between steps: it
saves a checkpoint and returns, and the command raises `Preempted`, which
every tfjax-* command turns into exit status EXIT_PREEMPTED. Outside the
training loop (data, VAE, samples stages: each writes its output whole or
not at all) the signal raises `Preempted` at once.

EXIT_PREEMPTED is 75, sysexits.h's EX_TEMPFAIL ("temporary failure; the user
is invited to retry"). Not 143 (128 + SIGTERM): that is what a shell reports
for a process the signal killed before it could save, so the launchers in
launch/ could not tell "saved, resume me" from "killed".
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The command was asked to stop (SIGTERM/SIGINT); what it saved is resumable."""


class StopSignals:
  """Context manager: SIGTERM/SIGINT set `requested` (defer=True, the training
  loop) or raise Preempted (defer=False, everything around it)."""

  def __init__(self, defer: bool = True):
    self.defer = defer
    self.requested = False
    self.signum = 0
    self._previous = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if not self.defer:
      raise Preempted(f"stopped by {name}; run the same command again to continue")
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Ctrl-C twice: stop now, without waiting for the save
    if not self.requested:
      log.warning("received %s: saving a checkpoint and stopping (Ctrl-C again: stop without "
                  "it)", name)
    self.requested, self.signum = True, signum

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
