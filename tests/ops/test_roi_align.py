"""Tests for mrcnn_jax.ops.roi_align: hand cases, a NumPy loop reference, torchvision."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mrcnn_jax.ops.roi_align import (CPU_CHUNK_BYTES, assign_levels, multilevel_roi_align,
                                     multilevel_roi_align_batch, roi_align, roi_align_packed)
from tests.conftest import random_boxes


def _bilinear_reference(f, y, x):
  """torchvision's bilinear_interpolate (CPU kernel), for one sample of ``f [H, W, C]``."""
  height, width = f.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(f.shape[2])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * f[y_low, x_low] + hy * lx * f[y_low, x_high]
          + ly * hx * f[y_high, x_low] + ly * lx * f[y_high, x_high])


def _roi_align_reference(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
  """torchvision's CPU roi_align, loop for loop, in float64 on ``[H, W, C]``."""
  features = np.asarray(features, np.float64)
  sh, sw = output_size
  g = sampling_ratio
  out = np.zeros((len(boxes), sh, sw, features.shape[2]))
  offset = 0.5 if aligned else 0.0
  for r, box in enumerate(np.asarray(boxes, np.float64)):
    x1, y1, x2, y2 = box * spatial_scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # malformed RoIs are forced to 1x1
      roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / sh, roi_w / sw
    # sampling_ratio 0: torchvision's adaptive grid, ceil(roi_size / pooled_size).
    gy = g if g > 0 else int(np.ceil(roi_h / sh))
    gx = g if g > 0 else int(np.ceil(roi_w / sw))
    for ph, pw in itertools.product(range(sh), range(sw)):
      for iy, ix in itertools.product(range(gy), range(gx)):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gy
        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gx
        out[r, ph, pw] += _bilinear_reference(features, y, x)
      out[r, ph, pw] /= max(gy * gx, 1)
  return out


def _linear_features(height, width, channels):
  """``f[y, x, c] = x + 10 y + 100 c``: bilinear reads are exact inside the map."""
  y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing="ij")
  return (x + 10 * y + 100 * c).astype(np.float32)


# RoIs in map pixels (divided by the spatial scale before use) covering the
# corner cases of the kernel: inside, across each border, within a pixel of
# the border (clamped reads), wholly outside (all zeros), degenerate, inverted.
_MAP_SIZE = (12, 10)  # (H, W)
_SPECIAL_MAP_BOXES = np.array([
    [-2.7, -1.3, 3.1, 4.2],      # across the top-left corner
    [7.3, 9.6, 11.8, 14.1],      # across the bottom-right corner
    [8.4, 10.6, 10.7, 12.9],     # straddles the last row/column and the +1 margin
    [-0.8, 3.3, 2.6, 6.9],       # starts within one pixel left of the map
    [13.2, 15.1, 18.4, 19.7],    # wholly outside, below right
    [-6.3, -5.2, -2.1, -1.6],    # wholly outside, above left
    [4.3, 5.2, 4.3, 5.2],        # a point
    [2.2, 3.3, 2.2, 8.1],        # zero width
    [6.1, 4.4, 3.2, 7.7],        # inverted in x
], np.float32)


def _grid_boxes(rng, spatial_scale):
  """Random and special RoIs, in image coordinates for ``spatial_scale``."""
  inside = random_boxes(rng, 6, canvas=8.0, min_size=0.3, max_size=6.0)
  return (np.concatenate([inside, _SPECIAL_MAP_BOXES]) / spatial_scale).astype(np.float32)


