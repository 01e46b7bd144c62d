"""Box-head outputs to a fixed number of detections for one image.

torchvision's RoIHeads.postprocess_detections and detectron2's
fast_rcnn_inference: softmax scores, class-specific boxes decoded and clipped,
every (RoI, class) pair below the score threshold or empty dropped,
class-aware NMS, the best D kept. Static shapes need one extra cap: only the
``max_candidates`` best-scoring pairs enter the NMS (torchvision and
detectron2 take every pair above the threshold; the cap matters only when
more than that many pass it, e.g. in the first steps of training).
"""

from typing import Dict, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import nms as nms_ops
from mrcnn_jax.ops.checks import check_shape


def detect(class_logits: jnp.ndarray, box_deltas: jnp.ndarray, proposals: jnp.ndarray,
           proposals_valid: jnp.ndarray, image_size: Tuple,
           score_threshold: Union[float, Sequence[float]] = 0.05,
           nms_threshold: float = 0.5, detections_per_image: int = 100,
           max_candidates: int = 4000, min_size: float = 0.0,
           weights: Sequence[float] = box_ops.BOX_HEAD_WEIGHTS) -> Dict[str, jnp.ndarray]:
  """Final detections from the box head.

  Args:
    class_logits: ``[R, K + 1]``, background last.
    box_deltas: ``[R, K, 4]`` class-specific (or ``[R, 1, 4]`` class-agnostic).
    proposals: ``[R, 4]`` the RoIs the head saw; proposals_valid: ``[R]``.
    image_size: ``(height, width)`` of the image in the canvas (may be traced).
    score_threshold: a scalar, or one threshold per class ``[K]``.
    nms_threshold: IoU threshold of the class-aware NMS.
    detections_per_image: D.
    max_candidates: (RoI, class) pairs that enter the NMS, best first.
    min_size: boxes with a side under this are dropped (torchvision's
      remove_small_boxes, 1e-2 there; detectron2 drops none: 0).
    weights: box-head delta weights.

  Returns:
    dict with ``boxes [D, 4]``, ``scores [D]``, ``classes [D]`` int32 in
    ``[0, K)``, ``roi_index [D]`` int32 (the RoI each came from) and
    ``valid [D]`` bool; invalid slots hold zeros.
  """
  dims = check_shape("class_logits", class_logits, ("R", "K+1"))
  num_classes = class_logits.shape[1] - 1
  check_shape("box_deltas", box_deltas, ("R", None, 4), dims)
  if box_deltas.shape[1] not in (1, num_classes):
    raise ValueError(f"box_deltas: expected shape [R, {num_classes}, 4] or [R, 1, 4], "
                     f"got {list(box_deltas.shape)}")
  check_shape("proposals", proposals, ("R", 4), dims)
  check_shape("proposals_valid", proposals_valid, ("R",), dims)
  num_rois = class_logits.shape[0]
  height, width = image_size

  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :num_classes]
  deltas = jnp.broadcast_to(box_deltas, (num_rois, num_classes, 4)).reshape(-1, 4)
  anchors = jnp.repeat(proposals.astype(jnp.float32), num_classes, axis=0)
  boxes = box_ops.clip_to_image(box_ops.decode(deltas, anchors, weights), height, width)
  boxes = boxes.reshape(num_rois, num_classes, 4)  # (R, K, 4)

  threshold = jnp.broadcast_to(jnp.asarray(score_threshold, jnp.float32), (num_classes,))
  wh = boxes[..., 2:] - boxes[..., :2]
  ok = ((scores > threshold[None, :]) & proposals_valid[:, None]
        & jnp.all(wh >= min_size, axis=-1) & jnp.all(jnp.isfinite(boxes), axis=-1))

  flat_scores = jnp.where(ok, scores, -1.0).reshape(-1)
  top_scores, top = jax.lax.top_k(flat_scores, min(max_candidates, flat_scores.shape[0]))
  cand_boxes = boxes.reshape(-1, 4)[top]
  cand_classes = (top % num_classes).astype(jnp.int32)
  keep, valid = nms_ops.batched_nms(cand_boxes, top_scores, cand_classes, nms_threshold,
                                    detections_per_image, valid=top_scores >= 0)
  return {
      "boxes": jnp.where(valid[:, None], cand_boxes[keep], 0.0),
      "scores": jnp.where(valid, top_scores[keep], 0.0),
      "classes": jnp.where(valid, cand_classes[keep], 0),
      "roi_index": jnp.where(valid, top[keep] // num_classes, 0).astype(jnp.int32),
      "valid": valid,
  }
