"""Mask R-CNN: the two stages composed, in training and inference mode.

Stage 1: backbone (+ FPN) features, the RPN, proposals. Stage 2: RoIAlign on
the proposals and the box, mask and keypoint heads in parallel (Mask R-CNN,
sec. 3). Every count is fixed: P proposals, R sampled RoIs (foreground first,
see ops/sampling.py), the first ``num_mask_rois`` of them for the mask head,
``num_keypoint_rois`` for the keypoint head (those whose instance has a
visible keypoint first), D detections, so one compiled program serves every
batch; the mask and keypoint heads cost what their real RoIs cost
(``head_chunk_size``, modeling/chunked.py).

Two designs share every op: ``fpn`` set (RPN on P2..P6, RoIs read from
P2..P5 by size) or ``fpn=None``, the C4 design (RPN and RoIAlign on C4, res5
as the box head, which must then be a ``Res5Head``).

Entry points (``model.apply(variables, ..., method=...)``):
  ``losses(images, image_info, gt, rng, train=True)`` -> (losses, diagnostics)
  ``detect(images, image_info)`` -> fixed-size detections
  ``initialize(images)`` -> nothing; for ``model.init`` (cheapest to compile)
"""

import functools
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax import losses as loss_lib
from mrcnn_jax import sharding
from mrcnn_jax.modeling import chunked
from mrcnn_jax.modeling import keypoint_head as kp_lib
from mrcnn_jax.modeling import padding
from mrcnn_jax.modeling import rpn as rpn_lib
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import postprocess
from mrcnn_jax.ops import roi_align as roi_ops
from mrcnn_jax.ops import targets as target_ops

Array = jnp.ndarray
VIEW_DIVISIBILITY = 32  # rescaled test views are padded to a multiple of P5's stride


