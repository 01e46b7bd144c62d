"""Tests for mrcnn_jax.ops.boxes: areas, IoU/IoA, the box coder, clipping, formats."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import boxes as box_ops
from tests import references
from tests.conftest import random_boxes



def _random_deltas(rng, n, big=False):
  d = rng.normal(size=(n, 4)) * np.array([1.0, 1.0, 0.5, 0.5])
  if big:  # dw, dh far past the clamp, both signs
    d[:, 2:] = rng.uniform(-8, 20, size=(n, 2))
  return d.astype(np.float32)


# ---------------------------------------------------------------------------
# Hand-computed cases.

def test_area_hand_computed():
  """Area is w * h with no +1; an inverted box has area 0, not a negative one."""
  b = jnp.array([[0, 0, 2, 3], [1, 1, 1, 5], [2, 2, 1, 1]], jnp.float32)
  np.testing.assert_array_equal(box_ops.area(b), [6.0, 0.0, 0.0])


def test_iou_hand_computed():
  """IoU of a known table of boxes (overlap, identity, disjoint, touching corners)."""
  a = jnp.array([[0, 0, 2, 2], [0, 0, 1, 1]], jnp.float32)
  b = jnp.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], jnp.float32)
  # [0,0,2,2] vs [1,1,3,3]: inter 1x1 = 1, union 4 + 4 - 1 = 7 -> 1/7.
  # [0,0,1,1] vs [1,1,3,3]: they touch at a corner only -> 0.
  # [0,0,1,1] vs [0,0,2,2]: inter 1, union 4 -> 1/4.
  expected = [[1 / 7, 1.0, 0.0],
              [0.0, 0.25, 0.0]]
  np.testing.assert_allclose(box_ops.pairwise_iou(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(box_ops.intersection(a, b), [[1, 4, 0], [0, 1, 0]])


def test_iou_of_degenerate_boxes_is_zero_not_nan():
  """Two empty boxes have an empty union; IoU must be 0 (a NaN would poison argmax)."""
  a = jnp.array([[3, 3, 3, 3], [0, 0, 0, 5]], jnp.float32)
  iou = box_ops.pairwise_iou(a, a)
  np.testing.assert_array_equal(iou, np.zeros((2, 2)))


def test_ioa_hand_computed():
  """IoA divides by the first box's area only (COCO's crowd overlap)."""
  a = jnp.array([[0, 0, 2, 2], [1, 1, 2, 2], [4, 4, 4, 9]], jnp.float32)
  b = jnp.array([[1, 1, 3, 3], [0, 0, 10, 10]], jnp.float32)
  # [0,0,2,2] in [1,1,3,3]: inter 1 over own area 4 -> 1/4; in [0,0,10,10]: 1.
  # [1,1,2,2] lies inside both -> 1, 1.  A zero-area box -> 0, not NaN.
  expected = [[0.25, 1.0], [1.0, 1.0], [0.0, 0.0]]
  np.testing.assert_allclose(box_ops.pairwise_ioa(a, b), expected, rtol=1e-6)


@pytest.mark.parametrize("weights, expected", [
    # anchor [0,0,10,10]: centre (5,5), 10x10; box [2,4,12,24]: centre (7,14), 10x20.
    # dx = (7-5)/10 = 0.2, dy = (14-5)/10 = 0.9, dw = log(10/10) = 0, dh = log(20/10).
    ((1.0, 1.0, 1.0, 1.0), [0.2, 0.9, 0.0, math.log(2)]),
    ((10.0, 10.0, 5.0, 5.0), [2.0, 9.0, 0.0, 5 * math.log(2)]),
])
def test_encode_decode_hand_computed(weights, expected):
  """Fast R-CNN parameterisation on a known anchor/box, both weightings, and back."""
  anchor = jnp.array([[0, 0, 10, 10]], jnp.float32)
  box = jnp.array([[2, 4, 12, 24]], jnp.float32)
  deltas = box_ops.encode(box, anchor, weights)
  np.testing.assert_allclose(deltas, [expected], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(box_ops.decode(deltas, anchor, weights), box, atol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_clamps_large_log_scale(weights):
  """dw, dh above log(1000/16) are clamped: a 16-px anchor grows to 1000 px at most."""
  anchor = jnp.array([[0, 0, 16, 16]], jnp.float32)
  # dw/ww = 10 and dh/wh = 100 both exceed log(62.5) ~ 4.135, so w = h = 16 * 62.5
  # = 1000 around the centre (8, 8): [8 - 500, 8 - 500, 8 + 500, 8 + 500].
  deltas = jnp.array([[0, 0, 10 * weights[2], 100 * weights[3]]], jnp.float32)
  np.testing.assert_allclose(box_ops.decode(deltas, anchor, weights),
                             [[-492, -492, 508, 508]], rtol=1e-5)
  # A very negative dw is not clamped: the box shrinks towards its centre.
  deltas = jnp.array([[0, 0, -50 * weights[2], 0]], jnp.float32)
  np.testing.assert_allclose(box_ops.decode(deltas, anchor, weights),
                             [[8, 0, 8, 16]], atol=1e-4)


def test_clip_to_image_hand_computed():
  """x clamps to [0, width], y to [0, height]; any leading shape is kept."""
  b = jnp.array([[[-5, -3, 120, 50], [10, 20, 30, 35]]], jnp.float32)  # (1, 2, 4)
  out = box_ops.clip_to_image(b, 40, 100)
  np.testing.assert_array_equal(out, [[[0, 0, 100, 40], [10, 20, 30, 35]]])


def test_scale_hand_computed():
  """Width and height times the factor about the centre; factor 1 is the input itself."""
  b = jnp.array([[[10, 20, 30, 60], [0, 0, 4, 2]]], jnp.float32)  # (1, 2, 4)
  np.testing.assert_array_equal(box_ops.scale(b, 1.5),
                                [[[5, 10, 35, 70], [-1, -0.5, 5, 2.5]]])
  np.testing.assert_array_equal(box_ops.scale(b, 0.5), [[[15, 30, 25, 50], [1, 0.5, 3, 1.5]]])
  assert box_ops.scale(b, 1.0) is b


def test_xywh_conversions_hand_computed():
  """[x1,y1,x2,y2] <-> COCO [x,y,w,h] on a known box, any leading shape, round trip."""
  xyxy = jnp.array([[[1, 2, 4, 8]]], jnp.float32)
  np.testing.assert_array_equal(box_ops.xyxy_to_xywh(xyxy), [[[1, 2, 3, 6]]])
  np.testing.assert_array_equal(box_ops.xywh_to_xyxy(jnp.array([[1, 2, 3, 6.0]])),
                                [[1, 2, 4, 8]])


# ---------------------------------------------------------------------------
# NumPy references on random inputs.

def test_iou_ioa_match_numpy_reference(rng):
  """pairwise_iou / pairwise_ioa against the loop reference on random (and some empty) boxes."""
  a = random_boxes(rng, 9)
  b = random_boxes(rng, 7)
  a[0] = [5, 5, 5, 9]  # zero-area: IoU/IoA must stay finite
  b[1] = a[2]  # an exact duplicate: IoU 1
  iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(iou, references.iou(a, b), rtol=1e-5, atol=1e-6)
  assert iou[2, 1] == pytest.approx(1.0)
  np.testing.assert_allclose(box_ops.pairwise_ioa(jnp.asarray(a), jnp.asarray(b)),
                             references.ioa(a, b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(box_ops.area(jnp.asarray(a)), references.area(a.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0),
                                     (2.0, 3.0, 4.0, 0.5)])  # distinct: catches swapped axes
def test_encode_decode_match_numpy_reference(rng, weights):
  """encode/decode against the loop reference; decode(encode(b)) recovers b."""
  anchors = random_boxes(rng, 16, min_size=4.0)
  boxes = random_boxes(rng, 16, min_size=4.0)
  deltas = np.asarray(box_ops.encode(jnp.asarray(boxes), jnp.asarray(anchors), weights))
  np.testing.assert_allclose(deltas, references.encode(boxes, anchors, weights), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(box_ops.decode(jnp.asarray(deltas), jnp.asarray(anchors), weights),
                             boxes, rtol=1e-5, atol=1e-3)
  d = _random_deltas(rng, 16, big=True)
  np.testing.assert_allclose(box_ops.decode(jnp.asarray(d), jnp.asarray(anchors), weights),
                             references.decode(d, anchors, weights), rtol=1e-5, atol=1e-3)


def test_clip_and_formats_match_numpy_reference(rng):
  """clip_to_image and the xywh conversions against np.clip / direct arithmetic."""
  b = random_boxes(rng, 12, canvas=120.0) - 10.0
  out = np.asarray(box_ops.clip_to_image(jnp.asarray(b), 70.0, 90.0))
  np.testing.assert_array_equal(out[:, 0::2], np.clip(b[:, 0::2], 0, 90))
  np.testing.assert_array_equal(out[:, 1::2], np.clip(b[:, 1::2], 0, 70))
  xywh = np.asarray(box_ops.xyxy_to_xywh(jnp.asarray(b)))
  np.testing.assert_allclose(xywh, np.c_[b[:, :2], b[:, 2:] - b[:, :2]], rtol=1e-6)
  np.testing.assert_allclose(box_ops.xywh_to_xyxy(jnp.asarray(xywh)), b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# jit: shapes and dtypes.

def test_ops_under_jit_shapes_and_dtypes(rng):
  """Every box op traces under jit (clip with traced image size) with the documented shapes."""
  a, b = jnp.asarray(random_boxes(rng, 5)), jnp.asarray(random_boxes(rng, 3))
  anchors = jnp.asarray(random_boxes(rng, 3))

  @jax.jit
  def f(a, b, anchors, h, w):
    deltas = box_ops.encode(b, anchors, box_ops.BOX_HEAD_WEIGHTS)
    decoded = box_ops.decode(deltas, anchors, box_ops.BOX_HEAD_WEIGHTS)
    return dict(area=box_ops.area(a), inter=box_ops.intersection(a, b),
                iou=box_ops.pairwise_iou(a, b), ioa=box_ops.pairwise_ioa(a, b),
                deltas=deltas, decoded=decoded,
                clipped=box_ops.clip_to_image(decoded, h, w),
                xywh=box_ops.xyxy_to_xywh(a), xyxy=box_ops.xywh_to_xyxy(a))

  out = f(a, b, anchors, jnp.float32(50.0), jnp.float32(60.0))
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == dict(area=(5,), inter=(5, 3), iou=(5, 3), ioa=(5, 3), deltas=(3, 4),
                        decoded=(3, 4), clipped=(3, 4), xywh=(5, 4), xyxy=(5, 4))
  assert all(v.dtype == jnp.float32 for v in out.values())
  np.testing.assert_allclose(out["iou"], box_ops.pairwise_iou(a, b), rtol=1e-6)
  np.testing.assert_allclose(out["clipped"],
                             box_ops.clip_to_image(out["decoded"], 50.0, 60.0))


def test_decode_output_is_float32_for_bfloat16_deltas(rng):
  """Box decoding runs in float32 (DESIGN.md) even when the head computes in bfloat16."""
  anchors = jnp.asarray(random_boxes(rng, 4))
  deltas = jnp.asarray(_random_deltas(rng, 4)).astype(jnp.bfloat16)
  out = jax.jit(box_ops.decode)(deltas, anchors.astype(jnp.bfloat16))
  assert out.shape == (4, 4) and out.dtype == jnp.float32


# ---------------------------------------------------------------------------
# torchvision parity.

def test_iou_matches_torchvision(rng, torch, torchvision):
  """pairwise_iou against torchvision.ops.box_iou on random boxes."""
  a, b = random_boxes(rng, 20), random_boxes(rng, 13)
  b[:3] = a[:3]
  ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  ours = np.asarray(box_ops.pairwise_iou(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(rng, torch, weights):
  """encode/decode against torchvision's BoxCoder, including deltas past the log(1000/16) clamp."""
  from torchvision.models.detection._utils import BoxCoder
  coder = BoxCoder(weights)
  assert coder.bbox_xform_clip == pytest.approx(box_ops.BBOX_XFORM_CLIP)
  anchors = random_boxes(rng, 32, min_size=2.0)
  boxes = random_boxes(rng, 32, min_size=2.0)
  ref = coder.encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors)).numpy()
  ours = np.asarray(box_ops.encode(jnp.asarray(boxes), jnp.asarray(anchors), weights))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

  deltas = np.concatenate([_random_deltas(rng, 32), _random_deltas(rng, 32, big=True)])
  anchors = np.concatenate([anchors, anchors])
  deltas[:, :2] *= weights[0]
  deltas[:, 2:] *= weights[2]
  assert (deltas[:, 2:] / weights[2] > box_ops.BBOX_XFORM_CLIP).any()  # the clamp is exercised
  ref = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
  ours = np.asarray(box_ops.decode(jnp.asarray(deltas), jnp.asarray(anchors), weights))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------
