"""A tiny model config and analytic synthetic batches for the model tests."""

import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling import build

CANVAS = 128
NUM_CLASSES = 3  # 0 rectangle, 1 ellipse, 2 triangle (with 3 keypoints)
NUM_KEYPOINTS = 3
MASK_CROP = 32  # M: ground-truth masks are box crops of M x M
COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.3, 0.95]], np.float32)


def tiny_config(keypoints: bool = True, **overrides):
  """The smallest model with every head: tiny ResNet, GroupNorm, narrow heads."""
  cfg = build.model_config(num_classes=NUM_CLASSES)
  cfg.backbone.update(depth="tiny", width=16, norm="gn", freeze_at=0)
  cfg.fpn_channels = 32
  cfg.rpn.update(pre_nms_topk_train=300, post_nms_topk_train=100, pre_nms_topk_test=200,
                 post_nms_topk_test=50)
  cfg.roi.update(batch_size_per_image=64, num_mask_rois=16)
  cfg.box_head.fc_dims = (64, 64)
  cfg.mask_head.conv_dim = 32
  cfg.keypoint_head.update(enabled=keypoints, num_keypoints=NUM_KEYPOINTS, num_convs=2,
                           conv_dim=32)
  cfg.test.detections_per_image = 20
  cfg.update(overrides)
  return cfg


def _shape_mask(kind, box, xs, ys):
  """Analytic coverage of points (xs, ys) by a shape inscribed in ``box``."""
  x1, y1, x2, y2 = box
  if kind == 0:
    return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
  if kind == 1:
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
  # Triangle: apex top-centre, base corners at the bottom.
  v = _triangle(box)
  def side(a, b):
    return (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
  s1, s2, s3 = side(v[0], v[1]), side(v[1], v[2]), side(v[2], v[0])
  return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def _triangle(box):
  x1, y1, x2, y2 = box
  return np.array([[(x1 + x2) / 2, y1], [x2, y2], [x1, y2]], np.float32)


def make_image(rng, num_objects, max_instances=8, canvas=CANVAS, classes=None):
  """One image with ``num_objects`` non-overlapping shapes and padded ground truth."""
  image = rng.uniform(0.0, 0.15, (canvas, canvas, 3)).astype(np.float32)
  boxes = np.zeros((max_instances, 4), np.float32)
  gt_classes = np.zeros((max_instances,), np.int32)
  masks = np.zeros((max_instances, MASK_CROP, MASK_CROP), np.float32)
  keypoints = np.zeros((max_instances, NUM_KEYPOINTS, 3), np.float32)
  cells = rng.permutation(4)  # one object per quadrant: no overlaps
  half = canvas // 2
  ys, xs = np.mgrid[0:canvas, 0:canvas] + 0.5
  for i in range(min(num_objects, max_instances)):
    kind = int(classes[i]) if classes is not None else int(rng.integers(NUM_CLASSES))
    qx, qy = (cells[i % 4] % 2) * half, (cells[i % 4] // 2) * half
    w, h = rng.uniform(0.45, 0.9, 2) * half
    x1, y1 = qx + rng.uniform(0, half - w), qy + rng.uniform(0, half - h)
    box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
    image[_shape_mask(kind, box, xs, ys)] = COLOURS[kind]
    c = (np.arange(MASK_CROP) + 0.5) / MASK_CROP
    cx, cy = np.meshgrid(x1 + c * w, y1 + c * h)
    boxes[i], gt_classes[i] = box, kind
    masks[i] = _shape_mask(kind, box, cx, cy)
    if kind == 2:
      keypoints[i, :, :2] = _triangle(box)
      keypoints[i, :, 2] = 2
  valid = np.arange(max_instances) < num_objects
  return image, boxes, gt_classes, valid, masks, keypoints


def make_batch(rng, counts, max_instances=8, canvas=CANVAS, classes=None):
  """A batch of ``len(counts)`` images with ``counts[i]`` objects each."""
  parts = [make_image(rng, n, max_instances, canvas, classes) for n in counts]
  image, boxes, gt_classes, valid, masks, keypoints = (np.stack(p) for p in zip(*parts))
  b = len(counts)
  images = jnp.asarray((image - 0.45) / 0.25)
  info = {"image_size": jnp.full((b, 2), canvas, jnp.int32)}
  gt = {
      "gt_boxes": jnp.asarray(boxes), "gt_classes": jnp.asarray(gt_classes),
      "gt_valid": jnp.asarray(valid), "gt_is_crowd": jnp.zeros((b, max_instances), bool),
      "gt_masks": jnp.asarray(masks), "gt_keypoints": jnp.asarray(keypoints),
  }
  return images, info, gt