class MaskRCNN(nn.Module):
  """Mask R-CNN over a fixed ``canvas_size``; defaults are detectron2's R50-FPN recipe."""
  backbone: nn.Module  # ResNet
  rpn_head: nn.Module  # RPNHead
  box_head: nn.Module  # BoxHead (FPN) or Res5Head (C4)
  fpn: Optional[nn.Module] = None  # FPN, or None for the C4 design
  mask_head: Optional[nn.Module] = None  # None: Faster R-CNN
  keypoint_head: Optional[nn.Module] = None
  num_classes: int = 80
  # Anchors: one tuple of sizes per RPN level (FPN P2..P6; C4 has one level).
  anchor_sizes: Sequence[Sequence[float]] = anchor_ops.FPN_SIZES
  aspect_ratios: Sequence[float] = anchor_ops.ASPECT_RATIOS
  # "detectron2" (nominal strides, unrounded) or "torchvision" (rounded, each
  # image's padded size // its grid as the stride): see ops/anchors.py.
  anchor_layout: str = "detectron2"
  # Each image's size is rounded up to this (the references' padding); the
  # backbone, FPN, RPN, anchors and RoIAlign see only that extent, so results
  # do not depend on the canvas (modeling/padding.py). 0: the whole canvas.
  size_divisibility: int = 32
  # RPN (detectron2 R50-FPN: 2000/1000 pre-NMS per level, 1000 post-NMS per image).
  rpn_pre_nms_topk_train: int = 2000
  rpn_post_nms_topk_train: int = 1000
  rpn_pre_nms_topk_test: int = 1000
  rpn_post_nms_topk_test: int = 1000
  rpn_nms_threshold: float = 0.7
  rpn_min_size: float = 0.0
  rpn_iou_thresholds: Tuple[float, float] = (0.3, 0.7)
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  # RoI sampling (Fast R-CNN): 512 RoIs per image, up to 25% foreground.
  roi_batch_size_per_image: int = 512
  roi_positive_fraction: float = 0.25
  roi_iou_threshold: float = 0.5
  num_mask_rois: int = 128  # foreground RoI slots for the mask head
  # RoI slots for the keypoint head: foreground RoIs with a visible keypoint
  # of their instance inside them first (detectron2 trains the keypoint head
  # on exactly those), so classes without keypoints do not take the slots.
  num_keypoint_rois: int = 128
  crowd_ioa_threshold: float = 0.7
  # The mask and keypoint heads run over chunks of this many RoIs (per device,
  # real RoIs first), skipping chunks without one: their cost follows the
  # foreground RoIs and valid detections, not the slot counts (chunked.py).
  # 0 runs the heads over every slot at once.
  head_chunk_size: int = 32
  # RoIAlign.
  box_pooler_resolution: int = 7  # 14 for C4 (res5 halves it)
  mask_pooler_resolution: int = 14
  keypoint_pooler_resolution: int = 14
  sampling_ratio: int = 2  # 0: adaptive (detectron2), up to max_sampling_ratio
  max_sampling_ratio: int = 4
  aligned: bool = True
  # FPN level of a RoI: 4 + log2(sqrt(area) / canonical_box_size) (FPN paper,
  # eq. 1: 224, ImageNet's size, for ~800-pixel images). Scale it with the
  # image size so small canvases still read large objects from coarse levels.
  canonical_box_size: float = 224.0
  # Losses: "smooth_l1" with beta 0 is detectron2's L1.
  rpn_loss_type: str = "smooth_l1"
  rpn_smooth_l1_beta: float = 0.0
  box_loss_type: str = "smooth_l1"
  box_smooth_l1_beta: float = 0.0
  # Multiplies loss_keypoint (detectron2's ROI_KEYPOINT_HEAD.LOSS_WEIGHT). The
  # keypoint loss is a sum of m*m-way cross-entropies per visible keypoint,
  # so its gradient in the shared backbone can be orders of magnitude above
  # the other losses' (measured on the shapes config: ~25x the box
  # classifier's after 400 steps); lower it where it swamps them.
  keypoint_loss_weight: float = 1.0
  # Adds loss_keypoint_position (losses.keypoint_position_loss: L1 in heatmap
  # cells of the "local_mean" decoding) times this (and keypoint_loss_weight);
  # 0 = the paper's cross-entropy alone.
  keypoint_position_loss_weight: float = 0.0
  # The keypoint head pools and predicts over each box scaled by this factor
  # about its centre (1.0: detectron2). A heatmap covers only its box, so
  # keypoints on the object's outline (a polygon's corners, which lie on its
  # box) need some margin: a box regressed a pixel too tight otherwise puts
  # them out of reach, and in training they fall outside smaller RoIs.
  keypoint_box_scale: float = 1.0
  # How detections' heatmaps become keypoints: "bicubic" (detectron2's argmax
  # over the RoI's pixels) or "local_mean" (sub-pixel; see keypoint_head).
  keypoint_decode: str = "bicubic"
  # Each keypoint's mirror partner (COCO: left_eye <-> right_eye, nose itself),
  # for the flip test; the data's flip map (meta.json "keypoint_flip_map").
  keypoint_flip_map: Sequence[int] = ()
  # Inference.
  score_threshold: float = 0.05
  nms_threshold: float = 0.5
  detections_per_image: int = 100
  max_candidates: int = 4000
  min_box_size: float = 0.0  # detections with a side under this are dropped (torchvision 1e-2)
  # Test-time augmentation (see ``detect``): mirrored views, views at these
  # image scales (1.0, the plain view, is always one), and whether they also
  # vote on the boxes or only feed the mask and keypoint heads.
  test_flip: bool = False
  test_scales: Sequence[float] = (1.0,)
  test_augment_boxes: bool = False

  # ------------------------------------------------------------------ stage 1
  def _extent(self, image_size: Array) -> Optional[Array]:
    """Each image's extent ``[B, 2]`` (masked padding, see padding.py), or None."""
    if not self.size_divisibility:
      return None
    return padding.extent(image_size, self.size_divisibility)

  def _features(self, images: Array, image_size: Optional[Array], train: bool):
    """Returns ((RPN feature maps, their strides), RoI features).

    RoI features are (maps, their strides, image extent or None), what
    ``_pool`` reads. ``image_size`` None (``initialize``) masks nothing.
    """
    image_extent = None if image_size is None else self._extent(image_size)
    # Spatial partitioning (sharding.py; nothing without a 'space' mesh axis).
    images = sharding.constrain_spatial(images)
    c = sharding.constrain_spatial(self.backbone(images, train=train, image_extent=image_extent))
    if self.fpn is None:  # C4: RPN and RoIs both read C4 (stride 16)
      return ([c["c4"]], [16]), ([c["c4"]], [16], image_extent)
    p = sharding.constrain_spatial(self.fpn(c, image_extent=image_extent, train=train),
                                   subsampled_top=self.fpn.top_block)
    names = sorted(p, key=lambda n: int(n[1:]))
    rpn_maps = [p[n] for n in names]
    strides = [2 ** int(n[1:]) for n in names]
    # RoIs read P2..P5; P6 serves only the RPN (FPN paper, sec. 4.2).
    return (rpn_maps, strides), (rpn_maps[:-1], strides[:-1], image_extent)

  def _anchors(self, maps, strides, image_extent: Array):
    """Per level: anchors ``[B, A_l, 4]`` and valid ``[B, A_l]`` (see ops/anchors.py).

    ``image_extent [B, 2]``: each image's padded size (the canvas's size
    where padding is not masked).
    """
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

  def _rpn(self, images, image_size, train: bool, training_counts: bool):
    (rpn_maps, rpn_strides), roi_features = self._features(images, image_size, train)
    objectness, deltas = sharding.unsplit_spatial(self.rpn_head(rpn_maps))  # per anchor
    image_extent = roi_features[2]
    if image_extent is None:  # every position of the canvas exists
      image_extent = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32),
                                      (images.shape[0], 2))
    anchors, anchors_valid = self._anchors(rpn_maps, rpn_strides, image_extent)
    pre, post = ((self.rpn_pre_nms_topk_train, self.rpn_post_nms_topk_train) if training_counts
                 else (self.rpn_pre_nms_topk_test, self.rpn_post_nms_topk_test))
    # Anchors the image does not have never propose (-inf never passes the top-k as valid).
    proposals, _, proposals_valid = rpn_lib.propose(
        [jnp.where(v, o, -jnp.inf) for o, v in zip(objectness, anchors_valid)], deltas,
        anchors, image_size, pre, post, self.rpn_nms_threshold, self.rpn_min_size)
    return roi_features, (objectness, deltas, anchors, anchors_valid), (proposals,
                                                                       proposals_valid)

  def _pool(self, roi_features, boxes: Array, resolution: int) -> Array:
    """RoIAlign of ``boxes [B, R, 4]`` -> ``[B, R, S, S, C]``."""
    maps, strides, image_extent = roi_features  # one map (C4) or the FPN levels
    return roi_ops.multilevel_roi_align_batch(
        maps, boxes, strides, resolution, self.sampling_ratio, self.aligned,
        canonical_box_size=self.canonical_box_size, image_extent=image_extent,
        max_sampling_ratio=self.max_sampling_ratio)

  def _box_head(self, roi_features, boxes, train):
    """Returns (logits, deltas, res5 features or None)."""
    pooled = self._pool(roi_features, boxes, self.box_pooler_resolution)
    if self.fpn is None:
      res5, logits, deltas = self.box_head(pooled, train=train)
      return logits, deltas, res5
    logits, deltas = self.box_head(pooled, train=train)
    return logits, deltas, None

  # ------------------------------------------------------------------ init
  def initialize(self, images: Array) -> None:
    """Creates every variable with one cheap pass (no proposals, targets or NMS).

    ``model.init(key, images, method="initialize")`` gives the same variables
    as initialising through ``losses`` at a fraction of the compile time.
    """
    (rpn_maps, _), roi_features = self._features(images, None, train=False)
    self.rpn_head(rpn_maps)
    one_box = jnp.zeros((images.shape[0], 1, 4), jnp.float32)
    _, _, res5 = self._box_head(roi_features, one_box, train=False)
    if self.mask_head is not None:
      self._mask_logits(roi_features, one_box, jnp.zeros((images.shape[0], 1), jnp.int32),
                        jnp.ones((images.shape[0], 1), bool), res5)
    if self.keypoint_head is not None:
      self.keypoint_head(self._pool(roi_features, one_box, self.keypoint_pooler_resolution))

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
    b = images.shape[0]
    rpn_key, roi_key = jax.random.split(rng)
    roi_features, (objectness, deltas, anchors, anchors_valid), (proposals, proposals_valid) = (
        self._rpn(images, image_info["image_size"], train, training_counts=True))
    gt_boxes, gt_valid = gt["gt_boxes"].astype(jnp.float32), gt["gt_valid"]
    gt_crowd = gt["gt_is_crowd"]

    # RPN losses over all levels' anchors at once.
    all_anchors = jnp.concatenate(anchors, axis=1)  # (B, A, 4)
    rpn_t = jax.vmap(lambda a, av, gb, gv, gc, k: target_ops.rpn_targets(
        a, gb, gv, gc, k, self.rpn_iou_thresholds, self.rpn_batch_size_per_image,
        self.rpn_positive_fraction, self.crowd_ioa_threshold, anchors_valid=av))(
            all_anchors, jnp.concatenate(anchors_valid, axis=1), gt_boxes, gt_valid, gt_crowd,
            jax.random.split(rpn_key, b))
    out = loss_lib.rpn_losses(jnp.concatenate(objectness, axis=1),
                              jnp.concatenate(deltas, axis=1), all_anchors, rpn_t,
                              self.rpn_batch_size_per_image, self.rpn_loss_type,
                              self.rpn_smooth_l1_beta)

    # Sample RoIs among proposals + ground truth; box head losses.
    rois = jax.vmap(lambda p, pv, gb, gcl, gv, gc, k: target_ops.roi_targets(
        p, pv, gb, gcl, gv, gc, k, self.num_classes, self.roi_batch_size_per_image,
        self.roi_positive_fraction, self.roi_iou_threshold, self.crowd_ioa_threshold))(
            proposals, proposals_valid, gt_boxes, gt["gt_classes"], gt_valid, gt_crowd,
            jax.random.split(roi_key, b))
    logits, box_deltas, res5 = self._box_head(roi_features, rois["boxes"], train)
    out |= loss_lib.box_head_losses(logits, box_deltas, rois, self.box_loss_type,
                                    self.box_smooth_l1_beta)

    # The mask head on the first num_mask_rois slots (foreground first).
    if self.mask_head is not None:
      m = min(self.num_mask_rois, self.roi_batch_size_per_image)
      fg_boxes = rois["boxes"][:, :m]
      cls = jnp.minimum(rois["classes"][:, :m], self.num_classes - 1)
      mask_logits = self._mask_logits(roi_features, fg_boxes, cls, rois["foreground"][:, :m],
                                      res5)
      mask_t = jax.vmap(lambda r, i, gb, gm: target_ops.mask_targets(
          r, i, gb, gm, mask_logits.shape[-1], self.sampling_ratio))(
              fg_boxes, rois["matched_gt"][:, :m], gt_boxes, gt["gt_masks"])
      out["loss_mask"] = loss_lib.mask_loss(mask_logits, mask_t, rois["foreground"][:, :m])
    if self.keypoint_head is not None:
      ce, position = self._keypoint_loss(roi_features, rois, gt["gt_keypoints"])
      out["loss_keypoint"] = self.keypoint_loss_weight * ce
      if position is not None:
        out["loss_keypoint_position"] = (
            self.keypoint_loss_weight * self.keypoint_position_loss_weight * position)

    out["loss"] = loss_lib.total(out)
    return out, self._diagnostics(rois, proposals, proposals_valid, gt_boxes,
                                  gt_valid & ~gt_crowd)

  def _keypoint_loss(self, roi_features, rois, gt_keypoints):
    """The keypoint losses (cross-entropy, position or None) on the ``num_keypoint_rois``
    slots ``target_ops.keypoint_rois`` picks."""
    n = min(self.num_keypoint_rois, self.roi_batch_size_per_image)
    kps = jnp.take_along_axis(gt_keypoints, rois["matched_gt"][:, :, None, None], axis=1)
    boxes = box_ops.scale(rois["boxes"], self.keypoint_box_scale)
    slots, counts = jax.vmap(lambda r, f, k: target_ops.keypoint_rois(r, f, k, n))(
        boxes, rois["foreground"], kps)
    boxes = jnp.take_along_axis(boxes, slots[:, :, None], axis=1)
    kps = jnp.take_along_axis(kps, slots[:, :, None, None], axis=1)
    heatmaps = self._run_head(self.keypoint_head, self._pool(
        roi_features, boxes, self.keypoint_pooler_resolution), counts)
    kp_t = jax.vmap(lambda r, k: target_ops.keypoint_targets(r, k, heatmaps.shape[2]))(
        boxes, kps)
    valid = kp_t["valid"] & counts[:, :, None]
    position = None
    if self.keypoint_position_loss_weight:
      decoded = jax.vmap(kp_lib.local_mean_keypoints)(heatmaps, boxes)
      position = loss_lib.keypoint_position_loss(decoded, kps, boxes, heatmaps.shape[2], valid)
    return loss_lib.keypoint_loss(heatmaps, kp_t["index"], valid), position

  def _mask_logits(self, roi_features, boxes, classes, valid, res5=None):
    """Mask logits ``[B, R, S, S]`` of ``boxes [B, R, 4]`` for ``classes [B, R]``.

    ``valid [B, R]``: the RoIs whose masks are wanted (others may be zeros).
    C4: the mask head reads ``res5``, the box head's output at these boxes.
    """
    if res5 is not None:
      return _class_channel(self.mask_head(res5[:, :boxes.shape[1]]), classes)
    pooled = self._pool(roi_features, boxes, self.mask_pooler_resolution)
    return self._run_head(self.mask_head, (pooled, classes), valid,
                          lambda head, x: _class_channel(head(x[0]), x[1]))

  def _run_head(self, head, inputs, valid, call=lambda head, x: head(x)):
    """``call(head, inputs)`` (inputs ``[B, R, ...]``), at the cost of the ``valid [B, R]``
    RoIs only where ``head_chunk_size`` is set (``chunked.run``)."""
    if not self.head_chunk_size or self.is_initializing():
      return call(head, inputs)
    # Inside the chunks' control flow: convolutions as matmuls (conv.py), and the
    # head a pure function of its parameters.
    pure = head.clone(parent=None, conv_form="matmul")
    fn = lambda params, x: call(functools.partial(pure.apply, {"params": params}), x)
    return chunked.run(fn, head.variables["params"], inputs, valid, self.head_chunk_size)

  def _diagnostics(self, rois, proposals, proposals_valid, gt_boxes, gt_objects):
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
    for scale, flip in self._test_views():
      view_images, view_size, view = _view_images(images, image_size, scale, flip)
      if not candidates or self.test_augment_boxes:
        roi_features, _, (proposals, proposals_valid) = self._rpn(
            view_images, view_size, train=False, training_counts=False)
        logits, deltas, _ = self._box_head(roi_features, proposals, False)
        # Back to the plain image: a mirrored view's x-offsets change sign
        # (the size deltas and offsets relative to the box are scale-free).
        if flip:
          deltas = deltas * jnp.asarray([-1.0, 1.0, 1.0, 1.0], deltas.dtype)
        candidates.append((logits, deltas, view.from_view(proposals), proposals_valid))
      else:
        _, roi_features = self._features(view_images, view_size, train=False)
      views.append((roi_features, view))
    logits, deltas, proposals, proposals_valid = (
        jnp.concatenate(parts, axis=1) for parts in zip(*candidates))
    size = image_size.astype(jnp.float32)
    dets = jax.vmap(lambda lg, dl, p, pv, s: postprocess.detect(
        lg, dl, p, pv, (s[0], s[1]), self.score_threshold, self.nms_threshold,
        self.detections_per_image, self.max_candidates, self.min_box_size))(logits, deltas, proposals,
                                                         proposals_valid, size)
    out = {k: dets[k] for k in ("boxes", "scores", "classes", "valid")}
    masks, heatmaps = self._views_heads(views, dets["boxes"], dets["classes"], dets["valid"])
    if masks is not None:
      out["masks"] = masks
    if heatmaps is not None:
      out["keypoints"] = jax.vmap(functools.partial(
          kp_lib.decode_keypoints, method=self.keypoint_decode))(
              heatmaps, box_ops.scale(dets["boxes"], self.keypoint_box_scale))
    return out

  def _test_views(self):
    """(scale, mirrored) of each view of the image at inference, the plain view first."""
    scales = [1.0] + [float(s) for s in self.test_scales if float(s) != 1.0]
    return [(s, f) for s in scales for f in ((False, True) if self.test_flip else (False,))]

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
      m, h = self._detection_heads(roi_features, view.to_view(boxes), classes, valid)
      if view.mirror_width is not None:  # mirror back along x
        # masks [B, D, S, S], heatmaps [B, D, m, m, Kp]
        m = None if m is None else m[..., ::-1]
        h = None if h is None else h[..., ::-1, :][..., jnp.asarray(self.keypoint_flip_map)]
      masks.append(m)
      heatmaps.append(h)
    mean = lambda xs: None if xs[0] is None else sum(xs) / len(xs)
    return mean(masks), mean(heatmaps)

  def _detection_heads(self, roi_features, boxes, classes, valid):
    """Mask probabilities ``[B, D, S, S]`` of each box's class and keypoint heatmap
    logits ``[B, D, m, m, Kp]`` over its scaled box (each None without its head);
    zeros where ``valid [B, D]`` is False."""
    masks = heatmaps = None
    if self.mask_head is not None:
      # C4: the mask head reads res5, which the box head computes at these boxes.
      res5 = self._box_head(roi_features, boxes, False)[2] if self.fpn is None else None
      masks = jax.nn.sigmoid(self._mask_logits(roi_features, boxes, classes, valid, res5))
      masks = jnp.where(valid[:, :, None, None], masks, 0.0)
    if self.keypoint_head is not None:
      heatmaps = self._run_head(self.keypoint_head, self._pool(
          roi_features, box_ops.scale(boxes, self.keypoint_box_scale),
          self.keypoint_pooler_resolution), valid)
    return masks, heatmaps


