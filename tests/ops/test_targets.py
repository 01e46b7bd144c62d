"""Tests for ops/targets.py: RPN, RoI, mask and keypoint training targets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.targets import (keypoint_rois, keypoint_targets, mask_targets, roi_targets,
                                   rpn_targets)
from tests import references
from tests.conftest import random_boxes

BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

# The random-input tests call the ops through jit: one compile instead of one
# per primitive keeps them fast on a small CPU.
_rpn_targets = jax.jit(rpn_targets, static_argnames=(
    "iou_thresholds", "batch_size_per_image", "positive_fraction", "crowd_ioa_threshold",
    "weights"))
_roi_targets = jax.jit(roi_targets, static_argnames=(
    "num_classes", "batch_size_per_image", "positive_fraction", "iou_threshold",
    "crowd_ioa_threshold", "weights"))
_mask_targets = jax.jit(mask_targets, static_argnames=("mask_size", "sampling_ratio",
                                                       "threshold"))
_keypoint_targets = jax.jit(keypoint_targets, static_argnames=("heatmap_size",))
_keypoint_rois = jax.jit(keypoint_rois, static_argnames=("num_slots",))


# ----------------------------------------------------------------------------
# Independent NumPy references (float64).


def _np_labels(boxes, gt_boxes, gt_valid, gt_is_crowd, thresholds, low_quality,
               crowd_ioa=0.7):
  """Per box: label (1 positive, 0 negative, -1 ignore), matched gt, best IoU.

  Box by box and object by object, as the papers describe it: the best valid
  non-crowd object decides; with low_quality, each object's best boxes (ties
  included, if they overlap it at all) are positive too; negatives mostly
  inside a crowd region are ignored.
  """
  objects = gt_valid & ~gt_is_crowd
  crowd = gt_valid & gt_is_crowd
  iou = references.iou(boxes, gt_boxes)
  ioa = references.ioa(boxes, gt_boxes)
  n = len(boxes)
  labels = np.zeros(n, np.int64)
  matched = np.zeros(n, np.int64)
  best = np.zeros(n)
  for i in range(n):
    if objects.any():
      cols = np.flatnonzero(objects)
      j = cols[np.argmax(iou[i, cols])]
      matched[i], best[i] = j, iou[i, j]
    if best[i] >= thresholds[-1]:
      labels[i] = 1
    elif len(thresholds) == 2 and best[i] >= thresholds[0]:
      labels[i] = -1
  if low_quality:
    for j in np.flatnonzero(objects):
      if iou[:, j].max() > 0:
        labels[iou[:, j] == iou[:, j].max()] = 1
  in_crowd = np.any((ioa >= crowd_ioa) & crowd[None, :], axis=1)
  labels[(labels == 0) & in_crowd] = -1
  return labels, matched, best


def _jitter(rng, boxes, n, scale=0.15):
  """n boxes near the given ones: corners moved by up to scale * size."""
  src = boxes[rng.integers(0, len(boxes), n)]
  size = np.tile(src[:, 2:] - src[:, :2], 2)
  out = src + rng.uniform(-scale, scale, size=src.shape) * size
  return out.astype(np.float32)


def _shrink(boxes, factor=0.5):
  """Boxes scaled by factor about their centres."""
  centre = np.tile((boxes[:, :2] + boxes[:, 2:]) / 2, 2)
  return (centre + factor * (boxes - centre)).astype(np.float32)


def _random_gt(rng, num=8, num_objects=5, num_classes=4):
  """G = num: num_objects objects, one crowd region, the rest padding.

  The padding rows hold real-looking boxes, so a bug that reads them would
  show.
  """
  boxes = random_boxes(rng, num, canvas=80.0, min_size=10.0, max_size=30.0)
  valid = np.arange(num) < num_objects + 1
  crowd = np.arange(num) == num_objects
  classes = rng.integers(0, num_classes, num).astype(np.int32)
  return boxes, classes, valid, crowd


# ----------------------------------------------------------------------------
# rpn_targets


def _rpn_hand_case():
  """Anchors and ground truth whose labels are worked out in test_rpn_hand_case."""
  gt_boxes = np.array([
      [0, 0, 10, 10],     # g0: object
      [50, 50, 60, 60],   # g1: padding (valid False)
      [60, 0, 100, 40],   # g2: crowd region
      [20, 60, 40, 80],   # g3: object no anchor overlaps much
  ], np.float32)
  gt_valid = np.array([True, False, True, True])
  gt_is_crowd = np.array([False, False, True, False])
  anchors = np.array([
      [0, 0, 10, 10],    # 0: IoU(g0) = 1                       -> positive
      [0, 0, 10, 12],    # 1: IoU(g0) = 100 / 120 = 0.83 >= 0.7   -> positive
      [0, 0, 10, 20],    # 2: IoU(g0) = 100 / 200 = 0.5           -> ignored
      [50, 50, 60, 60],  # 3: IoU 1 with the padding g1 only      -> negative
      [70, 10, 80, 20],  # 4: inside the crowd g2 (IoA 1)         -> ignored
      [30, 30, 40, 40],  # 5: overlaps nothing                    -> negative
      [55, 0, 65, 10],   # 6: IoA(g2) = 50 / 100 = 0.5 < 0.7      -> negative
      [20, 60, 30, 70],  # 7: IoU(g3) = 100 / 400 = 0.25, but g3's best anchor -> positive
      [20, 60, 28, 68],  # 8: IoU(g3) = 64 / 400 = 0.16           -> negative
  ], np.float32)
  return anchors, gt_boxes, gt_valid, gt_is_crowd


def test_rpn_hand_case():
  """Positive, negative and ignored anchors, and their box targets, by hand."""
  anchors, gt_boxes, gt_valid, gt_is_crowd = _rpn_hand_case()
  out = rpn_targets(anchors, gt_boxes, gt_valid, gt_is_crowd, jax.random.key(0))
  positive = [0, 1, 7]
  negative = [3, 5, 6, 8]
  # 256 slots > 7 labelled anchors: every positive and negative is sampled.
  np.testing.assert_array_equal(np.flatnonzero(out["positive"]), positive)
  np.testing.assert_array_equal(np.flatnonzero(out["sampled"]), sorted(positive + negative))
  np.testing.assert_array_equal(out["objectness"], np.isin(np.arange(9), positive))
  expected = np.zeros((9, 4), np.float32)
  # Anchor 1 (w 10, h 12, centre (5, 6)) to g0 (centre (5, 5)):
  # dy = (5 - 6) / 12, dh = log(10 / 12).
  expected[1] = [0.0, -1 / 12, 0.0, np.log(10 / 12)]
  # Anchor 7 (w 10, centre (25, 65)) to g3 (w 20, centre (30, 70)):
  # dx = dy = 5 / 10, dw = dh = log(2).
  expected[7] = [0.5, 0.5, np.log(2), np.log(2)]
  np.testing.assert_allclose(out["box_deltas"], expected, atol=1e-6)


def test_rpn_sampling_caps():
  """With 4 slots: 2 positives (half) and 2 negatives, drawn from the right sets."""
  anchors, gt_boxes, gt_valid, gt_is_crowd = _rpn_hand_case()
  draws = set()
  for seed in range(6):
    out = rpn_targets(anchors, gt_boxes, gt_valid, gt_is_crowd, jax.random.key(seed),
                      batch_size_per_image=4, positive_fraction=0.5)
    pos = np.flatnonzero(out["positive"])
    neg = np.flatnonzero(out["sampled"] & ~out["positive"])
    assert len(pos) == 2 and set(pos) <= {0, 1, 7}
    assert len(neg) == 2 and set(neg) <= {3, 5, 6, 8}
    assert np.all(out["box_deltas"][~out["positive"]] == 0)
    draws.add(tuple(pos) + tuple(neg))
  assert len(draws) > 1  # the key matters


def test_rpn_no_valid_gt_gives_only_negatives():
  """An image whose ground truth is all padding (even crowd-flagged) has negatives only."""
  anchors, gt_boxes, _, gt_is_crowd = _rpn_hand_case()
  out = rpn_targets(anchors, gt_boxes, np.zeros(4, bool), gt_is_crowd, jax.random.key(0),
                    batch_size_per_image=6)
  assert not out["positive"].any()
  assert out["sampled"].sum() == 6  # capped at the batch size, all negatives
  np.testing.assert_array_equal(out["objectness"], 0.0)
  np.testing.assert_array_equal(out["box_deltas"], 0.0)
  # The crowd flag of a padded entry does not make anchor 4 ignored.
  out = rpn_targets(anchors, gt_boxes, np.zeros(4, bool), gt_is_crowd, jax.random.key(0))
  assert out["sampled"].all()


@pytest.mark.parametrize("batch_size", [256, 16])
def test_rpn_matches_numpy_reference(rng, batch_size):
  """Labels, sample counts and box targets agree with the NumPy loop reference.

  batch_size 16: both caps bind (8 of more positives, 8 of many negatives).
  """
  gt_boxes, _, gt_valid, gt_is_crowd = _random_gt(rng)
  anchors = np.concatenate([
      gt_boxes[6:7],  # IoU 1 with a padding entry: must not be positive
      random_boxes(rng, 300, canvas=100.0, min_size=4.0),
      _jitter(rng, gt_boxes[:4], 60),  # near objects 0..3: positives and ignored
      _shrink(_jitter(rng, gt_boxes[5:6], 10)),  # inside the crowd region
  ])
  labels, matched, best = _np_labels(anchors, gt_boxes, gt_valid, gt_is_crowd, (0.3, 0.7),
                                     low_quality=True)
  num_pos, num_neg = (labels == 1).sum(), (labels == 0).sum()
  assert num_pos > 8 and num_neg > 256 and (labels == -1).sum() > 10
  assert labels[0] != 1
  # Object 4 has no anchor near it: its best one is positive only as its best.
  assert np.any((labels == 1) & (best < 0.7))

  out = _rpn_targets(anchors, gt_boxes, gt_valid, gt_is_crowd, jax.random.key(1),
                     batch_size_per_image=batch_size)
  positive, sampled = np.asarray(out["positive"]), np.asarray(out["sampled"])
  expected_pos = min(num_pos, batch_size // 2)
  assert positive.sum() == expected_pos
  assert (sampled & ~positive).sum() == min(num_neg, batch_size - expected_pos)
  assert np.all(labels[positive] == 1)
  assert np.all(labels[sampled & ~positive] == 0)
  if batch_size == 256:
    np.testing.assert_array_equal(positive, labels == 1)
  np.testing.assert_array_equal(out["objectness"], positive.astype(np.float32))
  want = references.encode(gt_boxes[matched], anchors, (1, 1, 1, 1))
  np.testing.assert_allclose(out["box_deltas"][positive], want[positive], atol=1e-5)
  np.testing.assert_array_equal(out["box_deltas"][~positive], 0.0)


def test_rpn_jit_vmap_and_shapes(rng):
  """jit output shapes and dtypes; vmap over two images equals two single calls."""
  gts = [_random_gt(rng) for _ in range(2)]
  anchors = np.concatenate([random_boxes(rng, 100, min_size=4.0), _jitter(rng, gts[0][0], 20)])
  keys = jax.random.split(jax.random.key(0), 2)
  stack = lambda i: np.stack([g[i] for g in gts])
  fn = functools.partial(rpn_targets, batch_size_per_image=32)
  batched = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0, 0)))(
      anchors, stack(0), stack(2), stack(3), keys)
  a = len(anchors)
  assert batched["objectness"].shape == (2, a) and batched["objectness"].dtype == jnp.float32
  assert batched["sampled"].shape == (2, a) and batched["sampled"].dtype == jnp.bool_
  assert batched["positive"].shape == (2, a) and batched["positive"].dtype == jnp.bool_
  assert batched["box_deltas"].shape == (2, a, 4)
  assert batched["box_deltas"].dtype == jnp.float32
  for b in range(2):
    single = jax.jit(fn)(anchors, gts[b][0], gts[b][2], gts[b][3], keys[b])
    for name in single:
      np.testing.assert_allclose(batched[name][b], single[name], atol=1e-6, err_msg=name)
  assert not np.array_equal(batched["positive"][0], batched["positive"][1])


def test_rpn_shape_errors():
  """Wrong shapes raise ValueError naming the argument."""
  anchors, gt_boxes, gt_valid, gt_is_crowd = _rpn_hand_case()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="anchors"):
    rpn_targets(anchors[:, :3], gt_boxes, gt_valid, gt_is_crowd, key)
  with pytest.raises(ValueError, match="gt_valid"):
    rpn_targets(anchors, gt_boxes, gt_valid[:3], gt_is_crowd, key)
  with pytest.raises(ValueError, match="gt_is_crowd"):
    rpn_targets(anchors, gt_boxes, gt_valid, gt_is_crowd[:, None], key)
  with pytest.raises(ValueError, match="gt_boxes"):
    rpn_targets(anchors, gt_boxes[:0], gt_valid[:0], gt_is_crowd[:0], key)


# ----------------------------------------------------------------------------
# roi_targets


def _roi_hand_case():
  """Proposals and ground truth whose targets are worked out in test_roi_hand_case."""
  gt_boxes = np.array([
      [0, 0, 10, 10],    # g0: object of class 2
      [50, 0, 90, 40],   # g1: crowd region
      [20, 20, 30, 30],  # g2: padding
  ], np.float32)
  gt_classes = np.array([2, 0, 1], np.int32)
  gt_valid = np.array([True, True, False])
  gt_is_crowd = np.array([False, True, False])
  proposals = np.array([
      [0, 0, 10, 12],    # p0: IoU(g0) = 0.83       -> foreground, class 2
      [20, 20, 30, 30],  # p1: IoU 1 with padding   -> background
      [60, 10, 70, 20],  # p2: inside the crowd     -> ignored
      [0, 0, 20, 20],    # p3: IoU(g0) = 0.25       -> background
      [0, 0, 10, 11],    # p4: IoU(g0) = 0.91, but a padded proposal -> never sampled
  ], np.float32)
  proposals_valid = np.array([True, True, True, True, False])
  return proposals, proposals_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd


def _rows(boxes, candidates):
  """Index in candidates of each row of boxes (rows must be found)."""
  eq = np.all(np.asarray(boxes)[:, None, :] == np.asarray(candidates)[None, :, :], axis=-1)
  assert eq.any(axis=1).all()
  return np.argmax(eq, axis=1)


def test_roi_hand_case():
  """Foreground from a proposal and the appended gt; background; ignored and padded, by hand."""
  args = _roi_hand_case()
  out = roi_targets(*args, key=jax.random.key(0), num_classes=3, batch_size_per_image=8,
                    positive_fraction=0.5)
  # Candidates: p0..p4 then g0 (an object); g1 (crowd) and g2 (padding) are not
  # candidates. Labelled: foreground p0, g0; background p1, p3. 8 slots allow
  # 4 foreground, so all 4 are sampled, foreground first.
  np.testing.assert_array_equal(out["valid"], [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(out["foreground"], [True] * 2 + [False] * 6)
  np.testing.assert_array_equal(out["classes"], [2, 2, 3, 3, 3, 3, 3, 3])  # background K = 3
  candidates = np.concatenate([args[0], args[2]])
  fg, bg = _rows(out["boxes"][:2], candidates), _rows(out["boxes"][2:4], candidates)
  order_fg, order_bg = np.argsort(fg), np.argsort(bg)
  np.testing.assert_array_equal(fg[order_fg], [0, 5])  # p0 and g0
  np.testing.assert_array_equal(bg[order_bg], [1, 3])  # p1 and p3
  np.testing.assert_array_equal(out["boxes"][4:], 0.0)
  np.testing.assert_array_equal(out["matched_gt"][:2], [0, 0])
  np.testing.assert_allclose(out["matched_iou"][:2][order_fg], [100 / 120, 1.0], rtol=1e-6)
  np.testing.assert_allclose(out["matched_iou"][2:4][order_bg], [0.0, 0.25], rtol=1e-6)
  np.testing.assert_array_equal(out["matched_iou"][4:], 0.0)
  # p0 (w 10, h 12, centre (5, 6)) to g0 (centre (5, 5)) with weights (10, 10, 5, 5):
  # dy = 10 * (5 - 6) / 12, dh = 5 * log(10 / 12); g0 to itself: zeros.
  deltas = np.asarray(out["box_deltas"])[:2][order_fg]
  np.testing.assert_allclose(deltas, [[0, -10 / 12, 0, 5 * np.log(10 / 12)], [0, 0, 0, 0]],
                             atol=1e-6)
  np.testing.assert_array_equal(out["box_deltas"][2:], 0.0)


def test_roi_foreground_cap():
  """4 slots at 25% foreground: 1 foreground, the 2 backgrounds, 1 empty slot."""
  args = _roi_hand_case()
  out = roi_targets(*args, key=jax.random.key(0), num_classes=3, batch_size_per_image=4,
                    positive_fraction=0.25)
  np.testing.assert_array_equal(out["valid"], [True, True, True, False])
  np.testing.assert_array_equal(out["foreground"], [True, False, False, False])
  np.testing.assert_array_equal(out["classes"], [2, 3, 3, 3])


def test_roi_every_object_gets_a_foreground():
  """With no useful proposal, each valid non-crowd gt is still sampled as foreground.

  The crowd region and the padding never are.
  """
  gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 30], [50, 50, 70, 70], [5, 5, 9, 9]],
                      np.float32)
  gt_classes = np.array([0, 1, 2, 3], np.int32)
  gt_valid = np.array([True, True, True, False])
  gt_is_crowd = np.array([False, False, True, False])
  proposals = np.array([[80, 80, 90, 90], [85, 0, 95, 5]], np.float32)  # far from all
  out = roi_targets(proposals, np.ones(2, bool), gt_boxes, gt_classes, gt_valid, gt_is_crowd,
                    jax.random.key(0), num_classes=4, batch_size_per_image=8)
  fg = np.asarray(out["foreground"])
  assert fg.sum() == 2 and out["valid"].sum() == 4
  np.testing.assert_array_equal(sorted(np.asarray(out["matched_gt"])[fg]), [0, 1])
  np.testing.assert_array_equal(sorted(np.asarray(out["classes"])[fg]), [0, 1])
  np.testing.assert_allclose(out["matched_iou"][fg], 1.0)
  np.testing.assert_array_equal(out["classes"][~fg], 4)


def test_roi_matches_numpy_reference(rng):
  """Every sampled slot agrees with the NumPy labels; the counts follow the caps."""
  num_classes, batch_size = 4, 32
  gt_boxes, gt_classes, gt_valid, gt_is_crowd = _random_gt(rng, num_classes=num_classes)
  proposals = np.concatenate([random_boxes(rng, 60, canvas=100.0, min_size=4.0),
                              _jitter(rng, gt_boxes[:5], 30), _jitter(rng, gt_boxes[5:], 10)])
  proposals_valid = rng.uniform(size=len(proposals)) < 0.8
  candidates = np.concatenate([proposals, gt_boxes])
  candidates_valid = np.concatenate([proposals_valid, gt_valid & ~gt_is_crowd])
  labels, matched, best = _np_labels(candidates, gt_boxes, gt_valid, gt_is_crowd, (0.5,),
                                     low_quality=False)
  labels[~candidates_valid] = -1
  num_pos, num_neg = (labels == 1).sum(), (labels == 0).sum()
  assert num_pos > batch_size // 4 and num_neg > batch_size

  out = _roi_targets(proposals, proposals_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd,
                     jax.random.key(3), num_classes=num_classes, batch_size_per_image=batch_size,
                     positive_fraction=0.25)
  out = {k: np.asarray(v) for k, v in out.items()}
  valid, fg = out["valid"], out["foreground"]
  assert fg.sum() == batch_size // 4 and valid.sum() == batch_size
  rows = _rows(out["boxes"], candidates)
  assert len(set(rows)) == batch_size  # sampled without replacement
  assert np.all(labels[rows[fg]] == 1) and np.all(labels[rows[~fg]] == 0)
  np.testing.assert_array_equal(out["classes"][fg], gt_classes[matched[rows[fg]]])
  np.testing.assert_array_equal(out["classes"][~fg], num_classes)
  np.testing.assert_array_equal(out["matched_gt"][fg], matched[rows[fg]])
  np.testing.assert_allclose(out["matched_iou"], best[rows], atol=1e-6)
  want = references.encode(gt_boxes[matched[rows]], candidates[rows], BOX_HEAD_WEIGHTS)
  np.testing.assert_allclose(out["box_deltas"][fg], want[fg], atol=2e-5)
  np.testing.assert_array_equal(out["box_deltas"][~fg], 0.0)


def test_roi_jit_vmap_and_shapes(rng):
  """jit output shapes and dtypes; vmap over two images equals two single calls."""
  gts = [_random_gt(rng) for _ in range(2)]
  proposals = np.stack([np.concatenate([random_boxes(rng, 30), _jitter(rng, g[0][:5], 10)])
                        for g in gts])
  proposals_valid = np.ones(proposals.shape[:2], bool)
  keys = jax.random.split(jax.random.key(0), 2)
  stack = lambda i: np.stack([g[i] for g in gts])
  fn = functools.partial(roi_targets, num_classes=4, batch_size_per_image=16)
  batched = jax.jit(jax.vmap(fn))(proposals, proposals_valid, stack(0), stack(1), stack(2),
                                  stack(3), keys)
  expected = {"boxes": ((2, 16, 4), jnp.float32), "valid": ((2, 16), jnp.bool_),
              "classes": ((2, 16), jnp.int32), "foreground": ((2, 16), jnp.bool_),
              "matched_gt": ((2, 16), jnp.int32), "box_deltas": ((2, 16, 4), jnp.float32),
              "matched_iou": ((2, 16), jnp.float32)}
  assert {k: (v.shape, v.dtype) for k, v in batched.items()} == expected
  for b in range(2):
    single = jax.jit(fn)(proposals[b], proposals_valid[b], *(g for g in gts[b]), keys[b])
    for name in single:
      np.testing.assert_allclose(batched[name][b], single[name], atol=1e-6, err_msg=name)


def test_roi_shape_errors():
  """Wrong shapes raise ValueError naming the argument."""
  proposals, proposals_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd = _roi_hand_case()
  call = lambda **kw: roi_targets(**{**dict(
      proposals=proposals, proposals_valid=proposals_valid, gt_boxes=gt_boxes,
      gt_classes=gt_classes, gt_valid=gt_valid, gt_is_crowd=gt_is_crowd,
      key=jax.random.key(0), num_classes=3), **kw})
  with pytest.raises(ValueError, match="proposals_valid"):
    call(proposals_valid=proposals_valid[:2])
  with pytest.raises(ValueError, match="proposals"):
    call(proposals=proposals[:, :2])
  with pytest.raises(ValueError, match="gt_classes"):
    call(gt_classes=gt_classes[:2])
  with pytest.raises(ValueError, match="gt_valid"):
    call(gt_valid=gt_valid[:, None])
  with pytest.raises(ValueError, match="gt_boxes"):  # G = 0: pad instead
    call(gt_boxes=gt_boxes[:0], gt_classes=gt_classes[:0], gt_valid=gt_valid[:0],
         gt_is_crowd=gt_is_crowd[:0])


# ----------------------------------------------------------------------------
# mask_targets


def test_mask_roi_equal_to_gt_box_gives_the_crop():
  """A RoI equal to its gt box reads the crop back: all ones, and a left half."""
  gt_boxes = np.array([[10, 10, 38, 38], [0, 0, 56, 28]], np.float32)
  masks = np.zeros((2, 28, 28), np.float32)
  masks[0] = 1.0
  masks[1, :, :14] = 1.0  # left half of g1
  rois = gt_boxes.copy()
  out = mask_targets(rois, np.array([0, 1]), gt_boxes, masks)
  np.testing.assert_array_equal(out[0], 1.0)
  # g1 is 56 wide: each output cell covers 2 image px = 1 crop column, so the
  # output is the crop itself. Cell 13 samples crop x 13.25 and 13.75 (both
  # on the 1s); cell 14 samples 14.25 and 14.75 (on the 0s).
  np.testing.assert_array_equal(out[1], masks[1])


def test_mask_shifted_roi_hand_case():
  """A RoI shifted right by half its width: ones on the overlapping left half only.

  gt [10, 10, 38, 38] with an all-ones 28x28 crop (1 px per crop pixel); RoI
  [24, 10, 52, 38]. Output cell j covers x in [24 + j, 25 + j]: cells 0..13
  lie over the gt box (x < 38), 14..27 outside. Cell 13 reads crop x 27.25 and
  27.75: 1 and 0.75 (bilinear towards the zero border) -> 0.875 -> 1. Cell 14
  reads 28.25 and 28.75: 0.25 and 0 -> 0.125 -> 0.
  """
  gt_boxes = np.array([[10, 10, 38, 38]], np.float32)
  masks = np.ones((1, 28, 28), np.float32)
  rois = np.array([[24, 10, 52, 38], [10, 24, 38, 52]], np.float32)  # right, and down
  out = mask_targets(rois, np.array([0, 0]), gt_boxes, masks)
  expected = np.zeros((28, 28), np.float32)
  expected[:, :14] = 1.0
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(out[1], expected.T)


def _disk(cx, cy, r, x, y):
  return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2


def test_mask_matches_analytic_rasterisation(rng):
  """Targets of random RoIs equal a direct rasterisation of the objects.

  Two objects drawn analytically: a disk, and an L (two rectangles). Each is
  rasterised into a 32x32 crop of its bounding box at crop pixel centres; the
  reference samples the object itself at each RoI's 28x28 cell centres.
  Cells within one crop pixel of the object's boundary, where the crop's
  resolution decides, are not compared (at zero margin ~130 of ~19000 cells
  differ, all on the boundary).
  """
  m = 32
  gt_boxes = np.array([[12.0, 20.0, 52.0, 60.0],     # disk: centre (32, 40), r 20
                       [50.0, 10.0, 98.0, 46.0]], np.float32)  # L: 48 x 36

  def inside(g, x, y):
    if g == 0:
      return _disk(32.0, 40.0, 20.0, x, y)
    x1, y1, x2, y2 = gt_boxes[1]
    vertical = (x >= x1) & (x <= x1 + 16) & (y >= y1) & (y <= y2)
    horizontal = (x >= x1) & (x <= x2) & (y >= y2 - 12) & (y <= y2)
    return vertical | horizontal

  def distance_to_boundary(g, x, y):
    if g == 0:
      return np.abs(np.hypot(x - 32.0, y - 40.0) - 20.0)
    x1, y1, x2, y2 = gt_boxes[1]
    edges_x = np.array([x1, x1 + 16, x2])
    edges_y = np.array([y1, y2 - 12, y2])
    return np.minimum(np.abs(x[..., None] - edges_x).min(-1),
                      np.abs(y[..., None] - edges_y).min(-1))

  masks = np.zeros((2, m, m), np.float32)
  for g in range(2):
    x1, y1, x2, y2 = gt_boxes[g]
    centres = (np.arange(m) + 0.5) / m
    xs, ys = np.meshgrid(x1 + centres * (x2 - x1), y1 + centres * (y2 - y1))
    masks[g] = inside(g, xs, ys)

  matched = rng.integers(0, 2, 24)
  rois = np.concatenate([gt_boxes, _jitter(rng, gt_boxes[matched[2:]], 22, scale=0.4)])
  matched[:2] = [0, 1]
  out = np.asarray(_mask_targets(rois, matched, gt_boxes, masks))

  compared = mismatched = 0
  for r in range(len(rois)):
    g = matched[r]
    x1, y1, x2, y2 = rois[r].astype(np.float64)
    centres = (np.arange(28) + 0.5) / 28
    xs, ys = np.meshgrid(x1 + centres * (x2 - x1), y1 + centres * (y2 - y1))
    crop_px = max((gt_boxes[g, 2] - gt_boxes[g, 0]), (gt_boxes[g, 3] - gt_boxes[g, 1])) / m
    far = distance_to_boundary(g, xs, ys) > crop_px
    # The object only exists inside its box; outside it the target is 0.
    bx1, by1, bx2, by2 = gt_boxes[g]
    ref = inside(g, xs, ys) & (xs >= bx1) & (xs <= bx2) & (ys >= by1) & (ys <= by2)
    compared += far.sum()
    mismatched += (out[r][far] != ref[far]).sum()
    assert far.mean() > 0.5
  assert compared > 10000
  assert mismatched == 0, f"{mismatched} of {compared} cells differ"
  assert set(np.unique(out)) <= {0.0, 1.0}


def test_mask_empty_gt():
  """G = 0 (no masks at all) gives all-zero targets of the right shape."""
  rois = random_boxes(np.random.default_rng(0), 3)
  out = mask_targets(rois, np.zeros(3, np.int32), np.zeros((0, 4), np.float32),
                     np.zeros((0, 16, 16), np.float32), mask_size=14)
  assert out.shape == (3, 14, 14) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)


def test_mask_jit_vmap_and_shapes(rng):
  """jit output shape and dtype; vmap over two images equals two single calls."""
  gt_boxes = np.stack([random_boxes(rng, 3, min_size=10.0) for _ in range(2)])
  masks = (rng.uniform(size=(2, 3, 16, 16)) > 0.5).astype(np.float32)
  rois = np.stack([_jitter(rng, g, 5, scale=0.3) for g in gt_boxes])
  matched = rng.integers(0, 3, (2, 5))
  batched = jax.jit(jax.vmap(mask_targets))(rois, matched, gt_boxes, masks)
  assert batched.shape == (2, 5, 28, 28) and batched.dtype == jnp.float32
  for b in range(2):
    np.testing.assert_array_equal(batched[b], _mask_targets(rois[b], matched[b], gt_boxes[b],
                                                            masks[b]))
  assert 0.1 < batched.mean() < 0.9


def test_mask_shape_errors():
  """Wrong shapes raise ValueError naming the argument."""
  rois = np.zeros((2, 4), np.float32)
  gt_boxes = np.zeros((3, 4), np.float32)
  masks = np.zeros((3, 8, 8), np.float32)
  matched = np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="rois"):
    mask_targets(rois[:, :3], matched, gt_boxes, masks)
  with pytest.raises(ValueError, match="matched_gt"):
    mask_targets(rois, matched[:1], gt_boxes, masks)
  with pytest.raises(ValueError, match="gt_masks"):
    mask_targets(rois, matched, gt_boxes, masks[:2])
  with pytest.raises(ValueError, match="gt_masks"):
    mask_targets(rois, matched, gt_boxes, masks[:, :, :7])


# ----------------------------------------------------------------------------
# keypoint_targets


def _np_keypoints_to_heatmap(keypoints, rois, heatmap_size):
  """A NumPy transcription of detectron2's keypoints_to_heatmap (float32 like torch)."""
  keypoints = np.asarray(keypoints, np.float32)
  rois = np.asarray(rois, np.float32)
  offset_x, offset_y = rois[:, 0][:, None], rois[:, 1][:, None]
  scale_x = (np.float32(heatmap_size) / (rois[:, 2] - rois[:, 0]))[:, None]
  scale_y = (np.float32(heatmap_size) / (rois[:, 3] - rois[:, 1]))[:, None]
  x, y = keypoints[..., 0], keypoints[..., 1]
  x_boundary = x == rois[:, 2][:, None]
  y_boundary = y == rois[:, 3][:, None]
  x = np.floor((x - offset_x) * scale_x).astype(np.int64)
  y = np.floor((y - offset_y) * scale_y).astype(np.int64)
  x[x_boundary] = heatmap_size - 1
  y[y_boundary] = heatmap_size - 1
  valid_loc = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size)
  valid = valid_loc & (keypoints[..., 2] > 0)
  return (y * heatmap_size + x) * valid, valid


