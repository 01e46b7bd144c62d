"""The Mask R-CNN losses, named and normalised as detectron2 logs them.

L = loss_rpn_cls + loss_rpn_loc + loss_cls + loss_box_reg + loss_mask
(+ loss_keypoint) (Mask R-CNN, sec. 3) (+ loss_keypoint_position, not in
the paper, off by default). Every normaliser is a count over the whole
batch, so a sharded batch gives the same numbers as one device. All
arithmetic is float32.
"""

from typing import Dict, Sequence

import jax.numpy as jnp
import optax

from mrcnn_jax.ops import boxes as box_ops

BOX_LOSSES = ("smooth_l1", "l1", "giou")


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
  """Elementwise Huber-style loss; ``beta = 0`` is plain L1 (detectron2's default)."""
  ax = jnp.abs(x)
  if beta <= 0:
    return ax
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def generalized_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """GIoU (Rezatofighi et al. 2019) of matching boxes ``a, b [..., 4]`` -> ``[...]``."""
  inter_wh = jnp.maximum(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = box_ops.area(a) + box_ops.area(b) - inter
  hull_wh = jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2])
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  eps = 1e-7
  iou = inter / (union + eps)
  return iou - (hull - union) / (hull + eps)


def box_regression(pred_deltas: jnp.ndarray, target_deltas: jnp.ndarray, anchors: jnp.ndarray,
                   weights, loss_type: str = "smooth_l1", beta: float = 0.0) -> jnp.ndarray:
  """Per-box regression loss ``[...]`` for deltas ``[..., 4]`` relative to ``anchors [..., 4]``.

  ``giou`` decodes both sets of deltas and scores 1 - GIoU of the boxes
  (detectron2's ``box_reg_loss_type="giou"``); the others act on the deltas.
  """
  if loss_type == "smooth_l1":
    return jnp.sum(smooth_l1(pred_deltas - target_deltas, beta), axis=-1)
  if loss_type == "l1":
    return jnp.sum(jnp.abs(pred_deltas - target_deltas), axis=-1)
  if loss_type == "giou":
    flat = lambda d: box_ops.decode(d.reshape(-1, 4), anchors.reshape(-1, 4), weights)
    return (1.0 - generalized_iou(flat(pred_deltas), flat(target_deltas))).reshape(
        pred_deltas.shape[:-1])
  raise ValueError(f"loss_type: expected one of {BOX_LOSSES}, got {loss_type!r}")


def rpn_losses(objectness: jnp.ndarray, deltas: jnp.ndarray, anchors: jnp.ndarray,
               targets: Dict[str, jnp.ndarray], batch_size_per_image: int,
               loss_type: str = "smooth_l1", beta: float = 0.0) -> Dict[str, jnp.ndarray]:
  """RPN objectness and box losses, both divided by ``B * batch_size_per_image``.

  Args:
    objectness: ``[B, A]`` logits; deltas: ``[B, A, 4]``; anchors: ``[A, 4]``.
    targets: batched ``ops.targets.rpn_targets`` output.
  """
  normaliser = objectness.shape[0] * batch_size_per_image
  cls = optax.sigmoid_binary_cross_entropy(objectness, targets["objectness"])
  loss_cls = jnp.sum(jnp.where(targets["sampled"], cls, 0.0)) / normaliser
  reg = box_regression(deltas, targets["box_deltas"],
                       jnp.broadcast_to(anchors, deltas.shape), box_ops.RPN_WEIGHTS,
                       loss_type, beta)
  loss_loc = jnp.sum(jnp.where(targets["positive"], reg, 0.0)) / normaliser
  return {"loss_rpn_cls": loss_cls, "loss_rpn_loc": loss_loc}


