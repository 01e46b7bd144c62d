"""Tests for ops/postprocess.py: box-head outputs -> a fixed number of detections."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.postprocess import detect
from tests import references
from tests.conftest import random_boxes


# The random-input tests call the op through jit: one compile instead of one
# per primitive keeps them fast on a small CPU.
_detect = jax.jit(detect, static_argnames=(
    "nms_threshold", "detections_per_image", "max_candidates", "min_size", "weights"))


# ----------------------------------------------------------------------------
# Independent NumPy reference (float64).


def _np_detect(class_logits, box_deltas, proposals, proposals_valid, image_size,
               score_threshold=0.05, nms_threshold=0.5, detections_per_image=100,
               min_size=0.0, weights=(10.0, 10.0, 5.0, 5.0)):
  """Pair by pair: softmax, decode, clip, filter; greedy NMS within each class; top D."""
  height, width = image_size
  num_rois, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
  logits = class_logits.astype(np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  threshold = np.broadcast_to(score_threshold, (num_classes,))
  wx, wy, ww, wh = weights
  candidates = []  # (score, class, roi, box)
  for r in range(num_rois):
    if not proposals_valid[r]:
      continue
    x1, y1, x2, y2 = proposals[r].astype(np.float64)
    aw, ah = x2 - x1, y2 - y1
    for c in range(num_classes):
      dx, dy, dw, dh = box_deltas[r, c if box_deltas.shape[1] > 1 else 0].astype(np.float64)
      cx, cy = x1 + aw / 2 + dx / wx * aw, y1 + ah / 2 + dy / wy * ah
      w = np.exp(min(dw / ww, references.BBOX_XFORM_CLIP)) * aw
      h = np.exp(min(dh / wh, references.BBOX_XFORM_CLIP)) * ah
      box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
      box[0::2] = np.clip(box[0::2], 0, width)
      box[1::2] = np.clip(box[1::2], 0, height)
      if probs[r, c] > threshold[c] and min(box[2:] - box[:2]) >= min_size:
        candidates.append((probs[r, c], c, r, box))
  candidates.sort(key=lambda t: -t[0])
  kept = []
  for cand in candidates:
    if all(k[1] != cand[1] or references.iou(k[3], cand[3])[0, 0] <= nms_threshold
           for k in kept):
      kept.append(cand)
  kept = kept[:detections_per_image]
  return (np.array([k[3] for k in kept]).reshape(-1, 4), np.array([k[0] for k in kept]),
          np.array([k[1] for k in kept], np.int64), np.array([k[2] for k in kept], np.int64))


def _random_head_outputs(rng, num_rois=40, num_classes=3):
  """RoIs clustered around a few objects, so NMS has duplicates to remove."""
  centres = random_boxes(rng, 5, canvas=80.0, min_size=15.0, max_size=40.0)
  src = centres[rng.integers(0, 5, num_rois)]
  size = np.tile(src[:, 2:] - src[:, :2], 2)
  proposals = (src + rng.uniform(-0.15, 0.15, src.shape) * size).astype(np.float32)
  class_logits = (2.0 * rng.normal(size=(num_rois, num_classes + 1))).astype(np.float32)
  box_deltas = (0.5 * rng.normal(size=(num_rois, num_classes, 4))).astype(np.float32)
  proposals_valid = rng.uniform(size=num_rois) < 0.9
  return class_logits, box_deltas, proposals, proposals_valid


# ----------------------------------------------------------------------------
# Hand-computed case.


def _hand_case():
  """Two RoIs x two classes plus a padded RoI; worked out in test_hand_case."""
  # Logits log(p): the softmax gives p back. Background is the last column.
  probs = np.array([[0.6, 0.3, 0.1],      # RoI 0: class 0 0.6, class 1 0.3
                    [0.5, 0.4, 0.1],      # RoI 1: class 0 0.5, class 1 0.4
                    [0.9, 0.05, 0.05]])   # RoI 2: padding, best score of all
  class_logits = np.log(probs).astype(np.float32)
  proposals = np.array([[10, 10, 30, 30], [12, 10, 32, 30], [10, 10, 30, 30]], np.float32)
  box_deltas = np.zeros((3, 2, 4), np.float32)
  box_deltas[1, 1, 0] = 5.0  # RoI 1, class 1: dx = 5 / 10 of the width -> 10 px right
  proposals_valid = np.array([True, True, False])
  return class_logits, box_deltas, proposals, proposals_valid


def test_hand_case():
  """Class-aware NMS, class-specific boxes, clipping and padding, by hand.

  Image 28 high, 40 wide. Decoded and clipped: RoI 0 (both classes) and RoI 1
  class 0 keep their proposals, cut at y = 28: [10, 10, 30, 28] and
  [12, 10, 32, 28]; RoI 1 class 1 moves to [22, 10, 42, 30] -> [22, 10, 40, 28].
  Class 0: RoI 1 (0.5) overlaps RoI 0 (0.6) by 18*18 / (2*20*18 - 18*18) =
  0.82 > 0.5: suppressed. Class 1: RoI 0 (0.3) overlaps RoI 1 (0.4) by
  8*18 / (18*18 + 20*18 - 8*18) = 0.27: kept. RoI 0's class-0 and class-1
  boxes are identical but different classes: both kept.
  """
  out = detect(*_hand_case(), image_size=(28, 40), detections_per_image=5)
  np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])
  np.testing.assert_allclose(out["boxes"], [[10, 10, 30, 28], [22, 10, 40, 28],
                                            [10, 10, 30, 28], [0, 0, 0, 0], [0, 0, 0, 0]],
                             atol=1e-5)
  np.testing.assert_allclose(out["scores"], [0.6, 0.4, 0.3, 0.0, 0.0], atol=1e-6)
  np.testing.assert_array_equal(out["classes"], [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["roi_index"], [0, 1, 0, 0, 0])


def test_per_class_threshold_and_detection_cap():
  """A per-class threshold array drops class 1's 0.3; D = 1 keeps only the best."""
  out = detect(*_hand_case(), image_size=(28, 40), score_threshold=[0.05, 0.35],
               detections_per_image=5)
  np.testing.assert_array_equal(out["valid"], [True, True, False, False, False])
  np.testing.assert_allclose(out["scores"][:2], [0.6, 0.4], atol=1e-6)
  np.testing.assert_array_equal(out["classes"][:2], [0, 1])
  # A threshold of 0.7 on class 0 instead leaves class 1's two boxes.
  out = detect(*_hand_case(), image_size=(28, 40), score_threshold=np.array([0.7, 0.05]),
               detections_per_image=5)
  np.testing.assert_array_equal(out["valid"], [True, True, False, False, False])
  np.testing.assert_allclose(out["scores"][:2], [0.4, 0.3], atol=1e-6)
  np.testing.assert_array_equal(out["classes"][:2], [1, 1])
  np.testing.assert_array_equal(out["roi_index"][:2], [1, 0])
  out = detect(*_hand_case(), image_size=(28, 40), detections_per_image=1)
  assert out["valid"].tolist() == [True] and out["classes"].tolist() == [0]
  np.testing.assert_allclose(out["scores"], [0.6], atol=1e-6)