def test_keypoint_hand_case():
  """Cells of keypoints in a 40x40 RoI at m = 4 (10 px per cell), by hand."""
  rois = np.array([[10, 20, 50, 60]], np.float32)
  keypoints = np.array([[
      [10.0, 20.0, 2],    # top-left corner: cell (0, 0) -> 0
      [29.9, 45.0, 1],    # x = floor(1.99) = 1, y = floor(2.5) = 2 -> 2 * 4 + 1 = 9
      [50.0, 60.0, 2],    # exactly on the right and bottom edges -> (3, 3) -> 15
      [20.0, 60.0, 2],    # bottom edge: y -> 3, x = floor(1.0) = 1 -> 13
      [30.0, 30.0, 0],    # not visible -> invalid
      [9.99, 30.0, 2],    # x = floor(-0.001) = -1: left of the RoI -> invalid
      [50.01, 30.0, 2],   # x = floor(4.001) = 4: right of the RoI -> invalid
      [30.0, 19.0, 2],    # above the RoI -> invalid
  ]], np.float32)
  out = keypoint_targets(rois, keypoints, heatmap_size=4)
  np.testing.assert_array_equal(out["valid"], [[True] * 4 + [False] * 4])
  np.testing.assert_array_equal(out["index"], [[0, 9, 15, 13, 0, 0, 0, 0]])


