"""Stage 2: the RoI heads (Mask R-CNN, sec. 3) and what they own.

``RoIHeads`` samples RoIs among the proposals, reads a fixed-size feature per
RoI with RoIAlign (``Pooler``), and runs the box head and, in parallel, the
mask and keypoint heads; in training it computes their targets and losses, at
inference the final detections (``Postprocess``) and the masks and keypoints
of those. Every count is fixed: R sampled RoIs (foreground first, see
ops/sampling.py), the first ``num_mask_rois`` of them for the mask head,
``num_keypoint_rois`` for the keypoint head (those whose instance has a
visible keypoint first), D detections. The mask and keypoint heads cost what
their real RoIs cost (``head_chunk_size``, modeling/chunked.py).

The box head is a ``BoxHead`` (FPN design) or a ``Res5Head`` (C4 design:
ResNet's res5 stage as the box head, whose output the mask head then reads).
"""

import dataclasses
import functools
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax import losses as loss_lib
from mrcnn_jax.modeling import chunked
from mrcnn_jax.modeling import keypoint_head as kp_lib
from mrcnn_jax.modeling.res5_head import Res5Head
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import postprocess
from mrcnn_jax.ops import roi_align as roi_ops
from mrcnn_jax.ops import targets as target_ops

Array = jnp.ndarray


class RoIFeatures(NamedTuple):
  """What RoIAlign reads: one map per level (FPN P2..P5, or C4 alone), their
  strides, and each image's extent ``[B, 2]`` (None: the whole canvas)."""
  maps: Sequence[Array]
  strides: Sequence[int]
  image_extent: Optional[Array]


@dataclasses.dataclass(frozen=True)
class Pooler:
  """RoIAlign settings shared by every head (the output size is each head's)."""
  sampling_ratio: int  # 0: adaptive (detectron2), up to max_sampling_ratio
  max_sampling_ratio: int
  aligned: bool
  # FPN level of a RoI: 4 + log2(sqrt(area) / canonical_box_size) (FPN paper,
  # eq. 1: 224, ImageNet's size, for ~800-pixel images). Scale it with the
  # image size so small canvases still read large objects from coarse levels.
  canonical_box_size: float

  def __call__(self, features: RoIFeatures, boxes: Array, resolution: int) -> Array:
    """RoIAlign of ``boxes [B, R, 4]`` -> ``[B, R, S, S, C]``."""
    return roi_ops.multilevel_roi_align_batch(
        features.maps, boxes, features.strides, resolution, self.sampling_ratio,
        self.aligned, canonical_box_size=self.canonical_box_size,
        image_extent=features.image_extent, max_sampling_ratio=self.max_sampling_ratio)


@dataclasses.dataclass(frozen=True)
class Postprocess:
  """Box-head outputs -> D detections per image (ops/postprocess.py)."""
  score_threshold: float
  nms_threshold: float
  detections_per_image: int
  max_candidates: int
  min_box_size: float  # detections with a side under this are dropped (torchvision 1e-2)

  def __call__(self, logits: Array, deltas: Array, boxes: Array, boxes_valid: Array,
               image_size: Array, weights: Sequence[float]) -> Dict[str, Array]:
    """Batched ``postprocess.detect`` of ``deltas`` on ``boxes`` (box coder ``weights``);
    ``image_size [B, 2]`` clips the results."""
    return jax.vmap(lambda lg, dl, p, pv, s: postprocess.detect(
        lg, dl, p, pv, (s[0], s[1]), self.score_threshold, self.nms_threshold,
        self.detections_per_image, self.max_candidates, self.min_box_size, weights))(
            logits, deltas, boxes, boxes_valid, image_size.astype(jnp.float32))


