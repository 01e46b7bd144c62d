"""Region Proposal Network (Ren et al. 2015, sec. 3.1).

``RPN`` is stage 1 after the features: anchors on every map, the head, the
proposals (top-k per level, NMS, top-k per image), and in training the
anchors' targets and the two RPN losses. It owns every RPN setting.

``RPNHead`` is its network, one head shared by every level: a 3x3 conv with ReLU (``num_convs`` of them,
named ``conv``, ``conv2``, ...: the TPU and LSJ recipes use two), then per
anchor one objectness logit and four box deltas. Outputs are flattened in the anchors'
order (position-major, then anchor; see ops/anchors.py), which is also the
order of torchvision's channels ``a * 4 + coord``, so its weights line up.
"""

from typing import Dict, List, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax import losses as loss_lib
from mrcnn_jax import sharding
from mrcnn_jax.modeling.conv import Conv
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import proposals as proposal_ops
from mrcnn_jax.ops import targets as target_ops

# torchvision and detectron2: normal(std=0.01) weights, zero biases.
rpn_init = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
  """``[B, H, W, C]`` per level -> objectness ``[B, H*W*A]`` and deltas ``[B, H*W*A, 4]``."""
  num_anchors: int = 3  # A: anchors per position (sizes x aspect ratios)
  dtype: jnp.dtype = jnp.float32
  num_convs: int = 1  # shared 3x3 convs (with ReLU) before the predictors

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> Tuple[List, List]:
    channels = features[0].shape[-1]
    shared = [Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=rpn_init,
                   dtype=self.dtype, name="conv" if i == 0 else f"conv{i + 1}")
              for i in range(self.num_convs)]
    cls = Conv(self.num_anchors, (1, 1), kernel_init=rpn_init, dtype=self.dtype,
               name="objectness")
    reg = Conv(self.num_anchors * 4, (1, 1), kernel_init=rpn_init, dtype=self.dtype,
               name="deltas")
    objectness, deltas = [], []
    for x in features:
      b = x.shape[0]
      h = x
      for conv in shared:
        h = nn.relu(conv(h))
      objectness.append(cls(h).astype(jnp.float32).reshape(b, -1))
      deltas.append(reg(h).astype(jnp.float32).reshape(b, -1, 4))
    return objectness, deltas


def propose(objectness: Sequence[jnp.ndarray], deltas: Sequence[jnp.ndarray],
            anchors: Sequence, image_size: jnp.ndarray, pre_nms_topk: int,
            post_nms_topk: int, nms_threshold: float = 0.7, min_size: float = 0.0):
  """Batched ``ops.proposals.generate_proposals``; no gradient flows into proposals.

  Args:
    objectness, deltas: per level ``[B, A_l]`` and ``[B, A_l, 4]``.
    anchors: per level ``[B, A_l, 4]`` (each image's own, ops/anchors.py).
    image_size: ``[B, 2]`` (height, width) of each image in the canvas.

  Returns:
    boxes ``[B, P, 4]``, logits ``[B, P]``, valid ``[B, P]``.
  """
  objectness = [jax.lax.stop_gradient(o) for o in objectness]
  deltas = [jax.lax.stop_gradient(d) for d in deltas]

  def one(obj, dlt, anc, size):
    return proposal_ops.generate_proposals(obj, dlt, anc, (size[0], size[1]),
                                           pre_nms_topk, post_nms_topk, nms_threshold,
                                           min_size)

  return jax.vmap(one)(objectness, deltas, list(anchors), image_size.astype(jnp.float32))


class RPNOutput(NamedTuple):
  """What the RPN computed: per level ``[B, A_l]`` / ``[B, A_l, 4]`` lists, then the
  proposals ``[B, P, 4]`` and their validity ``[B, P]``."""
  objectness: List[jnp.ndarray]
  deltas: List[jnp.ndarray]
  anchors: List[jnp.ndarray]
  anchors_valid: List[jnp.ndarray]
  proposals: jnp.ndarray
  proposals_valid: jnp.ndarray


