"""BatchNorm over the global batch or over groups of it (cross-replica BN).

Under ``jax.jit`` the module sees the global batch, sharded over the mesh's
'data' axis, so statistics over the whole leading axis are those of every
device's images together (synchronised BN, detectron2's SyncBN) and the
compiler inserts the all-reduce. ``num_groups`` > 1 splits the leading axis
into that many contiguous groups and normalises each with its own
statistics: with the batch laid out device by device, a group is the images
of ``devices / num_groups`` neighbouring devices, as the TPU recipes'
``num_batch_norm_group`` (statistics over a few replicas, not the pod).

The leading axis may be images (``[B, H, W, C]``) or anything image-major,
e.g. the RoIs of the box head (``[B * R, S, S, C]``). Statistics are
float32 whatever the compute dtype, ``var = E[x^2] - E[x]^2`` as flax's
BatchNorm computes them; ``mask`` (True where valid, broadcastable to ``x``)
restricts them to the valid positions. The running averages (used when
``use_running_average``) follow the mean over groups of each group's
statistics. Variable names are flax ``nn.BatchNorm``'s: params ``scale``,
``bias``; batch_stats ``mean``, ``var``.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """``x [N, ..., C] -> x`` normalised per channel with batch (or group) statistics."""
  use_running_average: bool = False  # True at inference: the stored statistics
  num_groups: int = 1  # contiguous groups of the leading axis, each its own statistics
  momentum: float = 0.9  # running average: new = momentum * old + (1 - momentum) * batch
  epsilon: float = 1e-5  # torchvision's and detectron2's
  dtype: jnp.dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      x32 = x.astype(jnp.float32)
      y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
      return y.astype(self.dtype)
    g = self.num_groups
    if x.shape[0] % g:
      raise ValueError(f"BatchNorm: a leading axis of {x.shape[0]} does not split into "
                       f"{g} groups (model.batch_norm_group_size)")
    # (G, N/G, ..., C): reducing every axis but the group and the channel keeps
    # the batch axis whole, so the partitioner reduces within each group's devices.
    xg = x.reshape(g, x.shape[0] // g, *x.shape[1:]).astype(jnp.float32)
    axes = tuple(range(1, xg.ndim - 1))
    if mask is None:
      mean = xg.mean(axes, keepdims=True)  # (G, 1, ..., 1, C)
      mean2 = jnp.square(xg).mean(axes, keepdims=True)
    else:
      w = jnp.broadcast_to(mask, x.shape).reshape(xg.shape).astype(jnp.float32)
      count = jnp.maximum(w.sum(axes, keepdims=True), 1.0)
      mean = (xg * w).sum(axes, keepdims=True) / count
      mean2 = (jnp.square(xg) * w).sum(axes, keepdims=True) / count
    var = jnp.maximum(mean2 - jnp.square(mean), 0.0)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(g, c).mean(0)
      ra_var.value = m * ra_var.value + (1 - m) * var.reshape(g, c).mean(0)
    y = (xg - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.reshape(x.shape).astype(self.dtype)
