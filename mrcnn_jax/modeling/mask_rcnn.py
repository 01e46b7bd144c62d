"""Mask R-CNN: the two stages composed, in training and inference mode.

Stage 1: backbone (+ FPN) features and the RPN's proposals (modeling/rpn.py).
Stage 2: the RoI heads on the proposals, box, mask and keypoint heads in
parallel (modeling/roi_heads.py; Mask R-CNN, sec. 3). Each part owns its
settings; this module owns only how they meet: the features, the images'
padded extents, and the views of test-time augmentation.

Two designs share every op: ``fpn`` set (RPN on P2..P6, RoIs read from
P2..P5 by size) or ``fpn=None``, the C4 design (RPN and RoIAlign on C4, res5
as the box head, which must then be a ``Res5Head``).

The parts share this module's parameter scope, so parameters are named by
network: ``backbone``, ``fpn``, ``rpn_head``, ``box_head``, ``mask_head``,
``keypoint_head`` (the names converted checkpoints use, convert.py).

Entry points (``model.apply(variables, ..., method=...)``):
  ``losses(images, image_info, gt, rng, train=True)`` -> (losses, diagnostics)
  ``detect(images, image_info)`` -> fixed-size detections
  ``initialize(images)`` -> nothing; for ``model.init`` (cheapest to compile)
"""

from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax import losses as loss_lib
from mrcnn_jax import sharding
from mrcnn_jax.modeling import padding
from mrcnn_jax.modeling import views as view_lib
from mrcnn_jax.modeling.roi_heads import RoIFeatures
from mrcnn_jax.ops import boxes as box_ops

Array = jnp.ndarray


