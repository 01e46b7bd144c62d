"""Tests for ops/proposals.py: RPN outputs -> a fixed number of proposals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops.proposals import generate_proposals


# The random-input tests call the op through jit: one compile instead of one
from tests import references
# per primitive keeps them fast on a small CPU.
_jit_proposals = jax.jit(generate_proposals, static_argnames=(
    "pre_nms_topk", "post_nms_topk", "nms_threshold", "min_size", "weights"))


# ----------------------------------------------------------------------------
# Independent NumPy reference.


def _np_proposals(objectness, deltas, anchors, image_size, pre_nms_topk, post_nms_topk,
                  nms_threshold=0.7, min_size=0.0):
  """Loops over levels: top-k, decode, clip, drop small, NMS; then merge by score."""
  height, width = image_size
  all_boxes, all_scores = [], []
  for logits, d, a in zip(objectness, deltas, anchors):
    top = np.argsort(-logits, kind="stable")[:pre_nms_topk]
    boxes = references.decode(d[top], a[top], (1.0, 1.0, 1.0, 1.0))
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    scores = logits[top].astype(np.float64)
    big = np.all(boxes[:, 2:] - boxes[:, :2] > min_size, axis=1)
    boxes, scores = boxes[big], scores[big]
    keep = references.greedy_nms(boxes, scores, nms_threshold)
    all_boxes.append(boxes[keep])
    all_scores.append(scores[keep])
  boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
  order = np.argsort(-scores, kind="stable")[:post_nms_topk]
  return boxes[order], scores[order]


def _random_rpn_outputs(rng, canvas=(64, 64), strides=(8, 16, 32), sizes=((16,), (32,), (64,))):
  """Three levels of anchors (192 + 48 + 12) with random logits and deltas."""
  anchors = anchor_ops.multilevel_anchors(canvas, strides, sizes)
  objectness = [rng.normal(size=len(a)).astype(np.float32) for a in anchors]
  deltas = [(0.3 * rng.normal(size=(len(a), 4))).astype(np.float32) for a in anchors]
  return objectness, deltas, anchors


# ----------------------------------------------------------------------------
# Hand-computed case.


def _hand_case():
  """Two levels; the expected output is worked out in test_hand_case."""
  level0_anchors = np.array([
      [0, 0, 20, 20],    # a0, logit 3.0: best box
      [1, 1, 21, 21],    # a1, logit 2.0: IoU(a0) = 19^2 / (2 * 20^2 - 19^2) = 0.82 > 0.7
      [70, 10, 80, 20],  # a2, logit 1.5: clipped to x in [55, 55], width 0 -> dropped
      [30, 30, 50, 50],  # a3, logit 1.0, dx = 0.5: shifted by 10 px, then clipped
      [5, 30, 15, 40],   # a4, logit 0.2: 5th of level 0, beyond pre_nms_topk = 4
  ], np.float32)
  level0_logits = np.array([3.0, 2.0, 1.5, 1.0, 0.2], np.float32)
  level0_deltas = np.zeros((5, 4), np.float32)
  level0_deltas[3, 0] = 0.5
  level1_anchors = np.array([
      [0, 0, 20, 20],  # b0, logit 2.5: same box as a0, but NMS is per level
      [0, 0, 40, 40],  # b1, logit -1.0: IoU(b0) = 400 / 1600 = 0.25
  ], np.float32)
  level1_logits = np.array([2.5, -1.0], np.float32)
  level1_deltas = np.zeros((2, 4), np.float32)
  return ([level0_logits, level1_logits], [level0_deltas, level1_deltas],
          [level0_anchors, level1_anchors])


def test_hand_case():
  """Per-level top-k, decode, clip, tiny-box drop, per-level NMS and padding, by hand."""
  objectness, deltas, anchors = _hand_case()
  # Canvas 64x64; the image inside it is 48 high and 55 wide.
  boxes, scores, valid = generate_proposals(objectness, deltas, anchors, image_size=(48, 55),
                                            pre_nms_topk=4, post_nms_topk=6)
  # a3 decoded: centre x 40 + 0.5 * 20 = 50 -> [40, 30, 60, 50]; clipped to
  # width 55 and height 48 -> [40, 30, 55, 48].
  np.testing.assert_allclose(boxes, [
      [0, 0, 20, 20],   # a0 (3.0)
      [0, 0, 20, 20],   # b0 (2.5): not suppressed by a0, another level
      [40, 30, 55, 48],  # a3 (1.0)
      [0, 0, 40, 40],   # b1 (-1.0)
      [0, 0, 0, 0],     # padding: only 4 survivors for 6 slots
      [0, 0, 0, 0],
  ], atol=1e-5)
  np.testing.assert_allclose(scores[:4], [3.0, 2.5, 1.0, -1.0])
  assert np.all(np.isneginf(scores[4:]))
  np.testing.assert_array_equal(valid, [True] * 4 + [False] * 2)

  # post_nms_topk below the number of survivors keeps the best ones only.
  boxes, scores, valid = generate_proposals(objectness, deltas, anchors, image_size=(48, 55),
                                            pre_nms_topk=4, post_nms_topk=2)
  np.testing.assert_allclose(boxes, [[0, 0, 20, 20], [0, 0, 20, 20]])
  np.testing.assert_allclose(scores, [3.0, 2.5])
  assert valid.all()


def test_min_size_drops_small_boxes():
  """A box whose side is not above min_size is dropped, a larger one kept."""
  anchors = [np.array([[0, 0, 2, 10], [20, 20, 30, 30]], np.float32)]  # widths 2 and 10
  objectness = [np.array([1.0, 0.0], np.float32)]
  deltas = [np.zeros((2, 4), np.float32)]
  boxes, scores, valid = generate_proposals(objectness, deltas, anchors, (64, 64),
                                            pre_nms_topk=2, post_nms_topk=2, min_size=2.0)
  np.testing.assert_allclose(boxes, [[20, 20, 30, 30], [0, 0, 0, 0]])
  np.testing.assert_array_equal(valid, [True, False])
  boxes, _, valid = generate_proposals(objectness, deltas, anchors, (64, 64),
                                       pre_nms_topk=2, post_nms_topk=2, min_size=1.9)
  np.testing.assert_array_equal(valid, [True, True])


# ----------------------------------------------------------------------------
# References on random inputs.


@pytest.mark.parametrize("pre_nms_topk, post_nms_topk", [(50, 40), (30, 200)])
def test_matches_numpy_reference(rng, pre_nms_topk, post_nms_topk):
  """Same boxes and scores, in the same order, as the NumPy loop reference.

  (30, 200): fewer survivors than slots, so the tail is padding.
  """
  objectness, deltas, anchors = _random_rpn_outputs(rng)
  image_size = (52, 44)
  boxes, scores, valid = _jit_proposals(objectness, deltas, anchors, image_size,
                                        pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk)
  ref_boxes, ref_scores = _np_proposals(objectness, deltas, anchors, image_size,
                                        pre_nms_topk, post_nms_topk)
  n = len(ref_scores)
  assert 10 < n  # NMS and the image clip both did something, but left plenty
  assert valid.sum() == n
  assert valid[:n].all()
  np.testing.assert_allclose(boxes[:n], ref_boxes, atol=2e-5)
  np.testing.assert_allclose(scores[:n], ref_scores, atol=1e-6)
  np.testing.assert_array_equal(boxes[n:], 0.0)
  assert np.all(np.isneginf(scores[n:]))
  # Everything lies inside the image, not just the canvas.
  assert np.all(boxes[:n, 2] <= image_size[1]) and np.all(boxes[:n, 3] <= image_size[0])
  if post_nms_topk == 200:
    assert n < post_nms_topk
  else:
    assert n == post_nms_topk


@pytest.mark.parity
def test_matches_torchvision(rng, torch, torchvision):
  """Same kept boxes in the same order as torchvision's RPN.filter_proposals.

  torchvision decodes every anchor first (done here with its BoxCoder),
  applies a sigmoid (monotone, so the same order), drops sides < 1e-3 and
  runs one NMS batched over levels.
  """
  from torchvision.models.detection.rpn import RegionProposalNetwork

  pre_nms_topk, post_nms_topk = 50, 100
  objectness, deltas, anchors = _random_rpn_outputs(rng)
  image_size = (52, 44)
  boxes, scores, valid = _jit_proposals(objectness, deltas, anchors, image_size,
                                        pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk,
                                        min_size=1e-3)

  rpn = RegionProposalNetwork(
      None, None, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
      positive_fraction=0.5, pre_nms_top_n=dict(training=pre_nms_topk, testing=pre_nms_topk),
      post_nms_top_n=dict(training=post_nms_topk, testing=post_nms_topk), nms_thresh=0.7,
      score_thresh=0.0).eval()
  t_anchors = torch.from_numpy(np.concatenate(anchors))
  t_deltas = torch.from_numpy(np.concatenate(deltas))
  t_logits = torch.from_numpy(np.concatenate(objectness))
  proposals = rpn.box_coder.decode(t_deltas, [t_anchors]).view(1, -1, 4)
  ref_boxes, ref_scores = rpn.filter_proposals(proposals, t_logits[None], [image_size],
                                               [len(a) for a in anchors])
  ref_boxes, ref_scores = ref_boxes[0].numpy(), ref_scores[0].numpy()

  n = len(ref_boxes)
  assert 10 < n < post_nms_topk
  np.testing.assert_array_equal(valid, np.arange(post_nms_topk) < n)
  np.testing.assert_allclose(boxes[:n], ref_boxes, atol=2e-5)
  np.testing.assert_allclose(jax.nn.sigmoid(scores[:n]), ref_scores, atol=1e-6)


# ----------------------------------------------------------------------------
# jit, vmap, shape errors.


def test_jit_with_traced_image_size(rng):
  """Under jit (image size traced) the output has static shapes and the reference values."""
  objectness, deltas, anchors = _random_rpn_outputs(rng)

  @jax.jit
  def run(objectness, deltas, image_size):
    return generate_proposals(objectness, deltas, anchors, (image_size[0], image_size[1]),
                              pre_nms_topk=50, post_nms_topk=40)

  for size in [(52, 44), (30, 30)]:  # a different size reuses the program
    boxes, scores, valid = run(objectness, deltas, jnp.array(size, jnp.float32))
    assert boxes.shape == (40, 4) and boxes.dtype == jnp.float32
    assert scores.shape == (40,) and scores.dtype == jnp.float32
    assert valid.shape == (40,) and valid.dtype == jnp.bool_
    ref_boxes, ref_scores = _np_proposals(objectness, deltas, anchors, size, 50, 40)
    n = len(ref_scores)
    np.testing.assert_array_equal(valid, np.arange(40) < n)
    np.testing.assert_allclose(boxes[:n], ref_boxes, atol=2e-5)
    np.testing.assert_allclose(scores[:n], ref_scores, atol=1e-6)
  assert run._cache_size() == 1


def test_vmap_over_images(rng):
  """vmap over two images (own logits, deltas, sizes) equals two single calls."""
  outputs = [_random_rpn_outputs(rng) for _ in range(2)]
  anchors = outputs[0][2]
  sizes = np.array([[52.0, 44.0], [64.0, 30.0]], np.float32)
  objectness = [np.stack([o[0][l] for o in outputs]) for l in range(3)]
  deltas = [np.stack([o[1][l] for o in outputs]) for l in range(3)]

  def one(objectness, deltas, size):
    return generate_proposals(objectness, deltas, anchors, (size[0], size[1]), 30, 50)

  batched = jax.jit(jax.vmap(one))(objectness, deltas, sizes)
  assert batched[0].shape == (2, 50, 4) and batched[2].shape == (2, 50)
  for b in range(2):
    single = jax.jit(one)([o[b] for o in objectness], [d[b] for d in deltas], sizes[b])
    for got, want in zip(batched, single):
      np.testing.assert_allclose(got[b], want, atol=1e-5)
  assert not np.allclose(batched[0][0], batched[0][1])  # the images really differ


def test_shape_errors_name_the_argument():
  """Wrong shapes fail at trace time with the argument's name."""
  objectness, deltas, anchors = _hand_case()
  args = dict(image_size=(64, 64), pre_nms_topk=4, post_nms_topk=4)
  with pytest.raises(ValueError, match=r"deltas\[1\]"):
    generate_proposals(objectness, [deltas[0], deltas[1][:-1]], anchors, **args)
  with pytest.raises(ValueError, match=r"anchors\[0\]"):
    generate_proposals(objectness, deltas, [anchors[0][:, :3], anchors[1]], **args)
  with pytest.raises(ValueError, match=r"objectness\[0\]"):
    generate_proposals([objectness[0][:, None], objectness[1]], deltas, anchors, **args)
  with pytest.raises(ValueError, match="objectness, deltas, anchors"):
    generate_proposals(objectness[:1], deltas, anchors, **args)
