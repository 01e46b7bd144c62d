"""The one place a config is read: ``build_model(config) -> MaskRCNN``.

``model_config(**overrides)`` gives the model section of a config with every
key, set to detectron2's R50-FPN Mask R-CNN recipe (``design="c4"`` switches
to its R50-C4 recipe); experiment files in configs/ start from it and change
what differs.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.modeling import backbones
from mrcnn_jax.modeling.box_head import BoxHead
from mrcnn_jax.modeling.cascade import CascadeRoIHeads
from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.modeling.keypoint_head import DECODES, KeypointHead
from mrcnn_jax.modeling.mask_head import MaskHead
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.norm import BOX_HEAD_NORMS, HEAD_NORMS, NORMS
from mrcnn_jax.modeling.res5_head import Res5Head
from mrcnn_jax.modeling.roi_heads import Pooler, Postprocess, RoIHeads
from mrcnn_jax.modeling.rpn import RPN, RPNHead
from mrcnn_jax.ops import anchors as anchor_ops

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(design: str = "fpn", **overrides: Any) -> ml_collections.ConfigDict:
  """The ``config.model`` section; ``overrides`` replace top-level keys."""
  c4 = design == "c4"
  if design not in ("fpn", "c4"):
    raise ValueError(f"design: expected 'fpn' or 'c4', got {design!r}")
  cfg = ml_collections.ConfigDict({
      "design": design,
      "num_classes": 80,
      "dtype": "float32",  # compute dtype: float32 or bfloat16 (params stay float32)
      # name: a backbone registered in modeling/backbones.py; the other keys
      # are its settings. ResNet's depth: "18", "34", "50", "101" or "tiny";
      # norm: see modeling/norm.py.
      "backbone": {"name": "resnet", "depth": "50", "width": 64, "norm": "frozen_bn", "freeze_at": 2,
                   "stride_in_1x1": False, "zero_init_residual": False},
      "fpn_channels": 256,
      "fpn_norm": "none",  # after each FPN conv (norm.py; detectron2's FPN.NORM)
      # Devices per BatchNorm statistics group for every "bn" norm: 0 = all
      # devices, the global batch (cross-replica BN); N = groups of N
      # neighbouring devices of the data axis (modeling/batch_norm.py).
      "batch_norm_group_size": 0,
      # One tuple of sizes per RPN level: P2..P6, or C4's single level.
      "anchor_sizes": ((32, 64, 128, 256, 512),) if c4 else anchor_ops.FPN_SIZES,
      "aspect_ratios": anchor_ops.ASPECT_RATIOS,
      # "detectron2" (nominal strides, unrounded corners) or "torchvision"
      # (rounded; stride = padded image size // grid): ops/anchors.py.
      "anchor_layout": "detectron2",
      # Each image is seen as padded to a multiple of this (the references'
      # size_divisibility): features outside are masked (modeling/padding.py);
      # 0 sees the whole canvas.
      "size_divisibility": 32,
      "rpn": {
          # detectron2: per level for FPN; C4 has one level with more anchors.
          "pre_nms_topk_train": 12000 if c4 else 2000,
          "post_nms_topk_train": 2000 if c4 else 1000,
          "pre_nms_topk_test": 6000 if c4 else 1000,
          "post_nms_topk_test": 1000,
          "nms_threshold": 0.7, "min_size": 0.0, "iou_thresholds": (0.3, 0.7),
          "batch_size_per_image": 256, "positive_fraction": 0.5,
          "loss_type": "smooth_l1", "smooth_l1_beta": 0.0,
          "num_convs": 1,  # shared 3x3 convs of the head (2 in the LSJ recipe)
      },
      "roi": {
          "batch_size_per_image": 512, "positive_fraction": 0.25, "iou_threshold": 0.5,
          "num_mask_rois": 128,  # = 512 * 0.25: every foreground RoI
          "num_keypoint_rois": 128,  # those with a visible keypoint first
          # The mask and keypoint heads run over chunks of this many RoIs per
          # device and skip chunks without a real RoI (modeling/chunked.py):
          # their cost follows the foreground. 0: every slot, always.
          "head_chunk_size": 32,
          "crowd_ioa_threshold": 0.7, "aligned": True,
          # 0: adaptive (detectron2), exact up to max_sampling_ratio samples per
          # bin and axis (ops/roi_align.py), at that ratio's cost.
          "sampling_ratio": 2, "max_sampling_ratio": 4,
          "canonical_box_size": 224.0,  # FPN eq. 1; scale with the image size
      },
      "box_head": {
          "pooler_resolution": 14 if c4 else 7, "fc_dims": (1024, 1024),
          "num_convs": 0, "conv_dim": 256,  # convs before the FCs (FPN design only)
          "norm": "none",  # after each of those convs: "none", "gn" or "bn"
          "class_agnostic": False, "loss_type": "smooth_l1", "smooth_l1_beta": 0.0,
      },
      # Cascade R-CNN (modeling/cascade.py): the box head's refinement stages
      # after the first, each with its foreground IoU and box coder weights;
      # () = the standard single box head. detectron2's cascade: (0.6, 0.7) and
      # ((20, 20, 10, 10), (30, 30, 15, 15)), with box_head.class_agnostic.
      "cascade": {"iou_thresholds": (), "box_weights": ()},
      "mask_head": {"enabled": True, "num_convs": 0 if c4 else 4, "conv_dim": 256,
                    "norm": "none", "pooler_resolution": 14},
      "keypoint_head": {"enabled": False, "num_keypoints": 17, "num_convs": 8,
                        "conv_dim": 512, "pooler_resolution": 14,
                        "loss_weight": 1.0,  # detectron2's ROI_KEYPOINT_HEAD.LOSS_WEIGHT
                        # x loss_keypoint_position (MaskRCNN; not in the paper): 0 = off
                        "position_loss_weight": 0.0,
                        "box_scale": 1.0,  # heatmaps over boxes scaled by this (see MaskRCNN)
                        "decode": "bicubic",  # or "local_mean" (see keypoint_head)
                        # Each keypoint's mirror partner, for test.flip: the data's
                        # keypoint_flip_map (data/coco.py flip_map); () = none given.
                        "flip_map": ()},
      "test": {"score_threshold": 0.05, "nms_threshold": 0.5, "detections_per_image": 100,
               "max_candidates": 4000,
               "min_box_size": 0.0,  # sides under this are dropped (torchvision: 1e-2)
               # Test-time augmentation (MaskRCNN.detect): mirrored views, views
               # at other image scales, and whether the views vote on the boxes
               # (else they only feed the mask and keypoint heads). Each view
               # costs one more backbone pass (and RPN and box head with
               # augment_boxes).
               "flip": False, "scales": (1.0,), "augment_boxes": False},
  })
  cfg.update(overrides)
  return cfg


def batch_norm_groups(group_size: int, num_devices: int) -> int:
  """Statistics groups of the global batch for ``group_size`` devices per group.

  0, or a group at least as large as the mesh, is one group (the global
  batch); otherwise the devices must split into whole groups.
  """
  if group_size < 0:
    raise ValueError(f"model.batch_norm_group_size: expected >= 0, got {group_size}")
  if group_size == 0 or group_size >= num_devices:
    return 1
  if num_devices % group_size:
    raise ValueError(f"model.batch_norm_group_size={group_size} does not divide the "
                     f"{num_devices} devices of the data axis")
  return num_devices // group_size


def build_model(config: ml_collections.ConfigDict,
                num_devices: Optional[int] = None) -> MaskRCNN:
  """``config.model`` (or a bare model section) -> a ``MaskRCNN`` module.

  ``num_devices``: the data axis's size, for BatchNorm groups (default: every
  device); only training reads batch statistics.
  """
  m = config.model if "model" in config else config
  check_model_config(m)
  dtype = DTYPES[m.dtype]
  bn_groups = batch_norm_groups(m.batch_norm_group_size,
                                jax.device_count() if num_devices is None else num_devices)
  c4 = m.design == "c4"
  backbone = backbones.build(m.backbone, dtype=dtype, bn_groups=bn_groups,
                             num_stages=3 if c4 else 4)
  fpn = None if c4 else FPN(channels=m.fpn_channels, norm=m.fpn_norm, bn_groups=bn_groups,
                            dtype=dtype)
  return MaskRCNN(
      backbone=backbone, fpn=fpn, rpn=_rpn(m, dtype), roi_heads=_roi_heads(m, dtype, bn_groups),
      size_divisibility=m.size_divisibility,
      test_flip=m.test.flip, test_scales=tuple(float(s) for s in m.test.scales),
      test_augment_boxes=m.test.augment_boxes,
      keypoint_flip_map=tuple(m.keypoint_head.flip_map))


def _rpn(m: ml_collections.ConfigDict, dtype) -> RPN:
  num_anchors = anchor_ops.num_anchors_per_location(m.anchor_sizes[0], m.aspect_ratios)
  return RPN(
      rpn_head=RPNHead(num_anchors=num_anchors, num_convs=m.rpn.num_convs, dtype=dtype),
      anchor_sizes=tuple(tuple(s) for s in m.anchor_sizes),
      aspect_ratios=tuple(m.aspect_ratios), anchor_layout=m.anchor_layout,
      pre_nms_topk_train=m.rpn.pre_nms_topk_train,
      post_nms_topk_train=m.rpn.post_nms_topk_train,
      pre_nms_topk_test=m.rpn.pre_nms_topk_test, post_nms_topk_test=m.rpn.post_nms_topk_test,
      nms_threshold=m.rpn.nms_threshold, min_size=m.rpn.min_size,
      iou_thresholds=tuple(m.rpn.iou_thresholds),
      batch_size_per_image=m.rpn.batch_size_per_image,
      positive_fraction=m.rpn.positive_fraction,
      crowd_ioa_threshold=m.roi.crowd_ioa_threshold,
      loss_type=m.rpn.loss_type, smooth_l1_beta=m.rpn.smooth_l1_beta)


def _roi_heads(m: ml_collections.ConfigDict, dtype, bn_groups: int) -> RoIHeads:
  bb, box, mask, kp = m.backbone, m.box_head, m.mask_head, m.keypoint_head
  if m.design == "c4":
    box_head = Res5Head(num_classes=m.num_classes, depth=bb.depth, width=bb.width,
                        norm=bb.norm, stride_in_1x1=bb.stride_in_1x1,
                        class_agnostic=box.class_agnostic, dtype=dtype)
  else:
    box_head = _box_head(m, dtype, bn_groups)
  mask_head = keypoint_head = None
  if mask.enabled:
    mask_head = MaskHead(num_classes=m.num_classes, num_convs=mask.num_convs,
                         conv_dim=mask.conv_dim, norm=mask.norm, dtype=dtype)
  if kp.enabled:
    keypoint_head = KeypointHead(num_keypoints=kp.num_keypoints, num_convs=kp.num_convs,
                                 conv_dim=kp.conv_dim, dtype=dtype)
  cascade = {}
  if m.cascade.iou_thresholds:
    cascade = {"refine_box_heads": tuple(_box_head(m, dtype, bn_groups)
                                         for _ in m.cascade.iou_thresholds),
               "refine_iou_thresholds": tuple(m.cascade.iou_thresholds),
               "refine_box_weights": tuple(tuple(w) for w in m.cascade.box_weights)}
  return (CascadeRoIHeads if cascade else RoIHeads)(
      **cascade, box_head=box_head, mask_head=mask_head, keypoint_head=keypoint_head,
      num_classes=m.num_classes,
      batch_size_per_image=m.roi.batch_size_per_image,
      positive_fraction=m.roi.positive_fraction, iou_threshold=m.roi.iou_threshold,
      crowd_ioa_threshold=m.roi.crowd_ioa_threshold,
      num_mask_rois=m.roi.num_mask_rois, num_keypoint_rois=m.roi.num_keypoint_rois,
      head_chunk_size=m.roi.head_chunk_size,
      pooler=Pooler(sampling_ratio=m.roi.sampling_ratio,
                    max_sampling_ratio=m.roi.max_sampling_ratio, aligned=m.roi.aligned,
                    canonical_box_size=m.roi.canonical_box_size),
      box_pooler_resolution=box.pooler_resolution,
      mask_pooler_resolution=mask.pooler_resolution,
      keypoint_pooler_resolution=kp.pooler_resolution,
      box_loss_type=box.loss_type, box_smooth_l1_beta=box.smooth_l1_beta,
      keypoint_loss_weight=kp.loss_weight, keypoint_position_loss_weight=kp.position_loss_weight,
      keypoint_box_scale=kp.box_scale, keypoint_decode=kp.decode,
      postprocess=Postprocess(
          score_threshold=m.test.score_threshold, nms_threshold=m.test.nms_threshold,
          detections_per_image=m.test.detections_per_image,
          max_candidates=m.test.max_candidates, min_box_size=m.test.min_box_size))


def _box_head(m: ml_collections.ConfigDict, dtype, bn_groups: int) -> BoxHead:
  box = m.box_head
  return BoxHead(num_classes=m.num_classes, fc_dims=tuple(box.fc_dims),
                 class_agnostic=box.class_agnostic, num_convs=box.num_convs,
                 conv_dim=box.conv_dim, norm=box.norm, bn_groups=bn_groups, dtype=dtype)


def check_model_config(m: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first ``model.*`` key with a value no part accepts."""
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype: expected one of {sorted(DTYPES)}, got {m.dtype!r}")
  backbones.entry(m.backbone)  # a registered name
  resnet = backbones.name_of(m.backbone) == "resnet"
  if m.design == "c4" and not resnet:
    raise ValueError(f"model.design='c4' runs ResNet's res5 stage as its box head: it needs "
                     f"model.backbone.name='resnet', got {backbones.name_of(m.backbone)!r}")
  if resnet and m.backbone.norm not in NORMS:
    raise ValueError(f"model.backbone.norm: expected one of {NORMS}, got {m.backbone.norm!r}")
  for head, norms in (("box_head", BOX_HEAD_NORMS), ("mask_head", HEAD_NORMS)):
    if m[head].norm not in norms:
      raise ValueError(f"model.{head}.norm: expected one of {norms}, got {m[head].norm!r}")
  if m.fpn_norm not in NORMS:
    raise ValueError(f"model.fpn_norm: expected one of {NORMS}, got {m.fpn_norm!r}")
  if m.rpn.num_convs < 1:
    raise ValueError(f"model.rpn.num_convs: expected >= 1, got {m.rpn.num_convs}")
  if not m.keypoint_head.box_scale > 0:
    raise ValueError(f"model.keypoint_head.box_scale: expected > 0, got "
                     f"{m.keypoint_head.box_scale!r}")
  if m.keypoint_head.decode not in DECODES:
    raise ValueError(f"model.keypoint_head.decode: expected one of {DECODES}, got "
                     f"{m.keypoint_head.decode!r}")
  flip_map = tuple(m.keypoint_head.flip_map)
  if m.test.flip and m.keypoint_head.enabled:
    k = m.keypoint_head.num_keypoints
    if sorted(flip_map) != list(range(k)) or any(flip_map[j] != i for i, j in enumerate(flip_map)):
      raise ValueError(
          f"model.keypoint_head.flip_map: test.flip needs each of the {k} keypoints' mirror "
          f"partner (a permutation of 0..{k - 1} that is its own inverse: the data's "
          f"keypoint_flip_map in meta.json), got {flip_map!r}")
  if not all(float(s) > 0 for s in m.test.scales):
    raise ValueError(f"model.test.scales: expected positive image scales, got {m.test.scales!r}")
  if not m.keypoint_head.position_loss_weight >= 0:
    raise ValueError(f"model.keypoint_head.position_loss_weight: expected >= 0, got "
                     f"{m.keypoint_head.position_loss_weight!r}")
  if m.anchor_layout not in anchor_ops.LAYOUTS:
    raise ValueError(f"model.anchor_layout: expected one of {anchor_ops.LAYOUTS}, got "
                     f"{m.anchor_layout!r}")
  if m.size_divisibility < 0:
    raise ValueError(f"model.size_divisibility: expected >= 0, got {m.size_divisibility}")
  if m.roi.sampling_ratio < 0 or m.roi.max_sampling_ratio < 1:
    raise ValueError(f"model.roi.sampling_ratio / max_sampling_ratio: expected >= 0 (0 = "
                     f"adaptive) and >= 1, got {m.roi.sampling_ratio} and "
                     f"{m.roi.max_sampling_ratio}")
  cascade = m.cascade
  if len(cascade.iou_thresholds) != len(cascade.box_weights):
    raise ValueError(f"model.cascade: one box_weights entry per iou_thresholds entry, got "
                     f"{tuple(cascade.iou_thresholds)} and {tuple(cascade.box_weights)}")
  if cascade.iou_thresholds and (m.design != "fpn" or not m.box_head.class_agnostic):
    raise ValueError("model.cascade: each stage regresses the boxes the next one reads, so "
                     "a cascade needs the FPN design and model.box_head.class_agnostic=True")
  if any(len(w) != 4 for w in cascade.box_weights):
    raise ValueError(f"model.cascade.box_weights: expected 4 weights (wx, wy, ww, wh) per "
                     f"stage, got {tuple(cascade.box_weights)}")
  if m.roi.head_chunk_size < 0:
    raise ValueError(f"model.roi.head_chunk_size: expected >= 0 (0 = no chunks), got "
                     f"{m.roi.head_chunk_size}")
  if m.roi.num_keypoint_rois < 1:
    raise ValueError(f"model.roi.num_keypoint_rois: expected >= 1, got {m.roi.num_keypoint_rois}")