def _class_channel(mask_logits: Array, classes: Array) -> Array:
  """``[..., S, S, K]`` per-class mask logits -> ``[..., S, S]`` of each RoI's class ``[...]``."""
  return jnp.take_along_axis(mask_logits, classes[..., None, None, None], axis=-1)[..., 0]


class _View(NamedTuple):
  """Where a test-time view puts the plain image: x' = sx * x (then x'' = w - x' mirrored)."""
  scale: Tuple[float, float]  # (sx, sy): the exact scales after rounding the canvas
  mirror_width: Optional[Array]  # [B, 1] the width mirrored about, or None

  def to_view(self, boxes: Array) -> Array:
    """``boxes [B, N, 4]`` in the plain image -> the same boxes in this view."""
    sx, sy = self.scale
    boxes = boxes * jnp.asarray([sx, sy, sx, sy], jnp.float32)
    if self.mirror_width is not None:
      boxes = box_ops.flip_horizontal(boxes, self.mirror_width)
    return boxes

  def from_view(self, boxes: Array) -> Array:
    """The inverse of ``to_view``."""
    if self.mirror_width is not None:
      boxes = box_ops.flip_horizontal(boxes, self.mirror_width)
    sx, sy = self.scale
    return boxes / jnp.asarray([sx, sy, sx, sy], jnp.float32)