def test_hand_computed_bins():
  """Bin means written out by hand for a linear map, aligned and not, at scale 1 and 1/2."""
  f = _linear_features(6, 8, 2)
  c = np.array([0.0, 100.0])
  # aligned=False, box [1, 1, 3, 5], 2x2 bins of 1 (x) by 2 (y), 2x2 samples:
  # x samples 1.25 1.75 | 2.25 2.75, y samples 1.5 2.5 | 3.5 4.5.
  expected = np.array([[21.5, 22.5], [41.5, 42.5]])[..., None] + c
  box = np.array([[1, 1, 3, 5]], np.float32)
  np.testing.assert_allclose(roi_align(f, box, 2, 1.0, 2, aligned=False)[0], expected, atol=1e-5)
  np.testing.assert_allclose(roi_align(f, 2 * box, 2, 0.5, 2, aligned=False)[0], expected,
                             atol=1e-5)
  # aligned=True shifts the box by -0.5: x samples 0.75 1.25 | 1.75 2.25,
  # y samples 1 2 | 3 4.
  expected = np.array([[16.0, 17.0], [36.0, 37.0]])[..., None] + c
  np.testing.assert_allclose(roi_align(f, box, 2, 1.0, 2, aligned=True)[0], expected, atol=1e-5)
  np.testing.assert_allclose(roi_align(f, 2 * box, 2, 0.5, 2, aligned=True)[0], expected,
                             atol=1e-5)


def test_hand_computed_border_reads():
  """One sample per bin at x = 6, 8, 10 on a map of width 8: read, clamped to x=7, zero."""
  f = _linear_features(6, 8, 2)
  boxes = np.array([[5, 2, 11, 4],        # y = 3
                    [5, -1.4, 11, -0.4],  # y = -0.9: clamped to row 0
                    [5, -2.4, 11, -1.4],  # y = -1.9: more than a pixel out, zero
                    [5, 5.3, 11, 6.1]],   # y = 5.8: between the last row and the edge
                   np.float32)
  got = roi_align(f, boxes, (1, 3), 1.0, 1, aligned=False)
  channel0 = np.array([[36, 37, 0], [6, 7, 0], [0, 0, 0], [56, 57, 0]], np.float64)
  reads = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0]], np.float64)
  expected = np.stack([channel0, channel0 + 100 * reads], axis=-1)[:, None]  # (4, 1, 3, 2)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_hand_computed_degenerate_box():
  """A point RoI: aligned=False stretches it to 1x1, aligned=True samples the point."""
  f = _linear_features(6, 8, 1)
  box = np.array([[2, 2, 2, 2]], np.float32)
  # aligned=False: a 1x1 RoI from (2, 2), one sample at its centre (2.5, 2.5).
  np.testing.assert_allclose(roi_align(f, box, 1, 1.0, 1, aligned=False), [[[[27.5]]]], atol=1e-5)
  # aligned=True: every sample at (1.5, 1.5).
  np.testing.assert_allclose(roi_align(f, box, 2, 1.0, 2, aligned=True),
                             np.full((1, 2, 2, 1), 16.5), atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
def test_matches_numpy_reference(rng, aligned, sampling_ratio, spatial_scale):
  """Every corner case of the kernel against the loop transcription, two output shapes."""
  features = rng.normal(size=_MAP_SIZE + (3,)).astype(np.float32)
  boxes = _grid_boxes(rng, spatial_scale)
  for output_size in ((2, 3), (4, 1)):
    expected = _roi_align_reference(features, boxes, output_size, spatial_scale,
                                    sampling_ratio, aligned)
    got = roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    assert got.shape == (len(boxes),) + output_size + (3,)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0,
                               err_msg=f"output_size={output_size}")
  # The wholly outside RoIs read nothing; the random and border-crossing ones do.
  assert (expected[10:12] == 0).all() and (np.abs(expected[:10]).sum(axis=(1, 2, 3)) > 0).all()