class RPN(nn.Module):
  """Maps -> proposals, and the RPN losses (each setting's recipe value: build.model_config)."""
  rpn_head: nn.Module  # RPNHead
  # One tuple of anchor sizes per level (FPN P2..P6; C4 has one level).
  anchor_sizes: Sequence[Sequence[float]]
  aspect_ratios: Sequence[float]
  # "detectron2" (nominal strides, unrounded) or "torchvision" (rounded, each
  # image's padded size // its grid as the stride): see ops/anchors.py.
  anchor_layout: str
  # Proposals: the top-k per level before NMS, then the top-k per image.
  pre_nms_topk_train: int
  post_nms_topk_train: int
  pre_nms_topk_test: int
  post_nms_topk_test: int
  nms_threshold: float
  min_size: float
  # Training: anchors below / above these IoUs are negative / positive, 256
  # sampled per image, at most half positive; anchors in a crowd region
  # (IoA >= crowd_ioa_threshold) are ignored.
  iou_thresholds: Tuple[float, float]
  batch_size_per_image: int
  positive_fraction: float
  crowd_ioa_threshold: float
  # "smooth_l1" with beta 0 is detectron2's L1.
  loss_type: str
  smooth_l1_beta: float

  def __call__(self, maps: Sequence[jnp.ndarray], strides: Sequence[int],
               image_extent: jnp.ndarray, image_size: jnp.ndarray,
               training_counts: bool) -> RPNOutput:
    """Proposals from ``maps`` (one per level, ``[B, H_l, W_l, C]``).

    ``image_extent [B, 2]``: each image's padded size, where its anchors
    exist; ``image_size [B, 2]``: the image itself, where proposals are
    clipped. ``training_counts`` picks the training top-k counts.
    """
    # Per anchor: not split over a 'space' mesh axis (sharding.py).
    objectness, deltas = sharding.unsplit_spatial(self.rpn_head(maps))
    anchors, anchors_valid = self.anchors(maps, strides, image_extent)
    pre, post = ((self.pre_nms_topk_train, self.post_nms_topk_train) if training_counts
                 else (self.pre_nms_topk_test, self.post_nms_topk_test))
    # Anchors the image does not have never propose (-inf never passes the top-k as valid).
    proposals, _, proposals_valid = propose(
        [jnp.where(v, o, -jnp.inf) for o, v in zip(objectness, anchors_valid)], deltas,
        anchors, image_size, pre, post, self.nms_threshold, self.min_size)
    return RPNOutput(objectness, deltas, anchors, anchors_valid, proposals, proposals_valid)

  def anchors(self, maps, strides, image_extent: jnp.ndarray):
    """Per level: anchors ``[B, A_l, 4]`` and valid ``[B, A_l]`` (see ops/anchors.py)."""
    if len(self.anchor_sizes) != len(maps):
      raise ValueError(f"anchor_sizes: expected one tuple per RPN level ({len(maps)}), "
                       f"got {len(self.anchor_sizes)}")
    anchors, valid = [], []
    for m, stride, sizes in zip(maps, strides, self.anchor_sizes):
      a, v = jax.vmap(lambda e: anchor_ops.image_anchors(
          m.shape[1:3], stride, sizes, self.aspect_ratios, e, self.anchor_layout))(image_extent)
      anchors.append(a)
      valid.append(v)
    return anchors, valid

  def losses(self, out: RPNOutput, gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray,
             gt_is_crowd: jnp.ndarray, key: jax.Array) -> Dict[str, jnp.ndarray]:
    """``loss_rpn_cls`` and ``loss_rpn_loc`` over every level's anchors at once."""
    anchors = jnp.concatenate(out.anchors, axis=1)  # (B, A, 4)
    targets = jax.vmap(lambda a, av, gb, gv, gc, k: target_ops.rpn_targets(
        a, gb, gv, gc, k, self.iou_thresholds, self.batch_size_per_image,
        self.positive_fraction, self.crowd_ioa_threshold, anchors_valid=av))(
            anchors, jnp.concatenate(out.anchors_valid, axis=1), gt_boxes, gt_valid,
            gt_is_crowd, jax.random.split(key, gt_boxes.shape[0]))
    return loss_lib.rpn_losses(jnp.concatenate(out.objectness, axis=1),
                               jnp.concatenate(out.deltas, axis=1), anchors, targets,
                               self.batch_size_per_image, self.loss_type, self.smooth_l1_beta)