class DataMismatchError(ValueError):
  """The config does not fit the dataset (classes, keypoints, flip map)."""


def check_dataset(config: ml_collections.ConfigDict, meta: dict, origin: str) -> None:
  """The model must fit the data: its class count, masks, keypoint count, flip map.

  ``meta`` is a split's or a workdir's meta.json (``origin`` names it). A
  model with more classes than the data would predict ids the data does not
  have; with fewer, it would train the data's last classes as background.
  """
  m = config.model if "model" in config else config
  names = list(meta.get("names") or [])
  if len(meta["coco_ids"]) != m.num_classes:
    raise DataMismatchError(
        f"{origin} has {len(meta['coco_ids'])} categories ({', '.join(names[:8])}"
        f"{', ...' if len(names) > 8 else ''}) but model.num_classes is {m.num_classes}; "
        f"set --config.model.num_classes={len(meta['coco_ids'])}")
  if m.mask_head.enabled and meta.get("has_masks") is False:
    raise DataMismatchError(
        f"{origin} is box-only (no annotation has a segmentation) but the mask head is on; "
        f"set --config.model.mask_head.enabled=False")
  num_keypoints = len(meta.get("keypoint_names") or [])
  if m.keypoint_head.enabled and num_keypoints != m.keypoint_head.num_keypoints:
    fix = (f"--config.model.keypoint_head.num_keypoints={num_keypoints} (and its flip_map)"
           if num_keypoints else "--config.model.keypoint_head.enabled=False")
    raise DataMismatchError(
        f"{origin} has {num_keypoints} keypoints per instance but the keypoint head predicts "
        f"model.keypoint_head.num_keypoints={m.keypoint_head.num_keypoints}; set {fix}")
  check_flip_map(config, meta, origin)


def check_flip_map(config: ml_collections.ConfigDict, meta: dict, origin: str) -> None:
  """With the flip test on, the model's keypoint flip map must be the data's.

  ``meta`` is a split's or a workdir's meta.json (``origin`` names it); its
  ``keypoint_flip_map`` pairs the keypoints by their left_/right_ names.
  """
  m = config.model if "model" in config else config
  data_map = list(meta.get("keypoint_flip_map") or [])
  if m.test.flip and m.keypoint_head.enabled and data_map:
    if list(m.keypoint_head.flip_map) != data_map:
      raise DataMismatchError(
          f"model.keypoint_head.flip_map {tuple(m.keypoint_head.flip_map)} is not the "
          f"keypoint flip map of {origin} ({tuple(data_map)}, from its keypoint names "
          f"{meta.get('keypoint_names')}); the flip test would average the wrong keypoints' "
          f"heatmaps")


def frozen_parameters(config: ml_collections.ConfigDict):
  """Parameter paths (tuples of names) the config freezes: the optimiser skips them."""
  m = config.model if "model" in config else config
  return [("backbone", name) for name in backbones.entry(m.backbone).frozen(m.backbone)]
