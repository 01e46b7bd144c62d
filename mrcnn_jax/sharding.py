"""Device mesh, shardings and multi-host start-up.

One 'data' axis over every device of every process: the batch is split along
it, the train state is replicated, and XLA inserts the gradient all-reduce
from these shardings (no pmap, no hand-written psum). Each process feeds only
its own slice of the global batch (``global_batch``).
"""

import functools
import os
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts JAX's multi-process runtime when a coordinator is configured.

  Settings come from the arguments or, where those are None, from the
  environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``). Without a coordinator this is a single-process run and
  nothing is started. On CPU the cross-process collectives use gloo.
  """
  env = os.environ.get
  address = coordinator_address or env("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  num = num_processes if num_processes is not None else int(env("JAX_NUM_PROCESSES", "1"))
  pid = process_id if process_id is not None else int(env("JAX_PROCESS_ID", "0"))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: every device)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def traced_in(mesh: Mesh, fn):
  """``fn`` with ``mesh`` as the context mesh while it is traced.

  The model runs per-device work (``modeling/chunked.py``: each device skips
  its own empty chunks) in ``shard_map`` over the context mesh's data axis;
  jit ``traced_in(mesh, step)`` so that it sees the mesh its inputs live on.
  """
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  # jit names its program (and persistent-cache entry) after this: keep fn's
  # name, a partial's function's where fn is a functools.partial.
  traced.__name__ = getattr(fn, "__name__", None) or getattr(fn, "func", fn).__name__
  return traced


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  if batch_size % mesh.devices.size:
    raise ValueError(f"{what}={batch_size} is not divisible by the {mesh.devices.size} "
                     f"devices of the mesh")


def global_batch(local_batch, mesh: Mesh):
  """This process's slice of a batch (numpy pytree) -> global ``jax.Array``s."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
