"""Box geometry: areas, IoU, the Faster R-CNN box parameterisation, clipping.

Boxes are absolute pixels ``[x1, y1, x2, y2]`` in the padded canvas's frame
(DESIGN.md, Conventions). Widths are ``x2 - x1`` with no "+1", as torchvision
and detectron2 measure them.
"""

import math
from typing import Sequence

import jax.numpy as jnp

from mrcnn_jax.ops.checks import check_shape

# Largest log-scale change a decoded box may take: torchvision and detectron2
# clamp dw, dh here so exp() cannot overflow early in training.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# Fast R-CNN box-head weights (Girshick 2015; detectron2 ROI_BOX_HEAD default).
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# The RPN regresses deltas unweighted (detectron2 RPN.BBOX_REG_WEIGHTS).
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area of ``boxes [..., 4]`` -> ``[...]``; inverted boxes have area 0."""
  _check_last_axis("boxes", boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def intersection(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise intersection areas of ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
  check_shape("a", a, (None, 4))
  check_shape("b", b, (None, 4))
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Intersection over union of every pair: ``a [N, 4]``, ``b [M, 4]`` -> ``[N, M]``.

  A pair whose union is empty (two degenerate boxes) has IoU 0, not NaN.
  """
  inter = intersection(a, b)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def pairwise_ioa(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Intersection over the area of ``a``: ``a [N, 4]``, ``b [M, 4]`` -> ``[N, M]``.

  The overlap measure COCO uses for crowd regions: how much of box ``a`` lies
  inside region ``b``. A degenerate ``a`` has IoA 0.
  """
  inter = intersection(a, b)
  area_a = area(a)[:, None]
  return jnp.where(area_a > 0, inter / jnp.where(area_a > 0, area_a, 1.0), 0.0)


def encode(boxes: jnp.ndarray, anchors: jnp.ndarray,
           weights: Sequence[float] = BOX_HEAD_WEIGHTS) -> jnp.ndarray:
  """Regression targets that take ``anchors [N, 4]`` to ``boxes [N, 4]`` -> ``[N, 4]``.

  Fast R-CNN's parameterisation (Girshick 2015, eq. 2 of Ren et al. 2015):
  ``(wx * dx/wa, wy * dy/ha, ww * log(w/wa), wh * log(h/ha))`` with centre
  offsets ``dx, dy``. Degenerate anchors or boxes give finite (if meaningless)
  targets; callers mask them out.
  """
  check_shape("boxes", boxes, (None, 4))
  check_shape("anchors", anchors, (boxes.shape[0], 4))
  wx, wy, ww, wh = weights
  aw, ah, ax, ay = _centre_form(anchors)
  bw, bh, bx, by = _centre_form(boxes)
  tiny = jnp.finfo(jnp.float32).tiny
  aw, ah = jnp.maximum(aw, tiny), jnp.maximum(ah, tiny)
  return jnp.stack([
      wx * (bx - ax) / aw,
      wy * (by - ay) / ah,
      ww * jnp.log(jnp.maximum(bw, tiny) / aw),
      wh * jnp.log(jnp.maximum(bh, tiny) / ah),
  ], axis=-1)


def decode(deltas: jnp.ndarray, anchors: jnp.ndarray,
           weights: Sequence[float] = BOX_HEAD_WEIGHTS,
           clip: float = BBOX_XFORM_CLIP) -> jnp.ndarray:
  """Applies ``deltas [N, 4]`` to ``anchors [N, 4]`` -> boxes ``[N, 4]``; inverse of encode.

  ``dw, dh`` are clamped at ``clip`` (log(1000/16)) before exp(), as in
  torchvision's BoxCoder and detectron2's Box2BoxTransform. Computed in float32.
  """
  check_shape("deltas", deltas, (None, 4))
  check_shape("anchors", anchors, (deltas.shape[0], 4))
  deltas = deltas.astype(jnp.float32)
  wx, wy, ww, wh = weights
  aw, ah, ax, ay = _centre_form(anchors.astype(jnp.float32))
  dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
  dw = jnp.minimum(deltas[:, 2] / ww, clip)
  dh = jnp.minimum(deltas[:, 3] / wh, clip)
  cx, cy = dx * aw + ax, dy * ah + ay
  w, h = jnp.exp(dw) * aw, jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip_to_image(boxes: jnp.ndarray, height, width) -> jnp.ndarray:
  """Clamps ``boxes [..., 4]`` into ``[0, width] x [0, height]``.

  ``height``/``width`` may be traced scalars (each image's true size inside the
  padded canvas), so one compiled program serves every image.
  """
  _check_last_axis("boxes", boxes)
  x = jnp.clip(boxes[..., 0::2], 0.0, width)
  y = jnp.clip(boxes[..., 1::2], 0.0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def scale(boxes: jnp.ndarray, factor: float) -> jnp.ndarray:
  """``boxes [..., 4]`` with width and height times ``factor`` (a Python number), about
  their centres; ``factor == 1`` returns ``boxes`` itself, bit for bit."""
  _check_last_axis("boxes", boxes)
  if factor == 1:
    return boxes
  centre = 0.5 * (boxes[..., :2] + boxes[..., 2:])
  half = 0.5 * factor * (boxes[..., 2:] - boxes[..., :2])
  return jnp.concatenate([centre - half, centre + half], axis=-1)


def flip_horizontal(boxes: jnp.ndarray, width) -> jnp.ndarray:
  """``boxes [..., 4]`` mirrored in an image ``width`` wide: x -> width - x.

  ``width`` broadcasts against the leading axes (e.g. ``[B, 1]`` for ``[B, N, 4]``).
  """
  _check_last_axis("boxes", boxes)
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([width - x2, y1, width - x1, y2], axis=-1)


def xyxy_to_xywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """``[x1, y1, x2, y2] -> [x, y, w, h]`` (COCO's box format), any leading shape."""
  _check_last_axis("boxes", boxes)
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """``[x, y, w, h] -> [x1, y1, x2, y2]``, any leading shape."""
  _check_last_axis("boxes", boxes)
  return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def _check_last_axis(name, boxes):
  # JAX clamps out-of-range static indices, so a [..., 3] input would
  # otherwise give a wrong answer instead of an error.
  check_shape(name, boxes, (None,) * (jnp.ndim(boxes) - 1) + (4,))


def _centre_form(boxes):
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  return w, h, boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