@pytest.mark.parity
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
def test_matches_torchvision(torch, torchvision, rng, aligned, sampling_ratio, spatial_scale):
  """Same numbers as torchvision.ops.roi_align (NCHW) on the same grid of cases."""
  features = rng.normal(size=_MAP_SIZE + (3,)).astype(np.float32)
  boxes = _grid_boxes(rng, spatial_scale)
  for output_size in ((2, 3), (4, 1)):
    expected = torchvision.ops.roi_align(
        torch.from_numpy(features).permute(2, 0, 1)[None], [torch.from_numpy(boxes)],
        output_size, spatial_scale, sampling_ratio, aligned).permute(0, 2, 3, 1).numpy()
    got = roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0,
                               err_msg=f"output_size={output_size}")


def test_gradient_check():
  """Reverse-mode gradient w.r.t. the features agrees with finite differences."""
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(5, 6, 2)).astype(np.float32))
  boxes = np.array([[0.5, 1.2, 4.3, 3.9], [-0.7, 2.1, 6.4, 5.6], [3.1, 0.2, 3.4, 4.8]], np.float32)
  for aligned in (False, True):
    fn = lambda f: roi_align(f, boxes, (2, 3), 1.0, 2, aligned=aligned)
    check_grads(fn, (features,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.parity
@pytest.mark.parametrize("aligned", [False, True])
def test_gradient_matches_torch_autograd(torch, torchvision, rng, aligned):
  """d(sum(out * cotangent))/d features equals torch autograd's, border cases included."""
  features = rng.normal(size=_MAP_SIZE + (3,)).astype(np.float32)
  boxes = _grid_boxes(rng, 0.5)
  cotangent = rng.normal(size=(len(boxes), 3, 2, 3)).astype(np.float32)  # (R, Sh, Sw, C)
  out, vjp = jax.vjp(lambda f: roi_align(f, boxes, (3, 2), 0.5, 2, aligned), jnp.asarray(features))
  (grad,) = vjp(jnp.asarray(cotangent))

  f_torch = torch.from_numpy(features).permute(2, 0, 1)[None].clone().requires_grad_(True)
  out_torch = torchvision.ops.roi_align(f_torch, [torch.from_numpy(boxes)], (3, 2), 0.5, 2,
                                        aligned)
  (out_torch * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
  expected = f_torch.grad[0].permute(1, 2, 0).numpy()
  assert np.abs(expected).max() > 0
  np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=0)


def test_assign_levels_hand_cases():
  """FPN eq. 1 with 224 -> level 4, at and just below the powers of two, clamped to 2..5."""
  sizes = np.array([224, 112, 448, 223.9, 111.9, 1.0, 0.0, 1e5, 56, 55.9], np.float32)
  boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], axis=1) + 10
  boxes = np.concatenate([boxes, [[np.nan, 0, 10, 10],     # NaN -> min level
                                  [30, 30, 10, 10]]])      # inverted, area 0 -> min
  got = assign_levels(boxes.astype(np.float32), 2, 5)
  np.testing.assert_array_equal(got, [4, 3, 5, 3, 2, 2, 2, 5, 2, 2, 2, 2])
  assert got.dtype == jnp.int32
  # Other bounds: 56 is level 2 and 55.9 level 1 when level 1 exists.
  np.testing.assert_array_equal(assign_levels(boxes[8:10].astype(np.float32), 1, 6), [2, 1])
  # Rounding just under a power of two: torchvision's epsilon of 1e-6 inside
  # the floor puts these on the upper level (4 + log2 is 3.9999998 here).
  near = np.array([[0, 0, 224, 223.9999], [0, 0, 448, 447.9998]], np.float32)
  np.testing.assert_array_equal(assign_levels(near, 2, 5), [4, 5])
  # Non-square: sqrt(448 * 112) = 224.
  np.testing.assert_array_equal(assign_levels(np.array([[0, 0, 448, 112]], np.float32), 2, 5), [4])


