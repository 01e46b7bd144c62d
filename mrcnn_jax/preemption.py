"""Stopping on SIGTERM / SIGINT at a step every process agrees on, without a per-step barrier.

Training asks ``StopRequest.requested(step)`` after each step; when it says
True, the caller saves a checkpoint and exits. Every process of a run must
get the same answer at the same step, or some would save and leave while
others wait forever in the next step's collectives.

- One process: a Python signal handler sets a flag; ``requested`` reads it.
- Several processes (``jax.distributed``): the distributed runtime's
  preemption sync manager. Its SIGTERM notifier (installed by
  ``jax.distributed.initialize``; a TPU VM's maintenance notice reaches it
  too) tells the coordination service, and
  ``multihost_utils.reached_preemption_sync_point(step)`` then returns True
  on every process at the same step. Until a notice arrives the call is a
  local check: no collective, so asynchronous dispatch keeps running ahead
  (an allgather of a flag at every step would wait for the step's
  computation). So SIGTERM is left to the runtime's handler, and SIGINT's
  handler forwards it as a SIGTERM to this process.
"""

import os
import signal

import jax
from absl import logging


class StopRequest:
  """Turns SIGTERM/SIGINT into a stop at a step that every process agrees on."""

  def __init__(self):
    self.signal = None
    self._previous = {}
    self.multi = jax.process_count() > 1
    for sig in (signal.SIGTERM, signal.SIGINT):
      if self.multi and sig == signal.SIGTERM:
        continue  # the distributed runtime's preemption notifier handles it
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    logging.warning("received %s: finishing the step, saving, exiting",
                    signal.Signals(signum).name)
    if self.multi:  # tell the runtime, which tells every process
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """True when the run should stop after ``step`` (called once per step, in order)."""
    if self.multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.signal is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