def box_head_losses(logits: jnp.ndarray, deltas: jnp.ndarray,
                    targets: Dict[str, jnp.ndarray], loss_type: str = "smooth_l1",
                    beta: float = 0.0,
                    weights: Sequence[float] = box_ops.BOX_HEAD_WEIGHTS
                    ) -> Dict[str, jnp.ndarray]:
  """Fast R-CNN losses over the sampled RoIs.

  ``loss_cls``: softmax cross-entropy averaged over valid RoIs.
  ``loss_box_reg``: regression of the ground-truth class's deltas summed over
  foreground RoIs and divided by the number of valid RoIs (detectron2), so
  the box loss weighs less when foreground is scarce.

  Args:
    logits: ``[B, R, K + 1]``; deltas: ``[B, R, K, 4]`` (or ``[B, R, 1, 4]``).
    targets: batched ``ops.targets.roi_targets`` (or ``label_boxes``) output.
    weights: the box coder's weights the targets were encoded with.
  """
  valid, fg = targets["valid"], targets["foreground"]
  num_valid = jnp.maximum(jnp.sum(valid), 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       targets["classes"])
  loss_cls = jnp.sum(jnp.where(valid, ce, 0.0)) / num_valid
  # Background RoIs (class K) have no deltas; clip keeps the gather in range
  # and the fg mask below drops them. Class-agnostic heads have one set.
  cls = jnp.minimum(targets["classes"], deltas.shape[2] - 1)
  pred = jnp.take_along_axis(deltas, cls[..., None, None], axis=2)[..., 0, :]  # (B, R, 4)
  reg = box_regression(pred, targets["box_deltas"], targets["boxes"], weights, loss_type,
                       beta)
  loss_box = jnp.sum(jnp.where(fg, reg, 0.0)) / num_valid
  return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


def mask_loss(mask_logits: jnp.ndarray, mask_targets: jnp.ndarray,
              valid: jnp.ndarray) -> jnp.ndarray:
  """Per-pixel sigmoid BCE averaged over valid RoIs and pixels (Mask R-CNN, sec. 3).

  Args:
    mask_logits: ``[B, M, S, S]`` the ground-truth class's channel only.
    mask_targets: ``[B, M, S, S]`` in {0, 1}; valid: ``[B, M]`` foreground RoIs.
  """
  bce = optax.sigmoid_binary_cross_entropy(mask_logits.astype(jnp.float32), mask_targets)
  per_roi = jnp.mean(bce, axis=(-2, -1))
  return jnp.sum(jnp.where(valid, per_roi, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def keypoint_loss(heatmaps: jnp.ndarray, index: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Softmax cross-entropy over the m*m positions of each visible keypoint.

  Summed over valid keypoints and divided by their count in the batch
  (detectron2's NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS).

  Args:
    heatmaps: ``[B, M, m, m, K]`` logits; index: ``[B, M, K]`` flat target
      position; valid: ``[B, M, K]``.
  """
  b, n, m, _, k = heatmaps.shape
  logits = jnp.moveaxis(heatmaps.astype(jnp.float32).reshape(b, n, m * m, k), -1, 2)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, index)  # (B, M, K)
  return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def keypoint_position_loss(predicted: jnp.ndarray, keypoints: jnp.ndarray, rois: jnp.ndarray,
                           heatmap_size: int, valid: jnp.ndarray) -> jnp.ndarray:
  """L1 distance between decoded and true keypoints, in heatmap cells.

  The integral-regression loss (Sun et al. 2018) on the heatmaps'
  differentiable decoding (``keypoint_head.local_mean_keypoints``): the
  cross-entropy trains which cell, this where inside it and toward which
  side of the window a keypoint decoded off the truth's peak should move.
  Measured in cells (``heatmap_size`` across each RoI), so it is scale-free
  like the cross-entropy; summed over x and y and the valid keypoints,
  divided by their count in the batch.

  Args:
    predicted, keypoints: ``[B, M, K, 2+]`` x, y in image coordinates;
    rois: ``[B, M, 4]`` the boxes the heatmaps cover; valid: ``[B, M, K]``.
  """
  cells = heatmap_size / jnp.maximum(rois[..., 2:] - rois[..., :2], 1.0)  # (B, M, 2)
  error = jnp.abs(predicted[..., :2] - keypoints[..., :2]) * cells[:, :, None, :]
  return (jnp.sum(jnp.where(valid, jnp.sum(error, axis=-1), 0.0))
          / jnp.maximum(jnp.sum(valid), 1))


def total(losses: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """The sum of every ``loss_*`` entry."""
  return sum(v for name, v in losses.items() if name.startswith("loss_"))
