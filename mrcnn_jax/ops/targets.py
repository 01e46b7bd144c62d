"""Training targets for one image: RPN anchors, sampled RoIs, masks, keypoints.

Class ids follow detectron2: foreground classes are ``0 .. K-1`` and the
background label is ``K``. Ground truth arrives padded to G entries with a
boolean ``gt_valid``; crowd regions (``gt_is_crowd``) are never targets, but
anchors and proposals lying inside them are ignored rather than called
background.
"""

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import matching
from mrcnn_jax.ops import sampling
from mrcnn_jax.ops.checks import check_shape
from mrcnn_jax.ops.roi_align import roi_align_packed


def _check_gt(gt_boxes, gt_valid, gt_is_crowd):
  dims = check_shape("gt_boxes", gt_boxes, ("G", 4))
  check_shape("gt_valid", gt_valid, ("G",), dims)
  check_shape("gt_is_crowd", gt_is_crowd, ("G",), dims)
  if gt_boxes.shape[0] == 0:
    raise ValueError("gt_boxes: expected at least one (possibly padded) entry, got G=0; "
                     "pad ground truth to max_instances with gt_valid=False")
  objects = gt_valid & ~gt_is_crowd
  crowd = gt_valid & gt_is_crowd
  return dims, objects, crowd


def rpn_targets(anchors: jnp.ndarray, gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray,
                gt_is_crowd: jnp.ndarray, key: jax.Array,
                iou_thresholds: Sequence[float] = (0.3, 0.7),
                batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                crowd_ioa_threshold: float = 0.7,
                weights: Sequence[float] = box_ops.RPN_WEIGHTS,
                anchors_valid: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
  """Objectness and box targets for every anchor (Faster R-CNN, sec. 3.1.2).

  Anchors with IoU >= 0.7 with an object, and each object's best anchors, are
  positive; IoU < 0.3 negative; the rest ignored. 256 anchors are sampled,
  at most half positive.

  Args:
    anchors: ``[A, 4]``.
    gt_boxes: ``[G, 4]``; gt_valid, gt_is_crowd: ``[G]`` bool.
    key: PRNG key for the sampling.
    anchors_valid: ``[A]`` bool, the anchors the image has (ops/anchors.py
      image_anchors); the others are never matched nor sampled. None: all.

  Returns:
    dict with ``objectness [A]`` float (1 positive, 0 otherwise),
    ``sampled [A]`` bool (the anchors the objectness loss reads),
    ``positive [A]`` bool (sampled positives: the box loss reads these) and
    ``box_deltas [A, 4]`` regression targets (zeros where not positive).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  check_shape("anchors", anchors, ("A", 4))
  _, objects, crowd = _check_gt(gt_boxes, gt_valid, gt_is_crowd)
  iou = box_ops.pairwise_iou(anchors, gt_boxes)  # (A, G)
  if anchors_valid is not None:
    check_shape("anchors_valid", anchors_valid, ("A",), {"A": anchors.shape[0]})
    # Never an object's best anchor. (A full array, not a scalar: jit's lowering
    # otherwise merged this select with pairwise_ioa's identical-looking one in
    # some processes and not others, and the persistent compilation cache missed.)
    iou = jnp.where(anchors_valid[:, None], iou, jnp.full_like(iou, -1.0))
  matched, labels = matching.match(
      iou, objects, iou_thresholds,
      (matching.NEGATIVE, matching.IGNORE, matching.POSITIVE),
      allow_low_quality_matches=True)
  labels = matching.ignore_crowd(labels, anchors, gt_boxes, crowd, crowd_ioa_threshold)
  if anchors_valid is not None:
    labels = jnp.where(anchors_valid, labels, matching.IGNORE)
  index, valid, is_pos = sampling.sample_balanced(labels, batch_size_per_image,
                                                  positive_fraction, key)
  num = anchors.shape[0]
  sampled = jnp.zeros((num,), bool).at[index].max(valid)
  positive = jnp.zeros((num,), bool).at[index].max(valid & is_pos)
  deltas = box_ops.encode(gt_boxes[matched], anchors, weights)
  return {
      "objectness": positive.astype(jnp.float32),
      "sampled": sampled,
      "positive": positive,
      "box_deltas": jnp.where(positive[:, None], deltas, 0.0),
  }


def roi_targets(proposals: jnp.ndarray, proposals_valid: jnp.ndarray,
                gt_boxes: jnp.ndarray, gt_classes: jnp.ndarray, gt_valid: jnp.ndarray,
                gt_is_crowd: jnp.ndarray, key: jax.Array, num_classes: int,
                batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                iou_threshold: float = 0.5, crowd_ioa_threshold: float = 0.7,
                weights: Sequence[float] = box_ops.BOX_HEAD_WEIGHTS) -> Dict[str, jnp.ndarray]:
  """Samples R RoIs from the proposals and labels them (Fast R-CNN, sec. 2.3).

  The ground-truth boxes are appended to the proposals (so early in training
  every object has a positive RoI), each candidate is matched to its best
  object, IoU >= 0.5 is foreground with that object's class, below is
  background, and 512 are sampled with at most 25% foreground.

  Args:
    proposals: ``[P, 4]``; proposals_valid: ``[P]`` bool.
    gt_boxes: ``[G, 4]``; gt_classes: ``[G]`` int in ``[0, K)``;
      gt_valid, gt_is_crowd: ``[G]`` bool.
    key: PRNG key for the sampling.
    num_classes: K.

  Returns:
    dict over R = batch_size_per_image slots: ``boxes [R, 4]``,
    ``valid [R]`` bool, ``classes [R]`` int32 (K for background),
    ``foreground [R]`` bool, ``matched_gt [R]`` int32 (index into the ground
    truth, meaningful where foreground), ``box_deltas [R, 4]`` (zeros where
    not foreground) and ``matched_iou [R]``.
  """
  dims, objects, crowd = _check_gt(gt_boxes, gt_valid, gt_is_crowd)
  check_shape("gt_classes", gt_classes, ("G",), dims)
  dims = check_shape("proposals", proposals, ("P", 4))
  check_shape("proposals_valid", proposals_valid, ("P",), dims)

  candidates = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)], axis=0)
  candidates_valid = jnp.concatenate([proposals_valid, objects])
  matched, labels, best_iou = _match(candidates, candidates_valid, gt_boxes, objects, crowd,
                                     iou_threshold, crowd_ioa_threshold)
  index, valid, is_pos = sampling.sample_balanced(labels, batch_size_per_image,
                                                  positive_fraction, key)
  return _labelled(candidates[index], valid, valid & is_pos, matched[index], best_iou[index],
                   gt_boxes, gt_classes, num_classes, weights)


def _match(boxes, boxes_valid, gt_boxes, objects, crowd, iou_threshold, crowd_ioa_threshold):
  """Each box's best object, its label (negative inside a crowd region: ignored; invalid
  boxes: ignored) and its best IoU with an object."""
  iou = box_ops.pairwise_iou(boxes, gt_boxes)  # (R, G)
  matched, labels = matching.match(iou, objects, (iou_threshold,),
                                   (matching.NEGATIVE, matching.POSITIVE))
  labels = matching.ignore_crowd(labels, boxes, gt_boxes, crowd, crowd_ioa_threshold)
  labels = jnp.where(boxes_valid, labels, matching.IGNORE)
  best_iou = jnp.max(jnp.where(objects[None, :], iou, 0.0), axis=1, initial=0.0)
  return matched, labels, best_iou


def _labelled(boxes, valid, foreground, matched, best_iou, gt_boxes, gt_classes, num_classes,
              weights) -> Dict[str, jnp.ndarray]:
  """The RoI targets' dict (see ``roi_targets``), zeros where not valid / not foreground."""
  classes = jnp.where(foreground, gt_classes[matched], num_classes).astype(jnp.int32)
  deltas = box_ops.encode(gt_boxes[matched], boxes, weights)
  return {
      "boxes": jnp.where(valid[:, None], boxes, 0.0),
      "valid": valid,
      "classes": classes,
      "foreground": foreground,
      "matched_gt": matched,
      "box_deltas": jnp.where(foreground[:, None], deltas, 0.0),
      "matched_iou": jnp.where(valid, best_iou, 0.0),
  }