def _pyramid(rng, canvas, channels, strides=(4, 8, 16, 32)):
  return [rng.normal(size=(canvas // s, canvas // s, channels)).astype(np.float32)
          for s in strides]


def _pyramid_boxes(rng, n, canvas):
  """Log-uniform sizes 8..900, aspect ratios 1/2..2, so levels 2 to 5 all occur."""
  centre = rng.uniform(0, canvas, size=(n, 2))
  size = np.exp(rng.uniform(np.log(8), np.log(900), size=(n, 1)))
  aspect = np.exp(rng.uniform(-np.log(2), np.log(2), size=(n, 1)))
  size = np.concatenate([size * np.sqrt(aspect), size / np.sqrt(aspect)], axis=1)
  return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)


@pytest.mark.parametrize("aligned", [False, True])
def test_multilevel_equals_per_level_roi_align(rng, aligned):
  """Each RoI's output is roi_align on its assigned level, with that level's scale."""
  strides = (4, 8, 16, 32)
  features = _pyramid(rng, 128, 3, strides)
  boxes = _pyramid_boxes(rng, 40, 128)
  levels = np.asarray(assign_levels(boxes, 2, 5))
  assert set(levels.tolist()) == {2, 3, 4, 5}
  got = multilevel_roi_align(features, boxes, strides, (3, 4), 2, aligned)
  assert got.shape == (40, 3, 4, 3)
  for level, f, stride in zip(range(2, 6), features, strides):
    expected = roi_align(f, boxes, (3, 4), 1.0 / stride, 2, aligned)
    np.testing.assert_allclose(got[levels == level], np.asarray(expected)[levels == level],
                               atol=1e-6, rtol=0, err_msg=f"level {level}")


@pytest.mark.parity
def test_multilevel_matches_torchvision(torch, torchvision, rng):
  """Equal to torchvision.ops.MultiScaleRoIAlign (strides 4..32, sampling 2, aligned=False)."""
  canvas = 256
  features = _pyramid(rng, canvas, 4)
  boxes = _pyramid_boxes(rng, 60, canvas)
  assert set(np.asarray(assign_levels(boxes, 2, 5)).tolist()) == {2, 3, 4, 5}
  pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], (7, 5), sampling_ratio=2)
  expected = pooler({name: torch.from_numpy(f).permute(2, 0, 1)[None]
                     for name, f in zip(["p2", "p3", "p4", "p5"], features)},
                    [torch.from_numpy(boxes)], [(canvas, canvas)]).permute(0, 2, 3, 1).numpy()
  got = multilevel_roi_align(features, boxes, (4, 8, 16, 32), (7, 5), 2, aligned=False)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_packed_maps_read_their_own_map(rng):
  """Two maps of different sizes in one table: each RoI equals roi_align on its own map."""
  a = rng.normal(size=(6, 7, 2)).astype(np.float32)
  b = rng.normal(size=(4, 9, 2)).astype(np.float32)
  table = np.concatenate([a.reshape(-1, 2), b.reshape(-1, 2)])
  boxes = np.array([[0.5, 0.3, 5.2, 4.4], [1.1, 0.7, 8.6, 3.9], [-0.4, 2.2, 3.3, 7.8]], np.float32)
  got = roi_align_packed(table, boxes, map_offset=np.array([0, 42, 0]),
                         map_height=np.array([6, 4, 6]), map_width=np.array([7, 9, 7]),
                         spatial_scale=np.array([1.0, 1.0, 0.5], np.float32),
                         output_size=2, sampling_ratio=2, aligned=True)
  np.testing.assert_allclose(got[0], roi_align(a, boxes[:1], 2, 1.0)[0], atol=1e-6)
  np.testing.assert_allclose(got[1], roi_align(b, boxes[1:2], 2, 1.0)[0], atol=1e-6)
  np.testing.assert_allclose(got[2], roi_align(a, boxes[2:], 2, 0.5)[0], atol=1e-6)