def test_class_agnostic_deltas():
  """[R, 1, 4] deltas are shared by every class, like the same deltas repeated."""
  class_logits, box_deltas, proposals, proposals_valid = _hand_case()
  shared = box_deltas[:, 1:2]
  agnostic = detect(class_logits, shared, proposals, proposals_valid, (28, 40), 0.05,
                    detections_per_image=5)
  repeated = detect(class_logits, np.repeat(shared, 2, axis=1), proposals, proposals_valid,
                    (28, 40), 0.05, detections_per_image=5)
  for name in agnostic:
    np.testing.assert_array_equal(agnostic[name], repeated[name], err_msg=name)
  # Class 0 of RoI 1 is now moved too, away from RoI 0: not suppressed.
  assert agnostic["valid"].sum() == 4


# ----------------------------------------------------------------------------
# References on random inputs.


@pytest.mark.parametrize("detections_per_image", [100, 8])
def test_matches_numpy_reference(rng, detections_per_image):
  """Same detections, in the same order, as the NumPy pair-by-pair reference."""
  class_logits, box_deltas, proposals, proposals_valid = _random_head_outputs(rng)
  image_size = (70, 90)
  out = _detect(class_logits, box_deltas, proposals, proposals_valid, image_size,
                score_threshold=np.array([0.05, 0.1, 0.2], np.float32),
                detections_per_image=detections_per_image, min_size=1.0)
  boxes, scores, classes, rois = _np_detect(class_logits, box_deltas, proposals,
                                            proposals_valid, image_size, [0.05, 0.1, 0.2],
                                            detections_per_image=detections_per_image,
                                            min_size=1.0)
  n = len(scores)
  assert 8 <= n < 40 if detections_per_image == 100 else n == 8
  np.testing.assert_array_equal(out["valid"], np.arange(detections_per_image) < n)
  np.testing.assert_allclose(out["boxes"][:n], boxes, atol=3e-5)
  np.testing.assert_allclose(out["scores"][:n], scores, atol=1e-6)
  np.testing.assert_array_equal(out["classes"][:n], classes)
  np.testing.assert_array_equal(out["roi_index"][:n], rois)
  for name in ("boxes", "scores", "classes", "roi_index"):
    np.testing.assert_array_equal(out[name][n:], 0, err_msg=name)