def label_boxes(boxes: jnp.ndarray, boxes_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                gt_classes: jnp.ndarray, gt_valid: jnp.ndarray, gt_is_crowd: jnp.ndarray,
                num_classes: int, iou_threshold: float, crowd_ioa_threshold: float,
                weights: Sequence[float]) -> Dict[str, jnp.ndarray]:
  """Labels given boxes without sampling: a Cascade R-CNN refinement stage's targets.

  detectron2's ``CascadeROIHeads._match_and_label_boxes``: each of the R boxes
  (the previous stage's regressed boxes) is matched to its best object; IoU >=
  ``iou_threshold`` is foreground with that object's class and box deltas
  under ``weights``, below is background. As in ``roi_targets``, a box that
  is background but lies inside a crowd region is ignored (not valid).

  Returns the dict ``roi_targets`` returns, over the same R slots.
  """
  dims, objects, crowd = _check_gt(gt_boxes, gt_valid, gt_is_crowd)
  check_shape("gt_classes", gt_classes, ("G",), dims)
  dims = check_shape("boxes", boxes, ("R", 4))
  check_shape("boxes_valid", boxes_valid, ("R",), dims)
  matched, labels, best_iou = _match(boxes, boxes_valid, gt_boxes, objects, crowd,
                                     iou_threshold, crowd_ioa_threshold)
  valid = labels != matching.IGNORE
  return _labelled(boxes, valid, valid & (labels == matching.POSITIVE), matched, best_iou,
                   gt_boxes, gt_classes, num_classes, weights)