def _random_keypoints(rng, rois, k=17):
  """Keypoints around each RoI: inside, outside, exactly on its edges; random visibility."""
  r = len(rois)
  w, h = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
  x = rois[:, :1] + rng.uniform(-0.2, 1.2, (r, k)) * w[:, None]
  y = rois[:, 1:2] + rng.uniform(-0.2, 1.2, (r, k)) * h[:, None]
  on_edge = rng.integers(0, 5, (r, k))  # 0: none, 1..4: x1, y1, x2, y2
  x = np.where(on_edge == 1, rois[:, :1], np.where(on_edge == 3, rois[:, 2:3], x))
  y = np.where(on_edge == 2, rois[:, 1:2], np.where(on_edge == 4, rois[:, 3:4], y))
  v = rng.integers(0, 3, (r, k))
  return np.stack([x, y, v], axis=-1).astype(np.float32)


def test_keypoint_matches_numpy_detectron2(rng):
  """Index and valid equal a NumPy transcription of detectron2's keypoints_to_heatmap."""
  rois = random_boxes(rng, 40, min_size=2.0)
  keypoints = _random_keypoints(rng, rois)
  out = _keypoint_targets(rois, keypoints, heatmap_size=56)
  index, valid = _np_keypoints_to_heatmap(keypoints, rois, 56)
  assert 0.3 < valid.mean() < 0.7
  np.testing.assert_array_equal(out["valid"], valid)
  np.testing.assert_array_equal(out["index"], index)


