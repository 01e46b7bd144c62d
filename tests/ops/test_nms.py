"""Tests for mrcnn_jax.ops.nms: hand cases, a NumPy greedy reference, torchvision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.nms import batched_nms, nms
from tests import references
from tests.conftest import random_boxes


# IoU in float32 as the op computes it, so that thresholds tie exactly as there.
_greedy_reference = functools.partial(references.greedy_nms, dtype=np.float32)


def _kept(indices, valid):
  """The valid prefix of nms's padded output, after checking the padding."""
  indices, valid = np.asarray(indices), np.asarray(valid)
  n = int(valid.sum())
  assert valid[:n].all() and not valid[n:].any(), "valid must be a prefix"
  assert (indices[n:] == 0).all(), "unused slots must hold index 0"
  return indices[:n]


def _overlapping_problem(rng, n):
  """Many heavily overlapping boxes on a small canvas, with distinct scores."""
  boxes = random_boxes(rng, n, canvas=100.0, min_size=5.0, max_size=40.0)
  scores = rng.permutation(n).astype(np.float32) / n + rng.uniform(0, 0.5 / n, n).astype(np.float32)
  return boxes, scores


def test_hand_case():
  """Two boxes with IoU 81/119 = 0.68 and one apart: the lower-scored of the pair goes."""
  boxes = np.array([[20, 20, 30, 30],    # apart from the others
                    [0, 0, 10, 10],      # best
                    [1, 1, 11, 11]],     # IoU 0.68 with box 1
                   np.float32)
  scores = np.array([0.7, 0.9, 0.8], np.float32)
  indices, valid = nms(boxes, scores, 0.5, max_output=3)
  np.testing.assert_array_equal(indices, [1, 0, 0])
  np.testing.assert_array_equal(valid, [True, True, False])
  # Above the pair's IoU nothing is suppressed: all three, by score.
  indices, valid = nms(boxes, scores, 0.7, max_output=3)
  np.testing.assert_array_equal(indices, [1, 2, 0])
  np.testing.assert_array_equal(valid, [True, True, True])


def test_iou_equal_to_threshold_is_not_suppressed():
  """Suppression needs IoU strictly above the threshold, as in torchvision."""
  boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32)  # IoU exactly 1/3
  scores = np.array([0.9, 0.8], np.float32)
  np.testing.assert_array_equal(_kept(*nms(boxes, scores, 1 / 3, max_output=2)), [0, 1])
  np.testing.assert_array_equal(_kept(*nms(boxes, scores, 0.3, max_output=2)), [0])


def test_ties_keep_lower_index_first():
  """Equal scores are visited in index order, so the result is deterministic."""
  boxes = np.array([[0, 0, 10, 10],
                    [20, 20, 30, 30],
                    [21, 21, 31, 31],    # overlaps box 1, same score
                    [50, 50, 60, 60]],   # apart, same score
                   np.float32)
  scores = np.array([0.5, 0.9, 0.9, 0.9], np.float32)
  np.testing.assert_array_equal(_kept(*nms(boxes, scores, 0.5, max_output=4)), [1, 3, 0])
  # Swapping the tied pair's coordinates still keeps the lower index.
  swapped = boxes[[0, 2, 1, 3]]
  np.testing.assert_array_equal(_kept(*nms(swapped, scores, 0.5, max_output=4)), [1, 3, 0])


def test_ties_match_reference_across_tiles(rng):
  """Scores drawn from 5 values (many ties) give the stable-order greedy answer."""
  boxes = random_boxes(rng, 600, canvas=100.0, min_size=5.0, max_size=40.0)
  scores = (rng.integers(0, 5, 600) / 4).astype(np.float32)
  expected = _greedy_reference(boxes, scores, 0.5)
  for tile_size in (64, 256):
    got = _kept(*nms(boxes, scores, 0.5, max_output=600, tile_size=tile_size))
    np.testing.assert_array_equal(got, expected, err_msg=f"tile_size={tile_size}")


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_matches_numpy_reference_for_every_tile_size(rng, iou_threshold):
  """N=600 over 10, 5 or 3 tiles: the tiled fixed point is exactly greedy NMS."""
  boxes, scores = _overlapping_problem(rng, 600)
  expected = _greedy_reference(boxes, scores, iou_threshold)
  assert 64 < len(expected) < 600  # kept boxes span tiles, and some are suppressed
  for tile_size in (64, 128, 256):
    got = _kept(*nms(boxes, scores, iou_threshold, max_output=600, tile_size=tile_size))
    np.testing.assert_array_equal(got, expected, err_msg=f"tile_size={tile_size}")


