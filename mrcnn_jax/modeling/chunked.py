"""Static shapes, dynamic cost: a head run over only the real items of its slots.

The mask and keypoint heads have fixed slot counts (``num_mask_rois`` per
image in training, ``detections_per_image`` at inference) of which often
only a few hold a real RoI: at 7 objects per image a sampler fills ~7 of the
128 foreground slots. ``run`` computes ``fn`` at the cost of the real items:
it moves them to the front (a stable sort on ``~valid``), splits the slots
into chunks of ``chunk_size`` and, in a ``lax.scan`` over the chunks, runs
``fn`` in a ``lax.cond`` that is skipped for chunks past the real count
(their outputs are zeros), then puts every output back in its slot. The
shapes stay static and one program serves every count.

A cond decides on one scalar, so the decision must be each device's own:
under a mesh with a ``'data'`` axis (``jax.set_mesh``) the work runs in
``jax.shard_map`` over it, each device sorting and chunking its own slice
of the batch (no cross-device sync; the gradients of ``params`` are summed
over the devices as the data-parallel gradient is). Without a mesh the whole
batch is one slice. Never under ``vmap``: there a cond computes both sides.

On CPU, ``fn``'s convolutions must be in ``conv.py``'s "matmul" form: XLA:CPU
runs convolution gradients inside control flow ~100x slower than at top
level, matmuls at full speed.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from mrcnn_jax.sharding import DATA_AXIS



def run(fn: Callable[[Any, Any], Any], params: Any, items: Any, valid: jnp.ndarray,
        chunk_size: int) -> Any:
  """``fn(params, x)`` over the items with ``valid`` set; zeros in the other slots.

  Args:
    fn: a pure function of (``params``, a pytree of ``[N, ...]`` arrays) ->
      a pytree of ``[N, ...]`` arrays, row i depending only on input row i.
    params: closed over by every chunk; replicated under a mesh.
    items: pytree of ``[B, M, ...]`` arrays (B images of M slots each).
    valid: ``[B, M]`` bool, which slots hold a real item.
    chunk_size: at most this many items per chunk (> 0); the slots are split
      into as few chunks as that allows, of equal size.

  Returns:
    ``fn``'s outputs as ``[B, M, ...]``, zeros where ``valid`` is False.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and DATA_AXIS in mesh.axis_names and mesh.shape[DATA_AXIS] > 1:
    batch = P(DATA_AXIS)
    local = functools.partial(_run_local, fn, chunk_size, (DATA_AXIS,))
    local = jax.shard_map(local, in_specs=(P(), batch, batch), out_specs=batch,
                          axis_names={DATA_AXIS})
  else:
    local = functools.partial(_run_local, fn, chunk_size, ())
  return local(params, items, valid)


def _run_local(fn, chunk_size, manual_axes, params, items, valid):
  """``run`` on one device's slice; ``manual_axes``: the shard_map's axes, if any."""
  # Made device-varying here, outside the control flow: the transpose of this
  # cast is the psum of the parameters' gradients, a collective every device
  # must reach, which it would not inside a chunk that some devices skip.
  params = lax.pcast(params, manual_axes, to="varying")
  b, m = valid.shape
  n = b * m
  chunks = -(-n // chunk_size)
  chunk_size = -(-n // chunks)  # as even as chunk_size allows: 100 slots -> 4 x 25, not 4 x 32
  flat_valid = valid.reshape(n)
  order = jnp.argsort(~flat_valid, stable=True)  # real items first, in slot order
  count = jnp.sum(flat_valid)

  def to_chunks(x):
    x = x.reshape(n, *x.shape[2:])[order]
    x = jnp.pad(x, ((0, chunks * chunk_size - n),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(chunks, chunk_size, *x.shape[1:])

  xs = jax.tree.map(to_chunks, items)
  out_shape = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], xs))

  def skipped():
    # Under shard_map the computed outputs vary over the devices, as the items do.
    return jax.tree.map(lambda s: lax.pcast(jnp.zeros(s.shape, s.dtype), manual_axes,
                                            to="varying"), out_shape)

  def step(_, chunk):
    i, x = chunk
    return None, lax.cond(i * chunk_size < count, lambda: fn(params, x), skipped)

  _, ys = lax.scan(step, None, (jnp.arange(chunks), xs))
  slot_of = jnp.argsort(order)  # the inverse permutation: slot -> its row in ys

  def to_slots(y):
    y = y.reshape(chunks * chunk_size, *y.shape[2:])[slot_of].reshape(b, m, *y.shape[2:])
    # Slots without an item that shared a chunk with real ones were computed too.
    return jnp.where(valid.reshape(b, m, *(1,) * (y.ndim - 2)), y, jnp.zeros((), y.dtype))

  return jax.tree.map(to_slots, ys)