class MaskRCNN(nn.Module):
  """Mask R-CNN over a fixed canvas, composed by ``build.build_model`` from a config."""
  backbone: nn.Module  # ResNet
  rpn: nn.Module  # RPN
  roi_heads: nn.Module  # RoIHeads
  fpn: Optional[nn.Module]  # FPN, or None for the C4 design
  # Each image's size is rounded up to this (the references' padding); the
  # backbone, FPN, RPN, anchors and RoIAlign see only that extent, so results
  # do not depend on the canvas (modeling/padding.py). 0: the whole canvas.
  size_divisibility: int
  # Test-time augmentation (see ``detect``): mirrored views, views at these
  # image scales (1.0, the plain view, is always one), and whether they also
  # vote on the boxes or only feed the mask and keypoint heads.
  test_flip: bool
  test_scales: Sequence[float]
  test_augment_boxes: bool
  # Each keypoint's mirror partner (COCO: left_eye <-> right_eye, nose itself),
  # for the flip test; the data's flip map (meta.json "keypoint_flip_map").
  keypoint_flip_map: Sequence[int]

  def setup(self):
    nn.share_scope(self, self.rpn)
    nn.share_scope(self, self.roi_heads)

  # ------------------------------------------------------------------ stage 1
  def features(self, images: Array, image_size: Optional[Array], train: bool):
    """Returns (RPN maps, their strides, ``RoIFeatures``).

    ``image_size [B, 2]`` None (``initialize``) masks nothing.
    """
    image_extent = None
    if image_size is not None and self.size_divisibility:
      image_extent = padding.extent(image_size, self.size_divisibility)
    # Spatial partitioning (sharding.py; nothing without a 'space' mesh axis).
    images = sharding.constrain_spatial(images)
    c = sharding.constrain_spatial(self.backbone(images, train=train, image_extent=image_extent))
    if self.fpn is None:  # C4: RPN and RoIs both read C4 (stride 16)
      return [c["c4"]], [16], RoIFeatures([c["c4"]], [16], image_extent)
    p = sharding.constrain_spatial(self.fpn(c, image_extent=image_extent, train=train),
                                   subsampled_top=self.fpn.top_block)
    names = sorted(p, key=lambda n: int(n[1:]))
    maps = [p[n] for n in names]
    strides = [2 ** int(n[1:]) for n in names]
    # RoIs read P2..P5; P6 serves only the RPN (FPN paper, sec. 4.2).
    return maps, strides, RoIFeatures(maps[:-1], strides[:-1], image_extent)

  def proposals(self, images: Array, image_size: Array, train: bool, training_counts: bool):
    """Features and the RPN's output (``rpn.RPNOutput``) for ``images``."""
    maps, strides, roi_features = self.features(images, image_size, train)
    image_extent = roi_features.image_extent
    if image_extent is None:  # every position of the canvas exists
      image_extent = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32),
                                      (images.shape[0], 2))
    return roi_features, self.rpn(maps, strides, image_extent, image_size, training_counts)

  def parts(self):
    """(rpn, roi_heads) in this module's shared scope, for tools that run one part alone:
    the scope is shared when a method of this module runs, so ``model.rpn`` reached
    before any method ran would look for its parameters elsewhere."""
    return self.rpn, self.roi_heads

  # ------------------------------------------------------------------ init
  def initialize(self, images: Array) -> None:
    """Creates every variable with one cheap pass (no proposals, targets or NMS).

    ``model.init(key, images, method="initialize")`` gives the same variables
    as initialising through ``losses`` at a fraction of the compile time.
    """
    maps, _, roi_features = self.features(images, None, train=False)
    self.rpn.rpn_head(maps)
    self.roi_heads.initialize(roi_features, images.shape[0])

  # ------------------------------------------------------------------ training
  def losses(self, images: Array, image_info: Dict[str, Array], gt: Dict[str, Array],
             rng: jax.Array, train: bool = True) -> Tuple[Dict[str, Array], Dict[str, Array]]:
    """All losses of one batch.

    Args:
      images: ``[B, H, W, 3]`` normalised, padded to the canvas.
      image_info: ``image_size [B, 2]`` (height, width of the image inside the
        canvas); other entries are ignored here.
      gt: ``gt_boxes [B, G, 4]``, ``gt_classes [B, G]`` in ``[0, K)``,
        ``gt_valid [B, G]``, ``gt_is_crowd [B, G]``, and where the heads are
        on ``gt_masks [B, G, M, M]`` (box-cropped) and
        ``gt_keypoints [B, G, Kp, 3]`` (continuous coordinates, v > 0 visible).
      rng: one key for this step; split here per purpose.
      train: BatchNorm mode ("bn" norms use batch statistics); the training
        proposal counts and RoI sampling are used either way.

    Returns:
      (losses: ``loss_*`` scalars and their sum ``loss``,
       diagnostics: scalars such as ``fg_fraction`` and ``proposal_recall``).
    """
    rpn_key, roi_key = jax.random.split(rng)
    roi_features, rpn_out = self.proposals(images, image_info["image_size"], train,
                                           training_counts=True)
    gt_boxes = gt["gt_boxes"].astype(jnp.float32)
    out = self.rpn.losses(rpn_out, gt_boxes, gt["gt_valid"], gt["gt_is_crowd"], rpn_key)
    head_losses, rois = self.roi_heads.losses(roi_features, rpn_out.proposals,
                                              rpn_out.proposals_valid, image_info["image_size"],
                                              gt, roi_key, train)
    out |= head_losses
    out["loss"] = loss_lib.total(out)
    return out, _diagnostics(rois, rpn_out.proposals, rpn_out.proposals_valid, gt_boxes,
                             gt["gt_valid"] & ~gt["gt_is_crowd"])

  # ------------------------------------------------------------------ inference
  def detect(self, images: Array, image_info: Dict[str, Array]) -> Dict[str, Array]:
    """Fixed-size detections per image.

    With test-time augmentation (``test_flip``, ``test_scales``) the image is
    also seen mirrored and rescaled: every view's box-head candidates join
    one class-aware NMS when ``test_augment_boxes`` is set (detectron2's
    DatasetMapperTTA + GeneralizedRCNNWithTTA merge every view's detections
    the same way), and the mask and keypoint heads always run on the final
    boxes in every view, their outputs mapped back and averaged (``_views_heads``).

    Returns:
      ``boxes [B, D, 4]`` (canvas pixels), ``scores [B, D]``, ``classes [B, D]``
      in ``[0, K)``, ``valid [B, D]``; with the mask head ``masks [B, D, S, S]``
      (probabilities over each box); with the keypoint head
      ``keypoints [B, D, Kp, 3]`` (x, y, score).
    """
    image_size = image_info["image_size"]
    views, candidates = [], []
    for scale, flip in view_lib.inference_views(self.test_scales, self.test_flip):
      view_images, view_size, view = view_lib.view_images(images, image_size, scale, flip)
      if not candidates or self.test_augment_boxes:
        roi_features, rpn_out = self.proposals(view_images, view_size, train=False,
                                               training_counts=False)
        logits, deltas, boxes = self.roi_heads.box_predictions(roi_features,
                                                              rpn_out.proposals, view_size)
        # Back to the plain image: a mirrored view's x-offsets change sign
        # (the size deltas and offsets relative to the box are scale-free).
        if flip:
          deltas = deltas * jnp.asarray([-1.0, 1.0, 1.0, 1.0], deltas.dtype)
        candidates.append((logits, deltas, view.from_view(boxes), rpn_out.proposals_valid))
      else:
        roi_features = self.features(view_images, view_size, train=False)[2]
      views.append((roi_features, view))
    logits, deltas, boxes, boxes_valid = (
        jnp.concatenate(parts, axis=1) for parts in zip(*candidates))
    dets = self.roi_heads.detections(logits, deltas, boxes, boxes_valid, image_size)
    out = {k: dets[k] for k in ("boxes", "scores", "classes", "valid")}
    masks, heatmaps = self._views_heads(views, dets["boxes"], dets["classes"], dets["valid"])
    if masks is not None:
      out["masks"] = masks
    if heatmaps is not None:
      out["keypoints"] = self.roi_heads.keypoints(heatmaps, dets["boxes"])
    return out

  def _views_heads(self, views, boxes, classes, valid):
    """The mask and keypoint heads on ``boxes`` in every view, mapped back and averaged.

    Mask probabilities are averaged as detectron2's test-time augmentation
    averages them; keypoint heatmap logits are averaged (the product of the
    views' softmax distributions), each keypoint's map in a mirrored view
    taken from its mirror partner (``keypoint_flip_map``), as top-down pose
    estimators do. Heatmaps and masks cover the box, so a rescaled view needs
    no resampling. Returns ``([B, D, S, S] or None, [B, D, m, m, Kp] or None)``.
    """
    masks, heatmaps = [], []
    for roi_features, view in views:
      m, h = self.roi_heads.detection_heads(roi_features, view.to_view(boxes), classes, valid)
      if view.mirror_width is not None:  # mirror back along x
        # masks [B, D, S, S], heatmaps [B, D, m, m, Kp]
        m = None if m is None else m[..., ::-1]
        h = None if h is None else h[..., ::-1, :][..., jnp.asarray(self.keypoint_flip_map)]
      masks.append(m)
      heatmaps.append(h)
    mean = lambda xs: None if xs[0] is None else sum(xs) / len(xs)
    return mean(masks), mean(heatmaps)


def _diagnostics(rois, proposals, proposals_valid, gt_boxes, gt_objects) -> Dict[str, Array]:
  """Scalars that show how training goes: foreground RoIs, proposals, their recall."""
  num_valid = jnp.maximum(jnp.sum(rois["valid"]), 1)
  iou = jax.vmap(box_ops.pairwise_iou)(proposals, gt_boxes)  # (B, P, G)
  best = jnp.max(jnp.where(proposals_valid[:, :, None], iou, 0.0), axis=1)  # (B, G)
  num_gt = jnp.sum(gt_objects)
  recall = jnp.sum((best >= 0.5) & gt_objects) / jnp.maximum(num_gt, 1)
  return {
      "fg_fraction": jnp.sum(rois["foreground"]) / num_valid,
      "num_fg_rois": jnp.sum(rois["foreground"]) / rois["valid"].shape[0],
      "proposal_recall": recall,
      "num_proposals": jnp.sum(proposals_valid) / proposals_valid.shape[0],
  }
