"""Masked padding: features that do not depend on the canvas an image sits in.

torchvision and detectron2 pad each image only to a multiple of 32 (its
batch's largest), so every convolution sees zeros just past that edge, at
every layer. In a larger static canvas the padding would not stay zero: a
frozen BN's bias, a conv's bias or a ReLU makes it non-zero from the second
layer on, and the difference spreads inward with the receptive field. So the
backbone, FPN and RPN zero everything outside each image's *extent* (its
size rounded up to ``size_divisibility``) before each spatial convolution and
pool, and GroupNorm/BatchNorm take their statistics over the extent only.
1x1 convolutions read one position each and need no mask.

An extent is ``[B, 2]`` int (height, width) in image pixels; at stride ``s``
the valid region is the first ``ceil(extent / s)`` rows and columns (P6, a
stride-2 subsample of P5, rounds up as its max pool does). ``None`` turns
masking off (the features of the whole canvas, as before).
"""

from typing import Optional

import jax.numpy as jnp

Array = jnp.ndarray


def extent(image_size: Array, size_divisibility: int) -> Array:
  """``image_size [B, 2]`` (h, w) rounded up to ``size_divisibility`` -> ``[B, 2]`` int32."""
  size = jnp.ceil(image_size.astype(jnp.float32) - 1e-3).astype(jnp.int32)  # whole pixels
  d = max(int(size_divisibility), 1)
  return -(-size // d) * d


def valid_mask(x: Array, image_extent: Optional[Array], stride: int) -> Optional[Array]:
  """``[B, H, W, 1]`` bool: the positions of ``x [B, H, W, C]`` (at ``stride``) inside the extent."""
  if image_extent is None:
    return None
  limit = -(-image_extent // stride)  # (B, 2)
  rows = jnp.arange(x.shape[1])[None, :] < limit[:, :1]  # (B, H)
  cols = jnp.arange(x.shape[2])[None, :] < limit[:, 1:]  # (B, W)
  return rows[:, :, None, None] & cols[:, None, :, None]


def zero_outside(x: Array, mask: Optional[Array]) -> Array:
  """``x`` with positions outside ``mask`` (``valid_mask``) set to 0."""
  return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def norm_mask(x: Array, mask: Optional[Array]) -> Optional[Array]:
  """``mask`` broadcast to ``x``'s shape, as flax's GroupNorm/BatchNorm ``mask=`` wants it."""
  return None if mask is None else jnp.broadcast_to(mask, x.shape)
