"""Matching boxes (anchors or proposals) to ground truth by IoU.

detectron2's Matcher and torchvision's Matcher, static-shaped: the quality
matrix is ``[N, G]`` over a padded ground-truth list, and padded or crowd
entries can never be matched.
"""

from typing import Sequence, Tuple

import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.checks import check_shape

# Match labels (detectron2's convention). They label boxes; they never mark
# padding, which always travels as a separate boolean ``valid`` array.
NEGATIVE = 0
IGNORE = -1
POSITIVE = 1


def match(iou: jnp.ndarray, gt_valid: jnp.ndarray,
          thresholds: Sequence[float] = (0.3, 0.7),
          labels: Sequence[int] = (NEGATIVE, IGNORE, POSITIVE),
          allow_low_quality_matches: bool = False) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Assigns each of N boxes its best ground truth and a label.

  With ``thresholds = (t0, ..., tk)`` and ``labels = (l0, ..., lk+1)``, a box
  whose best IoU ``q`` falls in ``[t_i, t_{i+1})`` (with ``t_-1 = -inf`` and
  ``t_k+1 = +inf``) gets ``labels[i + 1]``. RPN: ``(0.3, 0.7)`` and
  ``(NEGATIVE, IGNORE, POSITIVE)``; RoI heads: ``(0.5,)`` and
  ``(NEGATIVE, POSITIVE)``.

  ``allow_low_quality_matches`` (Faster R-CNN, sec. 3.1.2) also labels
  positive, for each valid ground truth, the boxes that reach its highest IoU
  (ties included), so every object gets an anchor. A ground truth that
  overlaps nothing (highest IoU 0) gets none: detectron2 would mark every
  zero-IoU box positive for it.

  Args:
    iou: ``[N, G]`` IoU of each box with each ground truth.
    gt_valid: ``[G]`` bool; False columns (padding, crowd) never match.
    thresholds: increasing IoU thresholds.
    labels: one more label than thresholds.
    allow_low_quality_matches: see above.

  Returns:
    matched ``[N]`` int32: index of the best valid ground truth (0 when there
    is none; read it only where the label is POSITIVE), and
    match_labels ``[N]`` int32.
  """
  dims = check_shape("iou", iou, ("N", "G"))
  check_shape("gt_valid", gt_valid, ("G",), dims)
  if len(labels) != len(thresholds) + 1:
    raise ValueError(f"labels: expected {len(thresholds) + 1} labels for "
                     f"{len(thresholds)} thresholds, got {len(labels)}")
  if list(thresholds) != sorted(thresholds):
    raise ValueError(f"thresholds: expected increasing values, got {thresholds}")
  num_boxes, num_gt = iou.shape
  if num_gt == 0:
    return (jnp.zeros((num_boxes,), jnp.int32),
            jnp.full((num_boxes,), labels[0], jnp.int32))

  # Invalid columns score -1, below every threshold, so they never win.
  quality = jnp.where(gt_valid[None, :], iou, -1.0)
  matched = jnp.argmax(quality, axis=1).astype(jnp.int32)  # (N,)
  best = jnp.max(quality, axis=1)

  match_labels = jnp.full((num_boxes,), labels[0], jnp.int32)
  for t, label in zip(thresholds, labels[1:]):
    match_labels = jnp.where(best >= t, label, match_labels)

  if allow_low_quality_matches:
    best_per_gt = jnp.max(quality, axis=0)  # (G,)
    is_best = (quality == best_per_gt[None, :]) & gt_valid[None, :] & (best_per_gt > 0)[None, :]
    match_labels = jnp.where(jnp.any(is_best, axis=1), labels[-1], match_labels)
  return matched, match_labels


def ignore_crowd(match_labels: jnp.ndarray, boxes: jnp.ndarray, gt_boxes: jnp.ndarray,
                 gt_crowd: jnp.ndarray, ioa_threshold: float = 0.7) -> jnp.ndarray:
  """Relabels IGNORE the negatives that lie mostly inside a crowd region.

  A crowd region holds unannotated objects, so boxes inside it are neither
  reliably background nor foreground. As in Detectron's CROWD_FILTER_THRESH,
  a box counts as inside when its intersection with the region covers at
  least ``ioa_threshold`` of its own area.

  Args:
    match_labels: ``[N]`` from ``match``.
    boxes: ``[N, 4]`` the matched boxes.
    gt_boxes: ``[G, 4]``.
    gt_crowd: ``[G]`` bool, True for valid crowd regions only.
    ioa_threshold: fraction of a box's area inside a crowd region.

  Returns:
    ``[N]`` int32 labels.
  """
  dims = check_shape("boxes", boxes, ("N", 4))
  check_shape("match_labels", match_labels, ("N",), dims)
  check_shape("gt_boxes", gt_boxes, ("G", 4), dims)
  check_shape("gt_crowd", gt_crowd, ("G",), dims)
  ioa = box_ops.pairwise_ioa(boxes, gt_boxes)  # (N, G)
  in_crowd = jnp.any((ioa >= ioa_threshold) & gt_crowd[None, :], axis=1)
  return jnp.where(in_crowd & (match_labels == NEGATIVE), IGNORE, match_labels)