def mask_targets(rois: jnp.ndarray, matched_gt: jnp.ndarray, gt_boxes: jnp.ndarray,
                 gt_masks: jnp.ndarray, mask_size: int = 28, sampling_ratio: int = 2,
                 threshold: float = 0.5) -> jnp.ndarray:
  """Binary ``mask_size``-square targets for ``rois [R, 4]`` (Mask R-CNN, sec. 3).

  Each ground-truth mask arrives cropped to its box and resized to M x M
  (DESIGN.md, Static shapes). A RoI's target is that crop read with RoIAlign
  (aligned, the same code the heads use) over the RoI's extent, mapped into
  the crop's frame, then binarised at ``threshold`` as detectron2 does. Parts
  of the RoI outside the ground-truth box read 0.

  Args:
    rois: ``[R, 4]`` image coordinates.
    matched_gt: ``[R]`` int, index of each RoI's ground truth.
    gt_boxes: ``[G, 4]``; gt_masks: ``[G, M, M]`` box-cropped masks in [0, 1].
    mask_size: output size (28 in the paper).

  Returns:
    ``[R, mask_size, mask_size]`` float32 in {0, 1}.
  """
  dims = check_shape("rois", rois, ("R", 4))
  check_shape("matched_gt", matched_gt, ("R",), dims)
  check_shape("gt_boxes", gt_boxes, ("G", 4), dims)
  check_shape("gt_masks", gt_masks, ("G", "M", "M"), dims)
  g, m = gt_masks.shape[:2]
  if g == 0:
    return jnp.zeros((rois.shape[0], mask_size, mask_size), jnp.float32)
  box = gt_boxes[matched_gt].astype(jnp.float32)  # (R, 4)
  size = jnp.maximum(box[:, 2:] - box[:, :2], 1e-6)
  # RoI corners in crop pixels: the crop spans the gt box with M pixels.
  rois_in_crop = (rois.astype(jnp.float32) - jnp.tile(box[:, :2], 2)) * jnp.tile(m / size, 2)
  r = rois.shape[0]
  # Outside the crop reads 0: pad the crop by one zero pixel on every side so
  # RoIAlign's clamp-to-border reads that zero, not the mask's edge, and
  # samples within a pixel of the box interpolate towards 0.
  padded = jnp.pad(gt_masks.astype(jnp.float32), ((0, 0), (1, 1), (1, 1)))
  ps = m + 2
  pooled = roi_align_packed(
      padded.reshape(g * ps * ps, 1), rois_in_crop + 1.0,
      map_offset=(matched_gt * ps * ps).astype(jnp.int32),
      map_height=jnp.full((r,), ps, jnp.int32), map_width=jnp.full((r,), ps, jnp.int32),
      spatial_scale=jnp.ones((r,), jnp.float32), output_size=mask_size,
      sampling_ratio=sampling_ratio, aligned=True)
  return (pooled[..., 0] >= threshold).astype(jnp.float32)


