"""Device mesh, shardings and multi-host start-up.

A 'data' axis over every device of every process: the batch is split along
it, the train state is replicated, and XLA inserts the gradient all-reduce
from these shardings (no pmap, no hand-written psum). Each process feeds only
its own slice of the global batch (``global_batch``).

Spatial partitioning (``mesh.space`` = N > 1): a second axis 'space' of N
devices that split each image's height. The mesh is then data x space
(data = devices / N). The batch arrives split over 'data' (replicated over
'space'); ``constrain_spatial`` splits the images and the backbone's and
FPN's maps along H (the compiler exchanges the halo rows each convolution
needs). Everything per RoI or per anchor stays split over 'data' only,
replicated over 'space'. A space group lies within one process, so each
process still feeds whole images.
"""

import functools
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SPACE_AXIS = "space"
# Fewest rows per device of a map split over 'space' (constrain_spatial).
MIN_ROWS = 2


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


def make_mesh(devices=None, space: int = 1) -> Mesh:
  """The mesh over ``devices`` (default: every device): ``('data',)``, or with
  ``space`` > 1 ``('data', 'space')`` of shape (devices / space, space).

  A space group is ``space`` consecutive devices of one process (its devices
  are consecutive in ``jax.devices()``), so its images come from one process.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if space == 1:
    return Mesh(devices, (DATA_AXIS,))
  local = jax.local_device_count()
  if space < 1 or devices.size % space or (jax.process_count() > 1 and local % space):
    raise ValueError(f"mesh.space={space}: expected a positive divisor of the "
                     f"{devices.size} devices"
                     + (f" and of each process's {local}" if jax.process_count() > 1 else ""))
  return Mesh(devices.reshape(-1, space), (DATA_AXIS, SPACE_AXIS))


def data_size(mesh) -> int:
  """How many slices the batch is split into (the data axis's size)."""
  return mesh.shape[DATA_AXIS]


def space_size(mesh) -> int:
  """How many devices split each image's height (1: no spatial partitioning)."""
  return mesh.shape.get(SPACE_AXIS, 1) if not mesh.empty else 1


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def constrain_spatial(maps, subsampled_top: bool = False):
  """The ``[B, H, W, C]`` arrays of ``maps`` (a pytree) split along H over 'space'.

  Traced under a mesh with a 'space' axis (``traced_in``), a map is
  constrained to P('data', 'space') where the axis divides its height into
  at least ``MIN_ROWS`` rows per device, any other to P('data') (whole on
  each device of its space group). ``subsampled_top``: the coarsest map is
  a stride-2 subsample of the next (FPN's P6 of P5), split wherever that
  one is, down to one row per device. These rules avoid two XLA bugs
  (docs/experiments.md): Shardy's gradients are wrong where a map split one
  row per device meets a stride-2 op (P6's slice of P5, C5's strided
  convolutions from C4), and a whole subsample of a split map fails XLA's
  HLO verifier. Without a space axis ``maps`` is returned unchanged.
  """
  space = space_size(jax.sharding.get_abstract_mesh())
  if space == 1:
    return maps
  heights = {x.shape[1] for x in jax.tree.leaves(maps)}
  split = {h for h in heights if h % space == 0 and h // space >= MIN_ROWS}
  top = min(heights)
  if subsampled_top and top % space == 0 and 2 * top in split:
    split.add(top)
  return jax.tree.map(
      lambda x: _constrain(x, P(DATA_AXIS, SPACE_AXIS) if x.shape[1] in split else P(DATA_AXIS)),
      maps)


def unsplit_spatial(tree):
  """Every array of ``tree`` whole on each device of its space group (P('data')).

  For per-anchor outputs read from spatially split maps (the RPN's
  objectness and deltas): XLA's Shardy partitioner gets the gradient of
  their flattening and concatenation over levels wrong while the maps'
  split reaches them (docs/experiments.md). Without a space axis ``tree``
  is returned unchanged.
  """
  if space_size(jax.sharding.get_abstract_mesh()) == 1:
    return tree
  return jax.tree.map(lambda x: _constrain(x, P(DATA_AXIS)), tree)


def _constrain(x, spec):
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(jax.sharding.get_abstract_mesh(), spec))


def mesh_config(**overrides) -> ml_collections.ConfigDict:
  """``config.mesh``: ``space``, the devices that split each image's height (1: none)."""
  cfg = ml_collections.ConfigDict({"space": 1})
  cfg.update(overrides)
  return cfg


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
  n = data_size(mesh)
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices of the "
                     f"mesh's data axis")


def global_batch(local_batch, mesh: Mesh):
  """This process's slice of a batch (numpy pytree) -> global ``jax.Array``s."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