# Shape errors name the argument.

@pytest.mark.parametrize("fn", [box_ops.pairwise_iou, box_ops.pairwise_ioa, box_ops.intersection])
def test_pairwise_ops_reject_bad_shapes(fn):
  """A non-[N, 4] argument fails at trace time with its own name in the message."""
  good, bad = jnp.zeros((3, 4)), jnp.zeros((3, 5))
  with pytest.raises(ValueError, match=r"^a: expected shape \[\?, 4\]"):
    fn(bad, good)
  with pytest.raises(ValueError, match=r"^b: .*rank 1"):
    fn(good, jnp.zeros((4,)))


def test_coder_rejects_bad_shapes():
  """encode/decode name boxes, deltas and anchors, including an N mismatch."""
  good = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="^boxes:"):
    box_ops.encode(jnp.zeros((3, 2)), good)
  with pytest.raises(ValueError, match=r"^anchors: .*axis 0 is 2, not 3"):
    box_ops.encode(good, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="^deltas:"):
    box_ops.decode(jnp.zeros((3, 4, 1)), good)
  with pytest.raises(ValueError, match="^anchors:"):
    box_ops.decode(good, jnp.zeros((3, 3)))


@pytest.mark.parametrize("fn", [
    box_ops.area, box_ops.xyxy_to_xywh, box_ops.xywh_to_xyxy,
    lambda b: box_ops.clip_to_image(b, 10, 10), lambda b: box_ops.scale(b, 2.0)])
def test_elementwise_ops_reject_bad_last_axis(fn):
  """A last axis other than 4 is an error, not a silently clamped index."""
  with pytest.raises(ValueError, match=r"^boxes: .*axis 1 is 3, not 4"):
    fn(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="^boxes:"):
    fn(jnp.zeros(()))