def keypoint_targets(rois: jnp.ndarray, keypoints: jnp.ndarray,
                     heatmap_size: int = 56) -> Dict[str, jnp.ndarray]:
  """One-hot heatmap targets (Mask R-CNN, sec. 3: an m x m one-hot mask per keypoint).

  detectron2's ``keypoints_to_heatmap``: a keypoint at continuous image
  coordinate ``x`` falls in heatmap column ``floor((x - x1) * m / (x2 - x1))``;
  one exactly on the RoI's right/bottom edge goes to the last column/row. It
  is a target only if visible (v > 0) and inside the RoI.

  Args:
    rois: ``[R, 4]``.
    keypoints: ``[R, K, 3]`` (x, y, v) of each RoI's matched instance, in
      continuous image coordinates (COCO's integer pixel index + 0.5).
    heatmap_size: m (56 in the paper).

  Returns:
    dict with ``index [R, K]`` int32 flat position ``y * m + x`` (0 where not
    valid) and ``valid [R, K]`` bool.
  """
  dims = check_shape("rois", rois, ("R", 4))
  check_shape("keypoints", keypoints, ("R", None, 3), dims)
  rois = rois.astype(jnp.float32)
  m = heatmap_size

  def cell(coord, lo, hi):
    scale = m / jnp.maximum(hi - lo, 1e-6)
    c = jnp.floor((coord - lo[:, None]) * scale[:, None])
    return jnp.where(coord == hi[:, None], m - 1, c)

  x = cell(keypoints[..., 0], rois[:, 0], rois[:, 2])
  y = cell(keypoints[..., 1], rois[:, 1], rois[:, 3])
  valid = ((x >= 0) & (y >= 0) & (x < m) & (y < m) & (keypoints[..., 2] > 0)
           & jnp.isfinite(x) & jnp.isfinite(y))
  index = jnp.where(valid, y * m + x, 0).astype(jnp.int32)
  return {"index": index, "valid": valid}


def keypoint_rois(rois: jnp.ndarray, foreground: jnp.ndarray, keypoints: jnp.ndarray,
                  num_slots: int):
  """The RoI slots that train the keypoint head, and which of them count.

  detectron2's ``select_proposals_with_visible_keypoints``: a foreground RoI
  counts when at least one visible keypoint of its matched instance lies
  inside it (edges included); others would only add zero-weight terms to the
  loss. The counting RoIs come first, in sampling order, then the rest, and
  the first ``num_slots`` are taken, so the head always runs on a fixed
  count and classes without keypoints do not crowd out those with them.

  Args:
    rois: ``[R, 4]``; foreground: ``[R]`` bool; keypoints: ``[R, K, 3]``
      (x, y, v) of each RoI's matched instance.
    num_slots: n <= R.

  Returns:
    (slots ``[n]`` int32 indices into R, counts ``[n]`` bool).
  """
  dims = check_shape("rois", rois, ("R", 4))
  check_shape("foreground", foreground, ("R",), dims)
  check_shape("keypoints", keypoints, ("R", None, 3), dims)
  if not 0 < num_slots <= rois.shape[0]:
    raise ValueError(f"num_slots: expected 1..{rois.shape[0]} (R), got {num_slots}")
  x, y = keypoints[..., 0], keypoints[..., 1]
  inside = ((keypoints[..., 2] > 0) & (x >= rois[:, 0:1]) & (x <= rois[:, 2:3])
            & (y >= rois[:, 1:2]) & (y <= rois[:, 3:4]))
  counts = foreground & jnp.any(inside, axis=-1)
  slots = jnp.argsort(~counts, stable=True)[:num_slots].astype(jnp.int32)
  return slots, counts[slots]