def test_batch_reads_each_images_own_maps(rng):
  """The batched pooler equals the per-image one on every image (one table for the batch)."""
  strides = (4, 8, 16, 32)
  images = [_pyramid(rng, 64, 3, strides) for _ in range(3)]
  boxes = np.stack([_pyramid_boxes(rng, 11, 64) for _ in range(3)])
  batched = [np.stack(level) for level in zip(*images)]
  got = multilevel_roi_align_batch(batched, boxes, strides, (3, 2), 2, True)
  assert got.shape == (3, 11, 3, 2, 3)
  for b in range(3):
    np.testing.assert_allclose(got[b], multilevel_roi_align(images[b], boxes[b], strides, (3, 2)),
                               atol=1e-6, rtol=0, err_msg=f"image {b}")
  single = multilevel_roi_align_batch([batched[1]], boxes, (8,), 2)  # a single map, as C4
  np.testing.assert_allclose(single[2], roi_align(images[2][1], boxes[2], 2, 1 / 8), atol=1e-6)


@pytest.mark.parametrize("rois_per_chunk", [1, 4, 5, 64])
def test_chunked_pooling_is_the_same(rng, rois_per_chunk):
  """Chunking the RoIs (lax.map, as on CPU) changes neither the output nor its gradient,
  including a last chunk padded with repeats (17 RoIs in chunks of 4 and 5)."""
  features = rng.normal(size=_MAP_SIZE + (3,)).astype(np.float32)
  boxes = np.concatenate([_grid_boxes(rng, 0.5), _grid_boxes(rng, 0.5)[:2]])
  assert len(boxes) == 17
  r = len(boxes)
  args = dict(map_offset=np.zeros(r, np.int32), map_height=np.full(r, 12, np.int32),
              map_width=np.full(r, 10, np.int32), spatial_scale=np.full(r, 0.5, np.float32),
              output_size=(3, 2), sampling_ratio=2)
  table = jnp.asarray(features.reshape(-1, 3))
  cotangent = jnp.asarray(rng.normal(size=(r, 3, 2, 3)), jnp.float32)

  def loss(t, chunk):
    return jnp.sum(roi_align_packed(t, boxes, rois_per_chunk=chunk, **args) * cotangent)

  expected = roi_align_packed(table, boxes, rois_per_chunk=0, **args)
  got = roi_align_packed(table, boxes, rois_per_chunk=rois_per_chunk, **args)
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
  np.testing.assert_allclose(got, roi_align(features, boxes, (3, 2), 0.5), atol=1e-6, rtol=0)
  np.testing.assert_allclose(jax.grad(loss)(table, rois_per_chunk), jax.grad(loss)(table, 0),
                             atol=1e-5, rtol=0)
  # bfloat16 maps: chunks read a float32 copy (roi_align_packed); outputs and gradients
  # differ from the unchunked ones by bfloat16 rounding only (one unit in the last place).
  half = table.astype(jnp.bfloat16)
  got = roi_align_packed(half, boxes, rois_per_chunk=rois_per_chunk, **args)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(roi_align_packed(
      half, boxes, rois_per_chunk=0, **args), np.float32), rtol=2 ** -7, atol=1e-6)
  want = np.asarray(jax.grad(loss)(half, 0), np.float32)
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(half, rois_per_chunk), np.float32), want,
                             atol=2e-2 * np.abs(want).max(), rtol=0)