def test_max_output_smaller_than_kept_count_stops_early(rng):
  """With few slots the loop stops after the first tiles; the prefix is still greedy."""
  boxes, scores = _overlapping_problem(rng, 600)
  expected = _greedy_reference(boxes, scores, 0.5)
  for max_output, tile_size in ((1, 64), (20, 64), (70, 64), (20, 256)):
    indices, valid = nms(boxes, scores, 0.5, max_output=max_output, tile_size=tile_size)
    assert indices.shape == valid.shape == (max_output,)
    assert np.asarray(valid).all()
    np.testing.assert_array_equal(indices, expected[:max_output],
                                  err_msg=f"max_output={max_output} tile_size={tile_size}")


def test_max_output_larger_than_kept_count(rng):
  """Spare slots are invalid and hold index 0."""
  boxes, scores = _overlapping_problem(rng, 100)
  expected = _greedy_reference(boxes, scores, 0.5)
  indices, valid = nms(boxes, scores, 0.5, max_output=len(expected) + 37, tile_size=32)
  assert int(np.sum(valid)) == len(expected)
  np.testing.assert_array_equal(_kept(indices, valid), expected)


def test_invalid_and_nan_are_never_kept_and_never_suppress():
  """A high-scoring invalid or NaN-scored box does not remove the box it overlaps."""
  boxes = np.array([[0, 0, 10, 10],      # invalid, best score, overlaps box 1
                    [1, 1, 11, 11],
                    [20, 20, 30, 30],    # NaN score, overlaps box 3
                    [21, 21, 31, 31],
                    [50, 50, 60, 60]],   # invalid and apart
                   np.float32)
  scores = np.array([0.99, 0.5, np.nan, 0.4, 0.9], np.float32)
  valid = np.array([False, True, True, True, False])
  np.testing.assert_array_equal(_kept(*nms(boxes, scores, 0.5, 5, valid=valid)), [1, 3])
  # Without the mask only the NaN rule applies: box 0 now suppresses box 1.
  np.testing.assert_array_equal(_kept(*nms(boxes, scores, 0.5, 5)), [0, 4, 3])


def test_invalid_and_nan_match_reference(rng):
  """Random invalid boxes and NaN scores, over several tiles, against the reference."""
  boxes, scores = _overlapping_problem(rng, 300)
  valid = rng.uniform(size=300) > 0.3
  scores[rng.choice(300, 40, replace=False)] = np.nan
  expected = _greedy_reference(boxes, scores, 0.5, valid=valid)
  got = _kept(*nms(boxes, scores, 0.5, 300, valid=valid, tile_size=64))
  np.testing.assert_array_equal(got, expected)
  assert valid[got].all() and not np.isnan(scores[got]).any()


def test_batched_nms_matches_per_class_reference(rng):
  """Boxes only suppress boxes of their own class; the union is ordered by score."""
  boxes, scores = _overlapping_problem(rng, 400)
  classes = rng.integers(0, 4, 400).astype(np.int32)
  expected = _greedy_reference(boxes, scores, 0.5, classes=classes)
  # The same set, built class by class with class-blind greedy NMS.
  per_class = np.concatenate([np.flatnonzero(classes == k)[
      _greedy_reference(boxes[classes == k], scores[classes == k], 0.5)] for k in range(4)])
  np.testing.assert_array_equal(per_class[np.argsort(-scores[per_class], kind="stable")], expected)
  for tile_size in (64, 256):
    got = _kept(*batched_nms(boxes, scores, classes, 0.5, 400, tile_size=tile_size))
    np.testing.assert_array_equal(got, expected, err_msg=f"tile_size={tile_size}")
  # Class-aware NMS keeps more than class-blind NMS on the same boxes.
  assert len(expected) > len(_greedy_reference(boxes, scores, 0.5))


