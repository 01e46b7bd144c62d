"""Tests for mrcnn_jax.ops.anchors: cell anchors, tiling, and the torchvision layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import anchors as anchor_ops

C4_SIZES = ((32, 64, 128, 256, 512),)


def _np_multilevel_anchors(canvas, strides, sizes, ratios, round_corners=True):
  """Loop reference: level, then y, x, then ratio, then size (torchvision's order).

  The step between positions is canvas // grid per axis, as torchvision derives
  it from the image and feature-map shapes.
  """
  out = []
  for stride, level_sizes in zip(strides, sizes):
    hf, wf = (math.ceil(c / stride) for c in canvas)
    sy, sx = canvas[0] // hf, canvas[1] // wf
    level = []
    for y in range(hf):
      for x in range(wf):
        for r in ratios:
          for s in level_sizes:
            half_w, half_h = s / math.sqrt(r) / 2, s * math.sqrt(r) / 2
            corners = [-half_w, -half_h, half_w, half_h]
            if round_corners:
              corners = [float(np.round(c)) for c in corners]
            level.append([x * sx + corners[0], y * sy + corners[1],
                          x * sx + corners[2], y * sy + corners[3]])
    out.append(np.array(level, np.float32).reshape(-1, 4))
  return out


def test_cell_anchors_hand_computed():
  """Size 32, ratios h/w = 0.5, 1, 2, rounded as torchvision does.

  r = 0.5: w = 32 * sqrt(2) = 45.25, h = 32 / sqrt(2) = 22.63; halves 22.63,
  11.31 round to 23, 11. r = 1: 16, 16. r = 2 is r = 0.5 transposed.
  """
  cells = anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0))
  np.testing.assert_array_equal(cells, [[-23, -11, 23, 11],
                                        [-16, -16, 16, 16],
                                        [-11, -23, 11, 23]])
  raw = anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0), round_corners=False)
  np.testing.assert_allclose(raw[0], [-16 * math.sqrt(2), -8 * math.sqrt(2),
                                      16 * math.sqrt(2), 8 * math.sqrt(2)], rtol=1e-6)
  # Unrounded anchors keep area s**2 and aspect ratio h / w = r.
  w, h = raw[:, 2] - raw[:, 0], raw[:, 3] - raw[:, 1]
  np.testing.assert_allclose(w * h, 32 * 32, rtol=1e-5)
  np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=1e-5)


def test_cell_anchors_round_half_to_even():
  """Exact halves round to even as torch.round does: sizes 3 and 5 give halves 1.5 and 2.5 -> 2."""
  cells = anchor_ops.cell_anchors((3, 5), (1.0,))
  np.testing.assert_array_equal(cells, [[-2, -2, 2, 2], [-2, -2, 2, 2]])


def test_cell_anchors_order_is_ratio_major():
  """With several sizes, the aspect ratio is the outer loop: (r0,s0), (r0,s1), (r1,s0), ..."""
  cells = anchor_ops.cell_anchors((16, 32), (1.0, 4.0))
  # r = 4: w = s / 2, h = 2 s.
  np.testing.assert_array_equal(cells, [[-8, -8, 8, 8], [-16, -16, 16, 16],
                                        [-4, -16, 4, 16], [-8, -32, 8, 32]])
  assert anchor_ops.num_anchors_per_location((16, 32), (1.0, 4.0)) == 4
  assert anchor_ops.num_anchors_per_location(C4_SIZES[0]) == 15


def test_grid_anchors_hand_computed():
  """Positions are row-major (y outer) at multiples of the stride, cells innermost."""
  cells = np.array([[-1, -2, 1, 2], [-3, -3, 3, 3]], np.float32)
  # grid (Hf, Wf) = (2, 3), stride (sy, sx) = (10, 4): centres (0,0) (4,0) (8,0) (0,10) ...
  out = anchor_ops.grid_anchors((2, 3), (10, 4), cells)
  expected = []
  for cy in (0, 10):
    for cx in (0, 4, 8):
      expected += [[cx - 1, cy - 2, cx + 1, cy + 2], [cx - 3, cy - 3, cx + 3, cy + 3]]
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[:4], [[-1, -2, 1, 2], [-3, -3, 3, 3],
                                          [3, -2, 5, 2], [1, -3, 7, 3]])


def test_feature_grid_rounds_up():
  """Padded stride-2 convs give ceil(size / stride) positions."""
  assert anchor_ops.feature_grid((128, 128), 4) == (32, 32)
  assert anchor_ops.feature_grid((96, 160), 64) == (2, 3)
  assert anchor_ops.feature_grid((100, 30), 32) == (4, 1)


def test_multilevel_anchors_hand_computed_first_anchors():
  """FPN P2 on a 128 canvas: 32x32 positions x 3; the first ones sit at (0,0) and (4,0)."""
  levels = anchor_ops.multilevel_anchors((128, 128))
  assert [lvl.shape for lvl in levels] == [(32 * 32 * 3, 4), (16 * 16 * 3, 4), (8 * 8 * 3, 4),
                                           (4 * 4 * 3, 4), (2 * 2 * 3, 4)]
  np.testing.assert_array_equal(levels[0][:6], [[-23, -11, 23, 11], [-16, -16, 16, 16],
                                                [-11, -23, 11, 23], [-19, -11, 27, 11],
                                                [-12, -16, 20, 16], [-7, -23, 15, 23]])
  # Last P6 anchor: position (x, y) = (64, 64), size 512, ratio 2: halves 181, 362.
  np.testing.assert_array_equal(levels[4][-1], [64 - 181, 64 - 362, 64 + 181, 64 + 362])


def test_multilevel_anchors_non_divisible_canvas_uses_torchvision_step():
  """On 96x160, P6 has a 2x3 grid and torchvision's step canvas // grid = (48, 53), not 64."""
  p6 = anchor_ops.multilevel_anchors((96, 160))[4].reshape(2, 3, 3, 4)
  centres = (p6[..., :2] + p6[..., 2:]) / 2  # (2, 3, 3, 2), x then y
  np.testing.assert_array_equal(centres[0, :, 0, 0], [0, 53, 106])
  np.testing.assert_array_equal(centres[:, 0, 0, 1], [0, 48])


@pytest.mark.parametrize("canvas", [(128, 128), (96, 160), (100, 72)])
@pytest.mark.parametrize("round_corners", [True, False])
def test_multilevel_anchors_match_numpy_reference(canvas, round_corners):
  """FPN anchors on square and non-square canvases against the loop reference."""
  ours = anchor_ops.multilevel_anchors(canvas, round_corners=round_corners)
  ref = _np_multilevel_anchors(canvas, anchor_ops.FPN_STRIDES, anchor_ops.FPN_SIZES,
                               anchor_ops.ASPECT_RATIOS, round_corners)
  assert len(ours) == len(ref) == 5
  for o, r in zip(ours, ref):
    assert o.shape == r.shape and o.dtype == np.float32
    if round_corners:
      np.testing.assert_array_equal(o, r)
    else:
      np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-4)


