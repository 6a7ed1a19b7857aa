"""SIGTERM and SIGINT stop a run at the end of its current dispatch, checkpointed.

TPU VMs, GKE and SLURM send SIGTERM some seconds before SIGKILL; Ctrl-C sends
SIGINT. While ``signals_caught()`` is active (the trainer holds it for the whole
of ``train.train_and_evaluate``; ``imp.run_imp`` for all its rounds) either
signal only sets a flag: the trainer finishes the dispatch running, saves a
checkpoint at that step, waits for it, releases the workdir lock, logs
"Preempted at step N" and raises ``Preempted``; ``experiments.main`` exits with
``EXIT_CODE``. Rerunning the same command resumes from that checkpoint and gives
the uninterrupted run's results, bit for bit.

A second signal while stopping is reported on stderr and otherwise ignored: the
checkpoint being written is completed. SIGKILL still stops the process at once
and loses nothing saved (an unfinished orbax save is never taken as a
checkpoint; experiments/trainer/checkpoints.py falls back to the one before).

On several hosts (``jax.process_count() > 1``) a host may get the signal before,
or instead of, the others: ``should_stop`` all-gathers each host's flag at every
dispatch boundary, so every host stops at the same step.

Outside the ``with`` block the previous handlers are back: a library user or a
test calling the trainer in-process keeps its own SIGINT/SIGTERM behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
# Not 2 (a mistake in the config or the command) and not 128 + 15 = 143, which a
# shell also reports for a process killed by SIGTERM without any checkpoint.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal; its state at ``step`` is checkpointed."""

  def __init__(self, step: int, signum: int, workdir: str):
    self.step, self.signum, self.workdir = step, signum, workdir
    super().__init__(
        f"Preempted at step {step} ({signal.Signals(signum).name}): its checkpoint is in "
        f"{workdir}; rerun the same command to resume (exit status {EXIT_CODE}).")


class Signals:
  """The signal received while active (``received``: its number, or None)."""

  def __init__(self):
    self.received = None
    self.count = 0

  def _handle(self, signum, frame):
    del frame
    self.count += 1
    if self.received is None:
      self.received = signum
      return
    # Async-signal-safe: no logging lock can be held by the interrupted code.
    os.write(2, (f"{signal.Signals(signum).name} again: already stopping at the end of the "
                 "current dispatch and saving its checkpoint; SIGKILL stops at once (the "
                 "newest complete checkpoint is kept).\n").encode())

  def should_stop(self) -> bool:
    """Whether to stop now; the same answer on every host (a collective if several)."""
    if jax.process_count() == 1:
      return self.received is not None
    flags = multihost_utils.process_allgather(np.int32(self.received or 0))
    signums = [int(s) for s in np.asarray(flags).reshape(-1) if s]
    if signums and self.received is None:
      self.received = signums[0]  # another host's: named in the log line
    return bool(signums)


_active: list[Signals] = []


@contextlib.contextmanager
def signals_caught():
  """Catches SIGTERM and SIGINT for the block; yields the ``Signals`` flag.

  Nested blocks share the outermost one's flag (a signal between two IMP rounds
  stops the next round at once). Outside the main thread, where Python cannot
  install handlers, the flag is never set and signals act as before.

  Example:
    >>> with signals_caught() as signals:
    ...   while not signals.should_stop(): train_a_dispatch()
  """
  if _active:
    yield _active[0]
    return
  caught = Signals()
  if threading.current_thread() is not threading.main_thread():
    yield caught
    return
  # None: a handler not installed from Python; restored as the default.
  previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in SIGNALS}
  _active.append(caught)
  try:
    for s in SIGNALS:
      signal.signal(s, caught._handle)  # pylint: disable=protected-access
    yield caught
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _active.pop()