@pytest.mark.parity
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_batched_nms_matches_torchvision(torch, torchvision, rng, iou_threshold):
  """Same kept indices, in the same order, as torchvision.ops.batched_nms."""
  boxes, scores = _overlapping_problem(rng, 1500)
  classes = rng.integers(0, 5, 1500).astype(np.int32)
  expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                         torch.from_numpy(classes.astype(np.int64)),
                                         iou_threshold).numpy()
  got = _kept(*batched_nms(boxes, scores, classes, iou_threshold, 1500))
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parity
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(torch, torchvision, rng, iou_threshold):
  """N=2000 heavily overlapping boxes: same kept set and order as torchvision.ops.nms."""
  boxes, scores = _overlapping_problem(rng, 2000)
  expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                 iou_threshold).numpy()
  assert 256 < len(expected) < 2000
  got = _kept(*nms(boxes, scores, iou_threshold, 2000))
  np.testing.assert_array_equal(got, expected)


def test_large_input_under_jit(rng):
  """N=3000 compiles and gives a valid NMS result: distinct boxes, by score, no overlap."""
  boxes, scores = _overlapping_problem(rng, 3000)
  fn = jax.jit(functools.partial(nms, iou_threshold=0.5, max_output=400))
  indices, valid = fn(jnp.asarray(boxes), jnp.asarray(scores))
  assert indices.shape == valid.shape == (400,)
  kept = _kept(indices, valid)
  assert len(kept) == 400  # far more than 400 survive NMS here
  assert len(set(kept.tolist())) == len(kept) and kept.max() < 3000
  assert (np.diff(scores[kept]) < 0).all()
  assert kept[0] == np.argmax(scores)
  for i in range(1, len(kept)):
    assert (references.iou(boxes[kept[i]], boxes[kept[:i]], np.float32)[0] <= 0.5).all(), i


@pytest.mark.parametrize("with_classes", [False, True])
def test_jit_output_shapes_and_dtypes(rng, with_classes):
  """Under jit the outputs are [max_output] int32 indices and a bool mask."""
  boxes, scores = _overlapping_problem(rng, 50)
  if with_classes:
    fn = jax.jit(functools.partial(batched_nms, iou_threshold=0.5, max_output=30, tile_size=16))
    indices, valid = fn(boxes, scores, rng.integers(0, 3, 50).astype(np.int32),
                        valid=np.ones(50, bool))
  else:
    fn = jax.jit(functools.partial(nms, iou_threshold=0.5, max_output=30, tile_size=16))
    indices, valid = fn(boxes, scores, valid=np.ones(50, bool))
  assert indices.shape == (30,) and indices.dtype == jnp.int32
  assert valid.shape == (30,) and valid.dtype == jnp.bool_


def test_empty_input():
  """No boxes: every slot invalid."""
  indices, valid = nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 4)
  np.testing.assert_array_equal(indices, [0, 0, 0, 0])
  np.testing.assert_array_equal(valid, [False] * 4)


def test_shape_errors_name_the_argument():
  """A wrong shape fails at trace time with a message naming the argument."""
  boxes, scores = np.zeros((5, 4), np.float32), np.zeros((5,), np.float32)
  with pytest.raises(ValueError, match="boxes"):
    nms(np.zeros((5, 3), np.float32), scores, 0.5, 3)
  with pytest.raises(ValueError, match="scores"):
    nms(boxes, np.zeros((6,), np.float32), 0.5, 3)
  with pytest.raises(ValueError, match="scores"):
    nms(boxes, np.zeros((5, 1), np.float32), 0.5, 3)
  with pytest.raises(ValueError, match="valid"):
    nms(boxes, scores, 0.5, 3, valid=np.ones((4,), bool))
  with pytest.raises(ValueError, match="classes"):
    batched_nms(boxes, scores, np.zeros((4,), np.int32), 0.5, 3)