@pytest.mark.parity
@pytest.mark.parametrize("detections_per_image", [12, 30])
def test_matches_torchvision(rng, torch, torchvision, detections_per_image):
  """Same boxes, scores and labels as torchvision's RoIHeads.postprocess_detections.

  torchvision puts the background at index 0 and the deltas as [R, (K+1)*4],
  so the inputs are reordered; it drops sides under 1e-2 (min_size here).
  """
  from torchvision.models.detection.roi_heads import RoIHeads

  class_logits, box_deltas, proposals, _ = _random_head_outputs(rng, num_rois=60)
  num_rois, num_classes = box_deltas.shape[:2]
  image_size = (70, 90)
  out = _detect(class_logits, box_deltas, proposals, np.ones(num_rois, bool), image_size,
                score_threshold=0.05, nms_threshold=0.5, detections_per_image=detections_per_image,
                min_size=1e-2)

  heads = RoIHeads(None, None, None, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
                   batch_size_per_image=512, positive_fraction=0.25, bbox_reg_weights=None,
                   score_thresh=0.05, nms_thresh=0.5,
                   detections_per_img=detections_per_image)
  t_logits = np.concatenate([class_logits[:, -1:], class_logits[:, :-1]], axis=1)
  t_deltas = np.concatenate([np.zeros((num_rois, 1, 4), np.float32), box_deltas], axis=1)
  ref_boxes, ref_scores, ref_labels = (x[0].numpy() for x in heads.postprocess_detections(
      torch.from_numpy(t_logits), torch.from_numpy(t_deltas.reshape(num_rois, -1)),
      [torch.from_numpy(proposals)], [image_size]))

  n = len(ref_scores)
  assert n == 12 if detections_per_image == 12 else 12 < n < 30  # capped, then not
  np.testing.assert_array_equal(out["valid"], np.arange(detections_per_image) < n)
  np.testing.assert_allclose(out["boxes"][:n], ref_boxes, atol=3e-5)
  np.testing.assert_allclose(out["scores"][:n], ref_scores, atol=1e-5)
  np.testing.assert_array_equal(out["classes"][:n], ref_labels - 1)


# ----------------------------------------------------------------------------
# jit, vmap, shape errors.


def test_jit_vmap_and_shapes(rng):
  """jit output shapes and dtypes; vmap over two images (own sizes) equals single calls."""
  images = [_random_head_outputs(rng, num_rois=20) for _ in range(2)]
  stacked = [np.stack([im[i] for im in images]) for i in range(4)]
  sizes = np.array([[70.0, 90.0], [50.0, 60.0]], np.float32)

  def one(class_logits, box_deltas, proposals, proposals_valid, size):
    return detect(class_logits, box_deltas, proposals, proposals_valid, (size[0], size[1]),
                  detections_per_image=10)

  batched = jax.jit(jax.vmap(one))(*stacked, sizes)
  expected = {"boxes": ((2, 10, 4), jnp.float32), "scores": ((2, 10), jnp.float32),
              "classes": ((2, 10), jnp.int32), "roi_index": ((2, 10), jnp.int32),
              "valid": ((2, 10), jnp.bool_)}
  assert {k: (v.shape, v.dtype) for k, v in batched.items()} == expected
  for b in range(2):
    single = jax.jit(one)(*images[b], sizes[b])
    for name in single:
      np.testing.assert_allclose(batched[name][b], single[name], atol=1e-6, err_msg=name)
  assert np.all(batched["boxes"][1][:, 2] <= 60.0) and np.all(batched["boxes"][1][:, 3] <= 50.0)
  assert batched["valid"].sum() > 5


def test_shape_errors():
  """Wrong shapes raise ValueError naming the argument."""
  class_logits, box_deltas, proposals, proposals_valid = _hand_case()
  call = functools.partial(detect, image_size=(28, 40))
  with pytest.raises(ValueError, match="class_logits"):
    call(class_logits[:, :, None], box_deltas, proposals, proposals_valid)
  with pytest.raises(ValueError, match="box_deltas"):
    call(class_logits, np.zeros((3, 3, 4), np.float32), proposals, proposals_valid)
  with pytest.raises(ValueError, match="box_deltas"):
    call(class_logits, box_deltas[:2], proposals, proposals_valid)
  with pytest.raises(ValueError, match="proposals"):
    call(class_logits, box_deltas, proposals[:, :2], proposals_valid)
  with pytest.raises(ValueError, match="proposals_valid"):
    call(class_logits, box_deltas, proposals, proposals_valid[:2])
