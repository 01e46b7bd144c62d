"""Evaluation over several processes: each holds its own images' results, process 0 scores.

Each process pastes and encodes the masks of the images in its own slice of
every eval batch (``COCOEvaluator.add``), so the host work is split as the
input is. ``gather_to_main`` sends every process's ``COCOEvaluator.shard()``
to process 0, which merges them and runs COCOeval once; ``share_from_main``
hands its metrics back, so that every process takes the same decisions from
them (the best checkpoint, which every process saves together).

Python objects travel through JAX's own collectives (gloo on CPU, the
accelerator interconnect elsewhere) as pickled bytes: a uint8 array per
process, padded to the longest. ``multihost_utils.process_allgather`` gives
every process all of them (JAX has no gather to one process); the pickles
stay compressed until process 0 opens them.
"""

import pickle
import zlib
from typing import Any, List, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils


def _to_bytes(value: Any) -> np.ndarray:
  return np.frombuffer(zlib.compress(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), 1),
                       np.uint8)


def _from_bytes(payload: np.ndarray) -> Any:
  return pickle.loads(zlib.decompress(payload.tobytes()))


def gather_to_main(value: Any) -> Optional[List[Any]]:
  """Every process's ``value`` (picklable), in process order, on process 0; None on
  the others. Every process must call it (a collective)."""
  if jax.process_count() == 1:
    return [value]
  payload = _to_bytes(value)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int64)))
  sizes = sizes.reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  everything = np.asarray(multihost_utils.process_allgather(padded))  # (P, longest)
  if jax.process_index() != 0:
    return None
  return [_from_bytes(everything[p, :sizes[p]]) for p in range(len(sizes))]


def share_from_main(value: Any) -> Any:
  """Process 0's ``value`` on every process (the others pass anything, e.g. None)."""
  if jax.process_count() == 1:
    return value
  payload = _to_bytes(value) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.array([payload.size], np.int64))).reshape(-1)[0])
  padded = np.zeros(size, np.uint8)
  padded[:payload.size] = payload
  return _from_bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded)))
