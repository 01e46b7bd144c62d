"""Tests for mrcnn_jax.ops.matching: IoU matching with padded gt and crowd regions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.matching import IGNORE, NEGATIVE, POSITIVE, ignore_crowd, match
from tests import references
from tests.conftest import random_boxes

RPN = dict(thresholds=(0.3, 0.7), labels=(NEGATIVE, IGNORE, POSITIVE))
ROI = dict(thresholds=(0.5,), labels=(NEGATIVE, POSITIVE))


def _np_match(iou, gt_valid, thresholds, labels, allow_low_quality_matches):
  """Loop reference in float32 (thresholds compared as float32, like jnp's weak types)."""
  iou = np.asarray(iou, np.float32)
  n, g = iou.shape
  matched = np.zeros(n, np.int32)
  out = np.full(n, labels[0], np.int32)
  for i in range(n):
    best, arg = None, 0
    for j in range(g):
      if gt_valid[j] and (best is None or iou[i, j] > best):
        best, arg = iou[i, j], j
    matched[i] = arg
    if best is None:
      continue
    for t, label in zip(thresholds, labels[1:]):
      if best >= np.float32(t):
        out[i] = label
  if allow_low_quality_matches:
    for j in range(g):
      if not gt_valid[j]:
        continue
      top = max(iou[i, j] for i in range(n))
      if top <= 0:
        continue
      for i in range(n):
        if iou[i, j] == top:
          out[i] = labels[-1]
  return matched, out


def _np_ignore_crowd(labels, boxes, gt_boxes, gt_crowd, thresh):
  out = np.array(labels, np.int32)
  ioa = references.ioa(boxes, gt_boxes)
  nonempty = references.area(np.asarray(boxes, np.float64)) > 0
  for i in range(len(boxes)):
    for g, c in enumerate(gt_crowd):
      if c and nonempty[i] and ioa[i, g] >= thresh and out[i] == NEGATIVE:
        out[i] = IGNORE
  return out


def _quantised_iou(rng, n, g, low=0, high=10):
  # Multiples of 0.1 force ties and values exactly on the thresholds; a low
  # ``high`` leaves gts whose best box is below 0.7 (low-quality matches).
  return (rng.integers(low, high + 1, size=(n, g)) / 10).astype(np.float32)


# ---------------------------------------------------------------------------
# Hand tables.

def test_match_rpn_table():
  """RPN thresholds: negative / ignore / positive, bounds inclusive, padding never wins."""
  iou = jnp.array([
      # gt0   gt1  pad
      [0.10, 0.20, 0.0],  # best 0.2 < 0.3            -> NEGATIVE (matched gt1)
      [0.50, 0.10, 0.0],  # 0.3 <= 0.5 < 0.7          -> IGNORE
      [0.75, 0.30, 0.0],  # 0.75 >= 0.7               -> POSITIVE, gt0
      [0.00, 0.00, 1.0],  # IoU 1 with padding only   -> NEGATIVE
      [0.30, 0.70, 0.0],  # exactly 0.7               -> POSITIVE, gt1
      [0.30, 0.00, 0.9],  # exactly 0.3 (pad ignored) -> IGNORE, gt0
  ], jnp.float32)
  valid = jnp.array([True, True, False])
  matched, labels = match(iou, valid, **RPN)
  np.testing.assert_array_equal(labels, [NEGATIVE, IGNORE, POSITIVE, NEGATIVE, POSITIVE, IGNORE])
  np.testing.assert_array_equal(np.asarray(matched)[[0, 1, 2, 4, 5]], [1, 0, 0, 1, 0])
  # Low-quality matching adds nothing here: each gt's best box is already positive.
  _, lq = match(iou, valid, allow_low_quality_matches=True, **RPN)
  np.testing.assert_array_equal(lq, labels)


def test_match_low_quality_table():
  """Each valid gt's best boxes (ties too) become positive; padding and zero-overlap gts add none."""
  iou = jnp.array([
      # gt0  gt1  pad  gt3 (valid, overlaps nothing)
      [0.4, 0.1, 0.0, 0.0],   # IGNORE, but ties gt0's best 0.4        -> POSITIVE, gt0
      [0.4, 0.45, 0.0, 0.0],  # IGNORE; gt1's best and ties gt0's best -> POSITIVE, gt1
      [0.2, 0.1, 1.0, 0.0],   # the pad's best (1.0) but pad is not a gt -> NEGATIVE
      [0.0, 0.0, 0.0, 0.0],   # reaches gt3's "best" 0 only             -> NEGATIVE
  ], jnp.float32)
  valid = jnp.array([True, True, False, True])
  matched, labels = match(iou, valid, **RPN)
  np.testing.assert_array_equal(labels, [IGNORE, IGNORE, NEGATIVE, NEGATIVE])
  matched_lq, labels_lq = match(iou, valid, allow_low_quality_matches=True, **RPN)
  np.testing.assert_array_equal(labels_lq, [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE])
  # The matched index is each box's own best gt (as torchvision), not the gt it tied.
  np.testing.assert_array_equal(matched_lq[:2], [0, 1])
  np.testing.assert_array_equal(matched_lq, matched)


def test_match_roi_head_two_labels():
  """RoI-head thresholds (0.5,): below is NEGATIVE, at or above is POSITIVE."""
  iou = jnp.array([[0.49, 0.1], [0.5, 0.2], [0.1, 0.8]], jnp.float32)
  matched, labels = match(iou, jnp.array([True, True]), **ROI)
  np.testing.assert_array_equal(labels, [NEGATIVE, POSITIVE, POSITIVE])
  np.testing.assert_array_equal(matched, [0, 0, 1])


def test_match_without_valid_gt():
  """All-padding gt (an image with no objects) and G = 0 both give all NEGATIVE, index 0."""
  iou = jnp.array([[0.9, 1.0], [0.0, 0.8]], jnp.float32)
  matched, labels = match(iou, jnp.array([False, False]), allow_low_quality_matches=True, **RPN)
  np.testing.assert_array_equal(labels, [NEGATIVE, NEGATIVE])
  np.testing.assert_array_equal(matched, [0, 0])
  matched, labels = match(jnp.zeros((3, 0)), jnp.zeros((0,), bool), **RPN)
  assert matched.shape == labels.shape == (3,)
  np.testing.assert_array_equal(labels, [NEGATIVE] * 3)


def test_ignore_crowd_table():
  """Negatives mostly (IoA >= 0.7) inside a crowd region become IGNORE; nothing else changes."""
  gt_boxes = jnp.array([[0, 0, 20, 20], [100, 100, 120, 120]], jnp.float32)
  gt_crowd = jnp.array([True, False])
  boxes = jnp.array([
      [0, 0, 10, 10],        # IoA 1 with the crowd, NEGATIVE  -> IGNORE
      [15, 15, 25, 25],      # 5x5 = 25 of 100 -> 0.25         -> NEGATIVE
      [0, 0, 10, 10],        # inside the crowd but POSITIVE   -> POSITIVE
      [12, 0, 22, 10],       # 8x10 = 80 of 100 -> 0.8         -> IGNORE
      [14, 0, 24, 10],       # 6x10 = 60 of 100 -> 0.6         -> NEGATIVE
      [100, 100, 110, 110],  # inside a non-crowd gt            -> NEGATIVE
      [5, 5, 6, 6],          # already IGNORE                   -> IGNORE
      [13, 0, 23, 10],       # 7x10 = 70 of 100: exactly 0.7    -> IGNORE ("at least")
  ], jnp.float32)
  labels = jnp.array([NEGATIVE, NEGATIVE, POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE, IGNORE,
                      NEGATIVE])
  out = ignore_crowd(labels, boxes, gt_boxes, gt_crowd)
  np.testing.assert_array_equal(
      out, [IGNORE, NEGATIVE, POSITIVE, IGNORE, NEGATIVE, NEGATIVE, IGNORE, IGNORE])
  # A looser threshold catches the 0.6 box too.
  out = ignore_crowd(labels, boxes, gt_boxes, gt_crowd, ioa_threshold=0.5)
  assert out[4] == IGNORE


# ---------------------------------------------------------------------------
# NumPy reference on random inputs.

@pytest.mark.parametrize("params", [RPN, ROI])
@pytest.mark.parametrize("low_quality", [False, True])
def test_match_matches_numpy_reference(rng, params, low_quality):
  """match() against the loop reference on tie-heavy IoUs with random padding."""
  added = 0
  for high in (10, 8, 6, 4, 2):
    iou = _quantised_iou(rng, 12, 5, high=high)
    valid = rng.random(5) < 0.7
    matched, labels = match(jnp.asarray(iou), jnp.asarray(valid),
                            allow_low_quality_matches=low_quality, **params)
    ref_matched, ref_labels = _np_match(iou, valid, params["thresholds"], params["labels"],
                                        low_quality)
    np.testing.assert_array_equal(labels, ref_labels)
    pos = ref_labels == POSITIVE
    # Ties in the best IoU may pick any tied gt; the chosen one must reach the best.
    np.testing.assert_array_equal(iou[np.arange(12), np.asarray(matched)][pos],
                                  iou[np.arange(12), ref_matched][pos])
    assert valid[np.asarray(matched)[pos]].all()
    added += (ref_labels != _np_match(iou, valid, params["thresholds"], params["labels"],
                                      False)[1]).sum()
  assert (added > 0) == low_quality  # low-quality matching was exercised


def test_ignore_crowd_matches_numpy_reference(rng):
  """ignore_crowd() against the loop reference on random boxes and crowd flags."""
  boxes = random_boxes(rng, 40, canvas=60.0, max_size=20.0)
  gt_boxes = random_boxes(rng, 6, canvas=50.0, min_size=20.0, max_size=50.0)
  gt_crowd = np.array([True, False, True, False, False, True])
  labels = rng.integers(-1, 2, size=40).astype(np.int32)
  out = ignore_crowd(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(gt_boxes),
                     jnp.asarray(gt_crowd), ioa_threshold=0.5)
  ref = _np_ignore_crowd(labels, boxes, gt_boxes, gt_crowd, 0.5)
  np.testing.assert_array_equal(out, ref)
  assert (ref != labels).any()  # the case is not vacuous


# ---------------------------------------------------------------------------
# jit.

def test_matching_under_jit_and_vmap(rng):
  """match + ignore_crowd jitted and vmapped over a batch: [B, N] int32 outputs."""
  b, n, g = 2, 10, 4
  boxes = jnp.asarray(np.stack([random_boxes(rng, n) for _ in range(b)]))
  gt = jnp.asarray(np.stack([random_boxes(rng, g) for _ in range(b)]))
  valid = jnp.array([[True, True, False, False], [True, True, True, False]])
  crowd = jnp.array([[False, True, False, False], [False, False, False, False]])

  def one(boxes, gt, valid, crowd):
    iou = box_ops.pairwise_iou(boxes, gt)
    matched, labels = match(iou, valid & ~crowd, allow_low_quality_matches=True, **RPN)
    return matched, ignore_crowd(labels, boxes, gt, crowd & valid)

  matched, labels = jax.jit(jax.vmap(one))(boxes, gt, valid, crowd)
  assert matched.shape == labels.shape == (b, n)
  assert matched.dtype == labels.dtype == jnp.int32
  for i in range(b):
    m, l = one(boxes[i], gt[i], valid[i], crowd[i])
    np.testing.assert_array_equal(matched[i], m)
    np.testing.assert_array_equal(labels[i], l)


# ---------------------------------------------------------------------------
# torchvision parity.

@pytest.mark.parametrize("low_quality", [False, True])
def test_match_agrees_with_torchvision_matcher(rng, torch, low_quality):
  """Where all gts are valid and overlap something, labels and indices agree with torchvision.

  torchvision encodes labels in the index: -1 below low, -2 between, else the gt.
  """
  from torchvision.models.detection._utils import Matcher
  for high in (10, 8, 6, 4, 2):
    iou = _quantised_iou(rng, 15, 4, low=1, high=high)  # no zero IoU: torchvision differs there
    ref = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(
        torch.from_numpy(iou.T.copy())).numpy()
    matched, labels = match(jnp.asarray(iou), jnp.ones(4, bool),
                            allow_low_quality_matches=low_quality, **RPN)
    matched, labels = np.asarray(matched), np.asarray(labels)
    np.testing.assert_array_equal(labels == NEGATIVE, ref == -1)
    np.testing.assert_array_equal(labels == IGNORE, ref == -2)
    pos = labels == POSITIVE
    np.testing.assert_array_equal(iou[pos, matched[pos]], iou[pos, ref[pos]])


# ---------------------------------------------------------------------------
# Argument errors.

def test_match_rejects_bad_arguments():
  """Wrong shapes and inconsistent thresholds/labels fail with the argument's name."""
  iou, valid = jnp.zeros((4, 3)), jnp.ones(3, bool)
  with pytest.raises(ValueError, match="^iou:"):
    match(jnp.zeros((4,)), valid)
  with pytest.raises(ValueError, match=r"^gt_valid: .*G=3"):
    match(iou, jnp.ones(2, bool))
  with pytest.raises(ValueError, match="^labels:"):
    match(iou, valid, thresholds=(0.3, 0.7), labels=(NEGATIVE, POSITIVE))
  with pytest.raises(ValueError, match="^thresholds:"):
    match(iou, valid, thresholds=(0.7, 0.3))


def test_ignore_crowd_rejects_bad_shapes():
  """Each of ignore_crowd's four arguments is named when its shape is wrong."""
  labels, boxes = jnp.zeros(5, jnp.int32), jnp.zeros((5, 4))
  gt, crowd = jnp.zeros((2, 4)), jnp.zeros(2, bool)
  with pytest.raises(ValueError, match="^boxes:"):
    ignore_crowd(labels, jnp.zeros((5, 3)), gt, crowd)
  with pytest.raises(ValueError, match="^match_labels:"):
    ignore_crowd(jnp.zeros(4, jnp.int32), boxes, gt, crowd)
  with pytest.raises(ValueError, match="^gt_boxes:"):
    ignore_crowd(labels, boxes, jnp.zeros((2, 5)), crowd)
  with pytest.raises(ValueError, match="^gt_crowd:"):
    ignore_crowd(labels, boxes, gt, jnp.zeros(3, bool))
