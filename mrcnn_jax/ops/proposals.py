"""RPN proposals for one image: per-level top-k, decode, clip, NMS, merge.

torchvision's RegionProposalNetwork.filter_proposals and detectron2's
find_top_rpn_proposals, with every count static: the top ``pre_nms_topk``
anchors of each level by objectness are decoded and clipped to the image,
boxes smaller than ``min_size`` are masked out, NMS runs within each level
(detectron2 and torchvision run one batched NMS with the level as the class,
which is the same thing), and the best ``post_nms_topk`` survivors over all
levels are kept, with a valid mask where fewer survive.
"""

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import nms as nms_ops
from mrcnn_jax.ops.checks import check_shape


def generate_proposals(objectness: Sequence[jnp.ndarray], deltas: Sequence[jnp.ndarray],
                       anchors: Sequence[jnp.ndarray], image_size: Tuple,
                       pre_nms_topk: int, post_nms_topk: int, nms_threshold: float = 0.7,
                       min_size: float = 0.0,
                       weights: Sequence[float] = box_ops.RPN_WEIGHTS
                       ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Proposals from the RPN outputs of every level.

  Args:
    objectness: per level ``[A_l]`` logits.
    deltas: per level ``[A_l, 4]`` box deltas.
    anchors: per level ``[A_l, 4]`` anchors (``anchors.multilevel_anchors``).
    image_size: ``(height, width)`` of the image inside the canvas (scalars,
      may be traced); proposals are clipped to it.
    pre_nms_topk: candidates kept per level before NMS.
    post_nms_topk: P, proposals returned.
    nms_threshold: IoU threshold of the NMS (0.7 in Faster R-CNN).
    min_size: boxes narrower or shorter than this are dropped (detectron2
      drops only empty boxes, torchvision those under 1e-3).
    weights: RPN box-delta weights.

  Returns:
    boxes ``[P, 4]`` (zeros where invalid), objectness logits ``[P]``
    (-inf where invalid) and valid ``[P]`` bool, by decreasing objectness.
  """
  if not len(objectness) == len(deltas) == len(anchors):
    raise ValueError(f"objectness, deltas, anchors: expected one entry per level each, got "
                     f"{len(objectness)}, {len(deltas)}, {len(anchors)}")
  height, width = image_size
  boxes, scores, valid = [], [], []
  for lvl, (logits, level_deltas, level_anchors) in enumerate(zip(objectness, deltas, anchors)):
    dims = check_shape(f"objectness[{lvl}]", logits, ("A",))
    check_shape(f"deltas[{lvl}]", level_deltas, ("A", 4), dims)
    check_shape(f"anchors[{lvl}]", level_anchors, ("A", 4), dims)
    logits = logits.astype(jnp.float32)
    k = min(pre_nms_topk, logits.shape[0])
    top_logits, top = jax.lax.top_k(logits, k)
    level_boxes = box_ops.decode(level_deltas[top], jnp.asarray(level_anchors)[top], weights)
    level_boxes = box_ops.clip_to_image(level_boxes, height, width)
    wh = level_boxes[:, 2:] - level_boxes[:, :2]
    ok = (jnp.all(wh > min_size, axis=1) & jnp.isfinite(top_logits)
          & jnp.all(jnp.isfinite(level_boxes), axis=1))
    keep, keep_valid = nms_ops.nms(level_boxes, top_logits, nms_threshold,
                                   min(post_nms_topk, k), valid=ok)
    boxes.append(level_boxes[keep])
    scores.append(jnp.where(keep_valid, top_logits[keep], -jnp.inf))
    valid.append(keep_valid)

  boxes, scores, valid = (jnp.concatenate(x) for x in (boxes, scores, valid))
  # The best post_nms_topk over all levels; invalid entries score -inf.
  scores, top = jax.lax.top_k(scores, min(post_nms_topk, scores.shape[0]))
  boxes, valid = boxes[top], valid[top]
  pad = post_nms_topk - scores.shape[0]
  if pad > 0:
    boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
    scores = jnp.pad(scores, (0, pad), constant_values=-jnp.inf)
    valid = jnp.pad(valid, (0, pad))
  return jnp.where(valid[:, None], boxes, 0.0), scores, valid
