"""Stopping on a signal in one process (mrcnn_jax/preemption.py); two processes stopping
together: tests/test_train.py (test_two_processes_train_and_stop_together_on_one_sigterm)."""

import os
import signal
import time

from mrcnn_jax import preemption


def test_one_process_flag_is_set_by_sigint():
  stop = preemption.StopRequest()
  try:
    assert not stop.multi and not stop.requested(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)  # the handler runs at the next bytecode boundary
    assert stop.requested(2) and stop.signal == signal.SIGINT
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