def test_default_chunking_is_decided_by_the_platform_lowered_for(rng):
  """rois_per_chunk=None chunks (a loop) in the CPU program only; one program
  lowered for several platforms gets each one's form and the same numbers."""
  table = jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)
  boxes = jnp.asarray(random_boxes(rng, 40, canvas=6.0, max_size=3.0))
  args = dict(map_offset=jnp.zeros(40, jnp.int32), map_height=jnp.full(40, 8, jnp.int32),
              map_width=jnp.full(40, 8, jnp.int32), spatial_scale=jnp.ones(40),
              output_size=7, sampling_ratio=2)
  assert 40 > CPU_CHUNK_BYTES // (14 * 14 * 256 * 4)  # more RoIs than one chunk holds
  f = jax.jit(lambda t, b: roi_align_packed(t, b, **args))
  loops = lambda platforms: f.trace(table, boxes).lower(
      lowering_platforms=platforms).as_text().count("stablehlo.while")
  assert loops(("cpu",)) == 1 and loops(("cuda",)) == loops(("tpu",)) == 0
  assert loops(("cpu", "cuda", "tpu")) == 1
  exported = jax.export.export(f, platforms=("tpu", "cpu"))(table, boxes)
  np.testing.assert_allclose(exported.call(table, boxes),
                             roi_align_packed(table, boxes, rois_per_chunk=0, **args),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_features(rng):
  """bfloat16 features give a bfloat16 output within bfloat16 rounding of float32."""
  features = rng.normal(size=_MAP_SIZE + (4,)).astype(np.float32)
  boxes = _grid_boxes(rng, 1.0)
  expected = roi_align(features, boxes, (3, 2), 1.0, 2)
  got = roi_align(jnp.asarray(features, jnp.bfloat16), boxes, (3, 2), 1.0, 2)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2, rtol=2e-2)