@pytest.mark.parity
def test_keypoint_matches_torchvision(rng, torch, torchvision):
  """Index and valid equal torchvision's keypoints_to_heatmap (the same as detectron2's)."""
  from torchvision.models.detection.roi_heads import keypoints_to_heatmap

  rois = random_boxes(rng, 40, min_size=2.0)
  keypoints = _random_keypoints(rng, rois)
  out = _keypoint_targets(rois, keypoints, heatmap_size=56)
  index, valid = keypoints_to_heatmap(torch.from_numpy(keypoints), torch.from_numpy(rois), 56)
  np.testing.assert_array_equal(out["valid"], valid.numpy().astype(bool))
  np.testing.assert_array_equal(out["index"], index.numpy())


def test_keypoint_jit_vmap_and_shapes(rng):
  """jit output shapes and dtypes; vmap over two images equals two single calls."""
  rois = np.stack([random_boxes(rng, 6, min_size=2.0) for _ in range(2)])
  keypoints = np.stack([_random_keypoints(rng, r, k=5) for r in rois])
  batched = jax.jit(jax.vmap(functools.partial(keypoint_targets, heatmap_size=8)))(
      rois, keypoints)
  assert batched["index"].shape == (2, 6, 5) and batched["index"].dtype == jnp.int32
  assert batched["valid"].shape == (2, 6, 5) and batched["valid"].dtype == jnp.bool_
  for b in range(2):
    single = _keypoint_targets(rois[b], keypoints[b], heatmap_size=8)
    for name in single:
      np.testing.assert_array_equal(batched[name][b], single[name], err_msg=name)