class RoIHeads(nn.Module):
  """Box, mask and keypoint heads on RoIs (each setting's recipe value: build.model_config)."""
  box_head: nn.Module  # BoxHead (FPN) or Res5Head (C4)
  num_classes: int
  # RoI sampling (Fast R-CNN): 512 RoIs per image, up to 25% foreground at
  # IoU >= 0.5; RoIs in a crowd region (IoA >= crowd_ioa_threshold) are ignored.
  batch_size_per_image: int
  positive_fraction: float
  iou_threshold: float
  crowd_ioa_threshold: float
  num_mask_rois: int  # foreground RoI slots for the mask head
  # RoI slots for the keypoint head: foreground RoIs with a visible keypoint
  # of their instance inside them first (detectron2 trains the keypoint head
  # on exactly those), so classes without keypoints do not take the slots.
  num_keypoint_rois: int
  # The mask and keypoint heads run over chunks of this many RoIs (per device,
  # real RoIs first), skipping chunks without one: their cost follows the
  # foreground RoIs and valid detections, not the slot counts (chunked.py).
  # 0 runs the heads over every slot at once.
  head_chunk_size: int
  pooler: Pooler
  box_pooler_resolution: int  # 14 for C4 (res5 halves it)
  mask_pooler_resolution: int
  keypoint_pooler_resolution: int
  # "smooth_l1" with beta 0 is detectron2's L1.
  box_loss_type: str
  box_smooth_l1_beta: float
  # Multiplies loss_keypoint (detectron2's ROI_KEYPOINT_HEAD.LOSS_WEIGHT). The
  # keypoint loss is a sum of m*m-way cross-entropies per visible keypoint,
  # so its gradient in the shared backbone can be far above the other
  # losses'; lower it where it swamps them.
  keypoint_loss_weight: float
  # Adds loss_keypoint_position (losses.keypoint_position_loss: L1 in heatmap
  # cells of the "local_mean" decoding) times this (and keypoint_loss_weight);
  # 0 = the paper's cross-entropy alone.
  keypoint_position_loss_weight: float
  # The keypoint head pools and predicts over each box scaled by this factor
  # about its centre (1.0: detectron2). A heatmap covers only its box, so
  # keypoints on the object's outline (a polygon's corners, which lie on its
  # box) need some margin: a box regressed a pixel too tight otherwise puts
  # them out of reach, and in training they fall outside smaller RoIs.
  keypoint_box_scale: float
  # How detections' heatmaps become keypoints: "bicubic" (detectron2's argmax
  # over the RoI's pixels) or "local_mean" (sub-pixel; see keypoint_head).
  keypoint_decode: str
  postprocess: Postprocess
  mask_head: Optional[nn.Module] = None  # None: Faster R-CNN
  keypoint_head: Optional[nn.Module] = None

  @property
  def stages(self):
    """(box head, foreground IoU, box coder weights) of each box stage: one here
    (modeling/cascade.py has more); the last stage's boxes are the detections'."""
    return [(self.box_head, self.iou_threshold, box_ops.BOX_HEAD_WEIGHTS)]

  @property
  def res5_box_head(self) -> bool:
    """The C4 design: the mask head reads the box head's res5 output."""
    return isinstance(self.box_head, Res5Head)

  def initialize(self, features: RoIFeatures, batch_size: int) -> None:
    """Creates every head's variables on one box per image."""
    one_box = jnp.zeros((batch_size, 1, 4), jnp.float32)
    _, _, res5 = self.box_outputs(features, one_box, train=False)
    if self.mask_head is not None:
      self.mask_logits(features, one_box, jnp.zeros((batch_size, 1), jnp.int32),
                       jnp.ones((batch_size, 1), bool), res5)
    if self.keypoint_head is not None:
      self.keypoint_head(self.pooler(features, one_box, self.keypoint_pooler_resolution))

  # ------------------------------------------------------------------ training
  def losses(self, features: RoIFeatures, proposals: Array, proposals_valid: Array,
             image_size: Array, gt: Dict[str, Array], key: jax.Array, train: bool):
    """Samples RoIs and returns (``loss_*`` of every head, the sampled RoIs).

    ``image_size [B, 2]`` and ``gt`` as ``MaskRCNN.losses`` takes them; ``train``:
    BatchNorm mode.
    """
    gt_boxes = gt["gt_boxes"].astype(jnp.float32)
    rois = jax.vmap(lambda p, pv, gb, gcl, gv, gc, k: target_ops.roi_targets(
        p, pv, gb, gcl, gv, gc, k, self.num_classes, self.batch_size_per_image,
        self.positive_fraction, self.iou_threshold, self.crowd_ioa_threshold))(
            proposals, proposals_valid, gt_boxes, gt["gt_classes"], gt["gt_valid"],
            gt["gt_is_crowd"], jax.random.split(key, proposals.shape[0]))
    out, res5 = self.box_losses(features, rois, gt, image_size, train)
    if self.mask_head is not None:
      out["loss_mask"] = self._mask_loss(features, rois, gt_boxes, gt["gt_masks"], res5)
    if self.keypoint_head is not None:
      ce, position = self._keypoint_loss(features, rois, gt["gt_keypoints"])
      out["loss_keypoint"] = self.keypoint_loss_weight * ce
      if position is not None:
        out["loss_keypoint_position"] = (
            self.keypoint_loss_weight * self.keypoint_position_loss_weight * position)
    return out, rois

  def box_losses(self, features: RoIFeatures, rois: Dict[str, Array], gt: Dict[str, Array],
                 image_size: Array, train: bool):
    """(``loss_cls``, ``loss_box_reg``; res5 or None) of the box head on the sampled RoIs."""
    del gt, image_size  # the sampled RoIs carry their targets
    logits, deltas, res5 = self.box_outputs(features, rois["boxes"], train)
    return loss_lib.box_head_losses(logits, deltas, rois, self.box_loss_type,
                                    self.box_smooth_l1_beta), res5

  def _mask_loss(self, features, rois, gt_boxes, gt_masks, res5):
    """The mask loss on the first ``num_mask_rois`` slots (foreground first)."""
    m = min(self.num_mask_rois, self.batch_size_per_image)
    boxes, foreground = rois["boxes"][:, :m], rois["foreground"][:, :m]
    classes = jnp.minimum(rois["classes"][:, :m], self.num_classes - 1)
    logits = self.mask_logits(features, boxes, classes, foreground, res5)
    targets = jax.vmap(lambda r, i, gb, gm: target_ops.mask_targets(
        r, i, gb, gm, logits.shape[-1], self.pooler.sampling_ratio))(
            boxes, rois["matched_gt"][:, :m], gt_boxes, gt_masks)
    return loss_lib.mask_loss(logits, targets, foreground)

  def _keypoint_loss(self, features, rois, gt_keypoints):
    """The keypoint losses (cross-entropy, position or None) on the ``num_keypoint_rois``
    slots ``target_ops.keypoint_rois`` picks."""
    n = min(self.num_keypoint_rois, self.batch_size_per_image)
    kps = jnp.take_along_axis(gt_keypoints, rois["matched_gt"][:, :, None, None], axis=1)
    boxes = box_ops.scale(rois["boxes"], self.keypoint_box_scale)
    slots, counts = jax.vmap(lambda r, f, k: target_ops.keypoint_rois(r, f, k, n))(
        boxes, rois["foreground"], kps)
    boxes = jnp.take_along_axis(boxes, slots[:, :, None], axis=1)
    kps = jnp.take_along_axis(kps, slots[:, :, None, None], axis=1)
    heatmaps = self._run_head(self.keypoint_head, self.pooler(
        features, boxes, self.keypoint_pooler_resolution), counts)
    kp_t = jax.vmap(lambda r, k: target_ops.keypoint_targets(r, k, heatmaps.shape[2]))(
        boxes, kps)
    valid = kp_t["valid"] & counts[:, :, None]
    position = None
    if self.keypoint_position_loss_weight:
      decoded = jax.vmap(kp_lib.local_mean_keypoints)(heatmaps, boxes)
      position = loss_lib.keypoint_position_loss(decoded, kps, boxes, heatmaps.shape[2], valid)
    return loss_lib.keypoint_loss(heatmaps, kp_t["index"], valid), position

  # ------------------------------------------------------------------ heads
  def box_outputs(self, features: RoIFeatures, boxes: Array, train: bool):
    """Returns (class logits, box deltas, res5 features or None) of ``boxes [B, R, 4]``."""
    pooled = self.pooler(features, boxes, self.box_pooler_resolution)
    if self.res5_box_head:
      res5, logits, deltas = self.box_head(pooled, train=train)
      return logits, deltas, res5
    logits, deltas = self.box_head(pooled, train=train)
    return logits, deltas, None

  def mask_logits(self, features: RoIFeatures, boxes: Array, classes: Array, valid: Array,
                  res5: Optional[Array] = None, differentiated: bool = True) -> Array:
    """Mask logits ``[B, R, S, S]`` of ``boxes [B, R, 4]`` for ``classes [B, R]``.

    ``valid [B, R]``: the RoIs whose masks are wanted (others may be zeros).
    C4: the mask head reads ``res5``, the box head's output at these boxes.
    ``differentiated``: whether a gradient is taken of the logits (selects the
    chunked head's convolution form; not BatchNorm's mode).
    """
    if res5 is not None:
      return _class_channel(self.mask_head(res5[:, :boxes.shape[1]]), classes)
    pooled = self.pooler(features, boxes, self.mask_pooler_resolution)
    return self._run_head(self.mask_head, (pooled, classes), valid,
                          lambda head, x: _class_channel(head(x[0]), x[1]), differentiated)

  def _run_head(self, head, inputs, valid, call=lambda head, x: head(x), differentiated=True):
    """``call(head, inputs)`` (inputs ``[B, R, ...]``), at the cost of the ``valid [B, R]``
    RoIs only where ``head_chunk_size`` is set (``chunked.run``). ``differentiated``:
    whether a gradient is taken of the result."""
    if not self.head_chunk_size or self.is_initializing():
      return call(head, inputs)
    # Inside the chunks' control flow the head is a pure function of its
    # parameters, and a differentiated one computes its convolutions as matmuls
    # (conv.py: XLA:CPU's convolution gradients are slow there, its forward is not).
    if differentiated:
      pure = head.clone(parent=None, conv_form="matmul")
    else:
      pure = head.clone(parent=None)
    fn = lambda params, x: call(functools.partial(pure.apply, {"params": params}), x)
    return chunked.run(fn, head.variables["params"], inputs, valid, self.head_chunk_size)

  # ------------------------------------------------------------------ inference
  def box_predictions(self, features: RoIFeatures, proposals: Array, image_size: Array):
    """(class logits, box deltas, the boxes the deltas apply to) for ``detections``;
    ``image_size [B, 2]``: each image in the canvas."""
    del image_size
    logits, deltas, _ = self.box_outputs(features, proposals, False)
    return logits, deltas, proposals

  def detections(self, logits: Array, deltas: Array, boxes: Array, boxes_valid: Array,
                 image_size: Array) -> Dict[str, Array]:
    """``box_predictions``' outputs -> D detections per image (``Postprocess``)."""
    return self.postprocess(logits, deltas, boxes, boxes_valid, image_size,
                            self.stages[-1][2])

  def detection_heads(self, features: RoIFeatures, boxes: Array, classes: Array,
                      valid: Array) -> Tuple[Optional[Array], Optional[Array]]:
    """Mask probabilities ``[B, D, S, S]`` of each box's class and keypoint heatmap
    logits ``[B, D, m, m, Kp]`` over its scaled box (each None without its head);
    zeros where ``valid [B, D]`` is False."""
    masks = heatmaps = None
    if self.mask_head is not None:
      # C4: the mask head reads res5, which the box head computes at these boxes.
      res5 = self.box_outputs(features, boxes, False)[2] if self.res5_box_head else None
      masks = jax.nn.sigmoid(self.mask_logits(features, boxes, classes, valid, res5,
                                                  differentiated=False))
      masks = jnp.where(valid[:, :, None, None], masks, 0.0)
    if self.keypoint_head is not None:
      heatmaps = self._run_head(self.keypoint_head, self.pooler(
          features, box_ops.scale(boxes, self.keypoint_box_scale),
          self.keypoint_pooler_resolution), valid, differentiated=False)
    return masks, heatmaps

  def keypoints(self, heatmaps: Array, boxes: Array) -> Array:
    """Heatmap logits ``[B, D, m, m, Kp]`` of ``boxes [B, D, 4]`` -> ``[B, D, Kp, 3]``."""
    return jax.vmap(functools.partial(kp_lib.decode_keypoints, method=self.keypoint_decode))(
        heatmaps, box_ops.scale(boxes, self.keypoint_box_scale))


def _class_channel(mask_logits: Array, classes: Array) -> Array:
  """``[..., S, S, K]`` per-class mask logits -> ``[..., S, S]`` of each RoI's class ``[...]``."""
  return jnp.take_along_axis(mask_logits, classes[..., None, None, None], axis=-1)[..., 0]
