"""Plain-NumPy references for the box ops, shared by every test that needs one.

Float64 by default and written from the papers' definitions, independently
of mrcnn_jax.ops: IoU, IoA, the box coder (Faster R-CNN's parametrisation
with per-coordinate weights and the log-scale clamp) and greedy NMS.
"""

import math
from typing import Optional, Sequence

import numpy as np

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # the references' clamp on dw, dh


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  return np.prod(np.clip(rb - lt, 0, None), axis=-1)


def area(boxes: np.ndarray) -> np.ndarray:
  return np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)


def iou(a, b, dtype=np.float64) -> np.ndarray:
  """IoU matrix ``[N, M]`` of xyxy boxes ``a [N, 4]`` and ``b [M, 4]``; 0 where the union is 0.

  ``dtype=np.float32`` computes as the ops do, for thresholds that must tie exactly.
  """
  a = np.asarray(a, dtype).reshape(-1, 4)
  b = np.asarray(b, dtype).reshape(-1, 4)
  inter = _intersection(a, b)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), dtype(0))


def ioa(a, b) -> np.ndarray:
  """Fraction of each box of ``a [N, 4]`` inside each region of ``b [M, 4]``; 0 for empty boxes."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  own = area(a)[:, None]
  return np.where(own > 0, _intersection(a, b) / np.where(own > 0, own, 1), 0.0)


def encode(boxes, anchors, weights: Sequence[float]) -> np.ndarray:
  """Deltas ``[N, 4]`` (dx, dy, dw, dh) that take each anchor to its box."""
  boxes, anchors = np.asarray(boxes, np.float64), np.asarray(anchors, np.float64)
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  wx, wy, ww, wh = weights
  return np.stack([wx * (boxes[:, 0] + bw / 2 - anchors[:, 0] - aw / 2) / aw,
                   wy * (boxes[:, 1] + bh / 2 - anchors[:, 1] - ah / 2) / ah,
                   ww * np.log(bw / aw), wh * np.log(bh / ah)], axis=1)


def decode(deltas, anchors, weights: Sequence[float], clip: float = BBOX_XFORM_CLIP):
  """Boxes ``[N, 4]`` from deltas on anchors; dw, dh (after the weights) clamped at ``clip``."""
  deltas, anchors = np.asarray(deltas, np.float64), np.asarray(anchors, np.float64)
  wx, wy, ww, wh = weights
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  cx = anchors[:, 0] + aw / 2 + deltas[:, 0] / wx * aw
  cy = anchors[:, 1] + ah / 2 + deltas[:, 1] / wy * ah
  w = np.exp(np.minimum(deltas[:, 2] / ww, clip)) * aw
  h = np.exp(np.minimum(deltas[:, 3] / wh, clip)) * ah
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def greedy_nms(boxes, scores, threshold: float, classes: Optional[np.ndarray] = None,
               valid: Optional[np.ndarray] = None, dtype=np.float64) -> np.ndarray:
  """Textbook greedy NMS, one box at a time: kept indices by decreasing score.

  A box goes when its IoU (computed in ``dtype``) with a kept box of its class
  is above ``threshold``. Ties in score are visited lower index first; NaN
  scores and invalid boxes are dropped first, so they neither stay nor suppress.
  """
  boxes, scores = np.asarray(boxes), np.asarray(scores)
  ok = ~np.isnan(scores)
  if valid is not None:
    ok &= valid
  kept = []
  for i in np.argsort(-scores, kind="stable"):
    if not ok[i]:
      continue
    suppressors = iou(boxes[i], boxes[kept], dtype)[0] > threshold
    if classes is not None:
      suppressors &= classes[kept] == classes[i]
    if not suppressors.any():
      kept.append(int(i))
  return np.asarray(kept, np.int64)