def test_keypoint_shape_errors():
  """Wrong shapes raise ValueError naming the argument."""
  rois = np.zeros((2, 4), np.float32)
  keypoints = np.zeros((2, 17, 3), np.float32)
  with pytest.raises(ValueError, match="rois"):
    keypoint_targets(rois[:, :3], keypoints)
  with pytest.raises(ValueError, match="keypoints"):
    keypoint_targets(rois, keypoints[:1])
  with pytest.raises(ValueError, match="keypoints"):
    keypoint_targets(rois, keypoints[..., :2])


# ----------------------------------------------------------------------------
# keypoint_rois


def test_keypoint_rois_hand_case():
  """Foreground RoIs with a visible keypoint inside (edges count) first, in order."""
  rois = np.array([[0, 0, 10, 10]] * 6, np.float32)
  foreground = np.array([True, True, False, True, True, True])
  keypoints = np.array([
      [[5, 5, 2], [0, 0, 0]],     # 0: inside, visible -> counts
      [[11, 5, 2], [5, 5, 0]],    # 1: visible one outside, inside one not visible
      [[5, 5, 2], [5, 5, 2]],     # 2: background
      [[10, 10, 1], [20, 0, 2]],  # 3: on the bottom-right corner, v=1 -> counts
      [[0, 0, 0], [0, 0, 0]],     # 4: instance without keypoints
      [[3, 0, 2], [-1, 3, 2]],    # 5: on the top edge -> counts
  ], np.float32)
  slots, counts = keypoint_rois(rois, foreground, keypoints, num_slots=4)
  np.testing.assert_array_equal(slots, [0, 3, 5, 1])
  np.testing.assert_array_equal(counts, [True, True, True, False])
  assert slots.dtype == jnp.int32 and counts.dtype == jnp.bool_