def test_c4_single_level_matches_numpy_reference():
  """One stride-16 level with 5 sizes (the C4 RPN) against the loop reference."""
  ours = anchor_ops.multilevel_anchors((96, 160), strides=(16,), sizes=C4_SIZES)
  ref = _np_multilevel_anchors((96, 160), (16,), C4_SIZES, anchor_ops.ASPECT_RATIOS)
  assert len(ours) == 1 and ours[0].shape == (6 * 10 * 15, 4)
  np.testing.assert_array_equal(ours[0], ref[0])


def test_anchors_under_jit():
  """Anchors are trace-time constants: a jitted function using them has static shapes."""
  canvas = (96, 160)

  @jax.jit
  def f(scale):
    return jnp.concatenate(anchor_ops.multilevel_anchors(canvas), axis=0) * scale

  out = f(jnp.float32(1.0))
  n = 3 * sum(math.ceil(96 / s) * math.ceil(160 / s) for s in anchor_ops.FPN_STRIDES)
  assert out.shape == (n, 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, np.concatenate(anchor_ops.multilevel_anchors(canvas)))


def _torchvision_anchors(torch, canvas, strides, sizes):
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  gen = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
  images = ImageList(torch.zeros(1, 3, *canvas), [tuple(canvas)])
  # Feature maps of the backbone's sizes: ceil(canvas / stride) per axis.
  features = [torch.zeros(1, 1, *(math.ceil(c / s) for c in canvas)) for s in strides]
  return gen(images, features)[0].numpy(), gen.num_anchors_per_location()


@pytest.mark.parametrize("canvas", [(128, 128), (96, 160)])
def test_fpn_anchors_match_torchvision(torch, canvas):
  """Exact order and values against torchvision's AnchorGenerator (RPN weights import)."""
  ref, per_loc = _torchvision_anchors(torch, canvas, anchor_ops.FPN_STRIDES, anchor_ops.FPN_SIZES)
  ours = np.concatenate(anchor_ops.multilevel_anchors(canvas))
  assert ours.shape == ref.shape
  np.testing.assert_array_equal(ours, ref)
  assert per_loc == [anchor_ops.num_anchors_per_location(s) for s in anchor_ops.FPN_SIZES]


def test_cell_anchors_match_torchvision(torch):
  """Odd sizes and uncommon ratios (exact halves, more ratios) against generate_anchors."""
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  sizes, ratios = (1, 3, 5, 33, 45, 100), (0.25, 0.5, 1.0, 2.0, 3.0, 4.0)
  ref = AnchorGenerator().generate_anchors(list(sizes), list(ratios)).numpy()
  np.testing.assert_array_equal(anchor_ops.cell_anchors(sizes, ratios), ref)


def test_c4_anchors_match_torchvision(torch):
  """A single stride-16 level with 5 sizes x 3 ratios against torchvision."""
  canvas = (96, 160)
  ref, per_loc = _torchvision_anchors(torch, canvas, (16,), C4_SIZES)
  ours = anchor_ops.multilevel_anchors(canvas, strides=(16,), sizes=C4_SIZES)
  assert len(ours) == 1 and ours[0].shape == ref.shape == (6 * 10 * 15, 4)
  np.testing.assert_array_equal(ours[0], ref)
  assert per_loc == [15]


def test_bad_arguments_name_themselves():
  """A sizes/strides count mismatch or non-[A, 4] cells fail with the argument's name."""
  with pytest.raises(ValueError, match="^sizes:"):
    anchor_ops.multilevel_anchors((128, 128), strides=(4, 8), sizes=((32,),))
  with pytest.raises(ValueError, match=r"^cells: .*axis 1 is 1, not 4"):
    anchor_ops.grid_anchors((2, 2), (4, 4), np.zeros((3, 1), np.float32))
