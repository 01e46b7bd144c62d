"""Normalisation layers selectable by name: frozen BN, GroupNorm, BatchNorm.

- ``"frozen_bn"``: an affine map from stored BN statistics, never trained
  (the standard with a pretrained backbone; detectron2's FrozenBatchNorm2d).
  Its four arrays live in the ``batch_stats`` collection, not in ``params``,
  so no optimiser ever sees them.
- ``"gn"``: GroupNorm with 32 groups (Wu & He 2018), trainable.
- ``"bn"``: BatchNorm (batch_norm.py). Under ``jax.jit`` over a sharded batch
  its statistics are those of the whole global batch (synchronised BN), or
  of ``bn_groups`` groups of it (groups of devices, as TPU recipes do).
- ``"none"``: identity (convs then carry a bias).

Every norm takes an optional ``mask=`` (``x``'s shape, True where valid):
GroupNorm and BatchNorm then take their statistics over the valid positions
only (see padding.py); the others ignore it.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.batch_norm import BatchNorm

NORMS = ("frozen_bn", "gn", "bn", "none")
HEAD_NORMS = ("none", "gn")  # for the mask head's conv tower (conv.conv_stack)
# The box head's tower may also use BatchNorm: its RoIs are all real samples,
# where the mask head's fixed foreground slots include padding.
BOX_HEAD_NORMS = HEAD_NORMS + ("bn",)


class FrozenBatchNorm(nn.Module):
  """``y = (x - mean) / sqrt(var + eps) * scale + bias`` with fixed statistics."""
  epsilon: float = 1e-5  # torchvision's FrozenBatchNorm2d (detectron2 uses the same)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    del mask  # fixed statistics: nothing to mask
    c = x.shape[-1]
    stat = lambda name, init: self.variable("batch_stats", name, init, (c,), jnp.float32).value
    scale = stat("scale", jnp.ones)
    bias = stat("bias", jnp.zeros)
    mean = stat("mean", jnp.zeros)
    var = stat("var", jnp.ones)
    mult = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * mult.astype(self.dtype) + (bias - mean * mult).astype(self.dtype)).astype(self.dtype)


def make_norm(kind: str, channels: int, train: bool, dtype, name: str,
              zero_init: bool = False, bn_groups: int = 1):
  """The norm layer ``kind`` for ``channels`` channels, named ``name``.

  ``bn_groups``: BatchNorm's statistics groups of the leading axis (1: the
  global batch).
  ``zero_init`` starts its scale at 0. GroupNorm uses 32 groups, or the
  largest count dividing ``channels`` when that is smaller (tiny test models).

  Zero-initialising the last norm of each residual block makes every block
  start as the identity (Goyal et al. 2017, sec. 5.1).
  """
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if kind == "gn":
    return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5, dtype=dtype, scale_init=scale_init,
                        name=name)
  if kind == "bn":
    return BatchNorm(use_running_average=not train, num_groups=bn_groups, momentum=0.9,
                     epsilon=1e-5, dtype=dtype, scale_init=scale_init, name=name)
  if kind == "none":
    return lambda x, mask=None: x
  raise ValueError(f"norm: expected one of {NORMS}, got {kind!r}")