def test_keypoint_rois_matches_numpy(rng):
  """Random RoIs and keypoints: the slots equal a NumPy stable partition."""
  rois = random_boxes(rng, 64, min_size=2.0)
  keypoints = _random_keypoints(rng, rois, k=3)
  foreground = rng.random(64) < 0.5
  x, y, v = np.moveaxis(keypoints, -1, 0)
  inside = (v > 0) & (x >= rois[:, :1]) & (x <= rois[:, 2:3]) & (y >= rois[:, 1:2]) & (
      y <= rois[:, 3:4])
  counts = foreground & inside.any(axis=1)
  want = np.concatenate([np.flatnonzero(counts), np.flatnonzero(~counts)])[:40]
  assert 5 < counts.sum() < 40
  slots, got_counts = _keypoint_rois(rois, foreground, keypoints, num_slots=40)
  np.testing.assert_array_equal(slots, want)
  np.testing.assert_array_equal(got_counts, counts[want])


def test_keypoint_rois_errors():
  rois = np.zeros((4, 4), np.float32)
  keypoints = np.zeros((4, 3, 3), np.float32)
  with pytest.raises(ValueError, match="num_slots"):
    keypoint_rois(rois, np.ones(4, bool), keypoints, num_slots=5)
  with pytest.raises(ValueError, match="foreground"):
    keypoint_rois(rois, np.ones(3, bool), keypoints, num_slots=2)
  with pytest.raises(ValueError, match="keypoints"):
    keypoint_rois(rois, np.ones(4, bool), keypoints[:3], num_slots=2)
