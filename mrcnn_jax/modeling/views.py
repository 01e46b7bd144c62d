"""Test-time views of an image: rescaled and mirrored copies, and the maps between them.

``MaskRCNN.detect`` sees each image in several views when test-time
augmentation is on; ``View`` maps boxes into a view and back.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops

Array = jnp.ndarray
VIEW_DIVISIBILITY = 32  # rescaled views are padded to a multiple of P5's stride


def inference_views(scales: Sequence[float], flip: bool) -> List[Tuple[float, bool]]:
  """(scale, mirrored) of each view of the image at inference, the plain view first."""
  scales = [1.0] + [float(s) for s in scales if float(s) != 1.0]
  return [(s, f) for s in scales for f in ((False, True) if flip else (False,))]


class View(NamedTuple):
  """Where a test-time view puts the plain image: x' = sx * x (then x'' = w - x' mirrored)."""
  scale: Tuple[float, float]  # (sx, sy): the exact scales after rounding the canvas
  mirror_width: Optional[Array]  # [B, 1] the width mirrored about, or None

  def to_view(self, boxes: Array) -> Array:
    """``boxes [B, N, 4]`` in the plain image -> the same boxes in this view."""
    sx, sy = self.scale
    boxes = boxes * jnp.asarray([sx, sy, sx, sy], jnp.float32)
    if self.mirror_width is not None:
      boxes = box_ops.flip_horizontal(boxes, self.mirror_width)
    return boxes

  def from_view(self, boxes: Array) -> Array:
    """The inverse of ``to_view``."""
    if self.mirror_width is not None:
      boxes = box_ops.flip_horizontal(boxes, self.mirror_width)
    sx, sy = self.scale
    return boxes / jnp.asarray([sx, sy, sx, sy], jnp.float32)


def view_images(images: Array, image_size: Array, scale: float, mirror: bool):
  """A test-time view: ``images [B, H, W, C]`` rescaled by ``scale`` and/or mirrored.

  Scaling resizes the canvas bilinearly (as the input pipeline resizes
  images, without antialiasing) to the nearest whole size, padded up to a
  multiple of ``VIEW_DIVISIBILITY``; mirroring reverses each image within
  its own width (``image_size [B, 2]``: height, width; rounded to whole
  pixels after scaling), so its padding stays on the right.
  Returns (view images, view image sizes [B, 2], ``View``).
  """
  b, h, w, c = images.shape
  new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
  sy, sx = new_h / h, new_w / w
  if (new_h, new_w) != (h, w):
    images = jax.image.resize(images, (b, new_h, new_w, c), "linear", antialias=False)
    images = jnp.pad(images, ((0, 0), (0, -new_h % VIEW_DIVISIBILITY),
                              (0, -new_w % VIEW_DIVISIBILITY), (0, 0)))
  image_size = image_size.astype(jnp.float32) * jnp.asarray([sy, sx], jnp.float32)
  mirror_width = None
  if mirror:
    width = jnp.round(image_size[:, 1:2])  # (B, 1)
    columns = jnp.arange(images.shape[2])[None]
    source = jnp.where(columns < width, width - 1 - columns, columns).astype(jnp.int32)
    images = jnp.take_along_axis(images, source[:, None, :, None], axis=2)
    mirror_width = width
  return images, image_size, View((sx, sy), mirror_width)
