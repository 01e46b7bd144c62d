"""Mask pasting and RLE encoding of evaluation results in worker processes.

At COCO size (5000 images, 100 masks each) pasting and encoding is most of
the host's evaluation work; ``ResultWorkers`` runs ``coco.image_results``
over whole batches in ``workers`` processes while the caller goes on (the
accelerator computes the next batch meanwhile). Results come back in the
order the batches were submitted, so they equal the in-process ones exactly.

Workers are spawned (not forked: the parent runs JAX's and TensorFlow's
threads) and import only ``mrcnn_jax.evaluation.coco``: while a worker
starts, the ``__main__`` module is hidden from multiprocessing, which would
otherwise import the whole CLI (JAX, TensorFlow) in every worker.

Each worker's BLAS runs one thread (the worker is the unit of parallelism):
with NumPy's default of a thread per core, two workers on two cores took 5x
longer than with one thread each (docs/experiments.md, issue 29).
"""

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import threading
from typing import Dict, List

from mrcnn_jax.evaluation import coco

_SPAWN_LOCK = threading.Lock()
# Read by the BLAS libraries when a worker imports NumPy.
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _restore(mapping, saved: dict, missing) -> None:
  for k, v in saved.items():
    if v is missing:
      mapping.pop(k, None)
    else:
      mapping[k] = v


@contextlib.contextmanager
def _spawn_settings():
  """What a child spawned meanwhile inherits: ``__main__`` without ``__spec__`` /
  ``__file__``, so the child does not re-import it
  (multiprocessing.spawn.get_preparation_data reads those two), and one BLAS
  thread."""
  main = sys.modules["__main__"]
  missing = object()
  saved_main = {k: main.__dict__.get(k, missing) for k in ("__spec__", "__file__")}
  saved_env = {k: os.environ.get(k, missing) for k in _ONE_THREAD}
  with _SPAWN_LOCK:
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    os.environ.update({k: "1" for k in _ONE_THREAD})
    try:
      yield
    finally:
      _restore(main.__dict__, saved_main, missing)
      _restore(os.environ, saved_env, missing)


def batch_results(jobs: List[Dict]) -> List[List[dict]]:
  """``coco.image_results(**job)`` of each job (runs in a worker)."""
  return [coco.image_results(**job) for job in jobs]


class ResultWorkers:
  """A pool of ``workers`` processes computing ``batch_results``."""

  def __init__(self, workers: int):
    if workers < 1:
      raise ValueError(f"workers: expected at least 1, got {workers}")
    self._pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))

  def submit(self, jobs: List[Dict]) -> concurrent.futures.Future:
    """Starts ``batch_results(jobs)``; the future's result is its list of lists."""
    with _spawn_settings():  # a submit may start a worker process
      return self._pool.submit(batch_results, jobs)

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)