def test_adaptive_sampling_hand_case():
  """sampling_ratio=0: a 2-wide, 3-tall bin takes 2 x 3 samples (ceil of its size)."""
  f = _linear_features(6, 8, 1)
  box = np.array([[1, 1, 3, 4]], np.float32)  # one bin, aligned=False
  # x samples 1.5 2.5, y samples 1.5 2.5 3.5: mean x 2, mean y 2.5 -> 2 + 25.
  got = roi_align(f, box, 1, 1.0, 0, aligned=False, max_sampling_ratio=4)
  np.testing.assert_allclose(got[0, 0, 0], [27.0], atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_sampling_matches_numpy_reference(rng, aligned):
  """sampling_ratio=0 equals torchvision's adaptive loop while counts stay within the maximum."""
  features = rng.normal(size=_MAP_SIZE + (3,)).astype(np.float32)
  boxes = _grid_boxes(rng, 1.0)
  got = roi_align(features, boxes, (3, 2), 1.0, 0, aligned, max_sampling_ratio=8)
  expected = _roi_align_reference(features, boxes, (3, 2), 1.0, 0, aligned)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_adaptive_sampling_above_the_maximum_takes_the_maximum(rng):
  """A RoI needing more samples than max_sampling_ratio gets exactly max_sampling_ratio."""
  features = rng.normal(size=(40, 40, 2)).astype(np.float32)
  box = np.array([[1.0, 2.0, 37.0, 33.0]], np.float32)  # ceil(36/2) = 18 > 4 samples
  got = roi_align(features, box, 2, 1.0, 0, max_sampling_ratio=4)
  np.testing.assert_allclose(got, roi_align(features, box, 2, 1.0, 4), atol=1e-5)
  assert np.abs(got - roi_align(features, box, 2, 1.0, 0, max_sampling_ratio=18)).max() > 1e-3


def test_adaptive_sampling_matches_torchvision(torch, torchvision, rng):
  """torchvision.ops.roi_align with sampling_ratio=0 on RoIs of many sizes."""
  features = rng.normal(size=(24, 20, 3)).astype(np.float32)
  boxes = np.concatenate([_grid_boxes(rng, 0.5), random_boxes(rng, 8, 40.0, 2.0, 38.0)])
  boxes = boxes.astype(np.float32)
  f_torch = torch.from_numpy(features).permute(2, 0, 1)[None]
  for aligned in (True, False):
    expected = torchvision.ops.roi_align(f_torch, [torch.from_numpy(boxes)], (7, 7), 0.5, 0,
                                         aligned).permute(0, 2, 3, 1).numpy()
    got = roi_align(features, boxes, 7, 0.5, 0, aligned, max_sampling_ratio=8)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_sampling_ratio_must_not_be_negative(rng):
  """A negative ratio, or adaptive with no samples, is refused naming sampling_ratio."""
  features = np.zeros((4, 4, 1), np.float32)
  boxes = np.array([[0, 0, 2, 2]], np.float32)
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align(features, boxes, 2, 1.0, -1)
  with pytest.raises(ValueError, match="sampling_ratio"):
    multilevel_roi_align([features], boxes, (4,), 2, sampling_ratio=0, max_sampling_ratio=0)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_extent_reads_as_the_smaller_map(rng, sampling_ratio):
  """An image in a larger canvas, with its extent given, pools as from its own map alone.

  The canvas holds other values past the extent (as a padded canvas's
  features do); RoIs across the extent's edge must clamp there, as
  torchvision's kernel clamps at the edge of the image's own map.
  """
  strides = (4, 8)
  small = [rng.normal(size=(2, 40 // s, 48 // s, 3)).astype(np.float32) for s in strides]
  big = [rng.normal(size=(2, 64 // s, 64 // s, 3)).astype(np.float32) for s in strides]
  for b, s in zip(big, small):
    b[:, :s.shape[1], :s.shape[2]] = s
  boxes = np.stack([random_boxes(rng, 12, 48.0, 1.0, 40.0) for _ in range(2)])
  boxes[:, :3] = [[30, 20, 47.9, 39.9], [44, 36, 48, 40], [0, 0, 48, 40]]  # at the edge
  boxes = boxes.astype(np.float32)
  pool = lambda maps, **kw: multilevel_roi_align_batch(
      maps, boxes, strides, 3, sampling_ratio, True, canonical_box_size=16.0, **kw)
  expected = pool(small)
  got = pool(big, image_extent=jnp.asarray([[40, 48], [40, 48]]))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert np.abs(pool(big) - expected).max() > 1e-3  # without the extent, the canvas shows


def test_shape_errors_name_the_argument():
  """Wrong shapes fail at trace time naming the argument."""
  features, boxes = np.zeros((4, 4, 1), np.float32), np.zeros((2, 4), np.float32)
  with pytest.raises(ValueError, match="features"):
    roi_align(np.zeros((4, 4), np.float32), boxes, 2)
  with pytest.raises(ValueError, match="boxes"):
    roi_align(features, np.zeros((2, 5), np.float32), 2)
  with pytest.raises(ValueError, match="strides"):
    multilevel_roi_align([features, features[::2, ::2]], boxes, (4,), 2)
  with pytest.raises(ValueError, match="strides"):
    multilevel_roi_align([features, features[::2, ::2]], boxes, (4, 16), 2)
  with pytest.raises(ValueError, match=r"features\[1\]"):
    multilevel_roi_align([features, np.zeros((2, 2, 3), np.float32)], boxes, (4, 8), 2)
  with pytest.raises(ValueError, match="map_height"):
    roi_align_packed(np.zeros((16, 1), np.float32), boxes, np.zeros(2, np.int32),
                     np.zeros(3, np.int32), np.zeros(2, np.int32), np.ones(2, np.float32), 2)


def test_jit_output_shapes(rng):
  """Every entry point compiles; outputs are [R, Sh, Sw, C] float32 and [R] int32."""
  features = _pyramid(rng, 64, 3)
  boxes = jnp.asarray(_pyramid_boxes(rng, 7, 64))
  out = jax.jit(functools.partial(roi_align, output_size=(3, 5), spatial_scale=0.25))(
      features[0], boxes)
  assert out.shape == (7, 3, 5, 3) and out.dtype == jnp.float32
  out = jax.jit(functools.partial(multilevel_roi_align, strides=(4, 8, 16, 32),
                                  output_size=(7, 7)))(features, boxes)
  assert out.shape == (7, 7, 7, 3) and out.dtype == jnp.float32
  levels = jax.jit(functools.partial(assign_levels, min_level=2, max_level=5))(boxes)
  assert levels.shape == (7,) and levels.dtype == jnp.int32