def _view_images(images: Array, image_size: Array, scale: float, mirror: bool):
  """A test-time view: ``images [B, H, W, C]`` rescaled by ``scale`` and/or mirrored.

  Scaling resizes the canvas bilinearly (as the input pipeline resizes
  images, without antialiasing) to the nearest whole size, padded up to a
  multiple of ``VIEW_DIVISIBILITY``; mirroring reverses each image within
  its own width (``image_size [B, 2]``: height, width; rounded to whole
  pixels after scaling), so its padding stays on the right.
  Returns (view images, view image sizes [B, 2], ``_View``).
  """
  b, h, w, c = images.shape
  new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
  sy, sx = new_h / h, new_w / w
  if (new_h, new_w) != (h, w):
    images = jax.image.resize(images, (b, new_h, new_w, c), "linear", antialias=False)
    images = jnp.pad(images, ((0, 0), (0, -new_h % VIEW_DIVISIBILITY),
                              (0, -new_w % VIEW_DIVISIBILITY), (0, 0)))
  image_size = image_size.astype(jnp.float32) * jnp.asarray([sy, sx], jnp.float32)
  mirror_width = None
  if mirror:
    width = jnp.round(image_size[:, 1:2])  # (B, 1)
    columns = jnp.arange(images.shape[2])[None]
    source = jnp.where(columns < width, width - 1 - columns, columns).astype(jnp.int32)
    images = jnp.take_along_axis(images, source[:, None, :, None], axis=2)
    mirror_width = width
  return images, image_size, _View((sx, sy), mirror_width)
