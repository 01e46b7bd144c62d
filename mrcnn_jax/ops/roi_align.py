"""RoIAlign (Mask R-CNN, sec. 3): bilinear reads at unquantised sample points.

Semantics are torchvision.ops.roi_align's, point for point: each of the
``S x S`` bins of a RoI averages ``g x g`` regularly spaced samples; a sample
more than one pixel outside the map reads 0, one within a pixel of the border
is clamped to it. ``aligned=True`` shifts box coordinates by half a pixel so
that pixel centres sit at ``i + 0.5`` (detectron2's default and ours);
``aligned=False`` reproduces the original Mask R-CNN implementation, which
also stretches RoIs smaller than one pixel to one.

``sampling_ratio=0`` is the adaptive choice (detectron2's poolers):
``ceil(roi_size / S)`` samples per bin along each axis, per RoI. Its shape
would depend on the data, so a fixed grid of ``max_sampling_ratio`` samples
per bin and axis is laid and the samples past each RoI's own count get
weight 0: exact whenever the adaptive count is within the maximum; above it
(RoIs more than ``max_sampling_ratio * S`` cells long on their level) the
bin averages ``max_sampling_ratio`` evenly spaced samples instead. The cost
is that of a fixed ratio of ``max_sampling_ratio``.

``extent`` (per-RoI valid height and width of its map, default the map's
size) is where the map ends for the border rules: an image in a larger
static canvas reads its features as the references read their own, smaller
map (see modeling/padding.py).

Implementation: every map the RoIs may read is flattened into one table
``[sum(H_i * W_i), C]``; each RoI carries the offset, size and scale of its map,
and the four bilinear corners of every sample are read with one gather each.
This serves a single map, FPN levels (each RoI reads only its own level), a
whole batch (each RoI reads its own image's maps) and per-instance
ground-truth masks (each RoI reads its matched instance's mask).

On CPU the RoIs are pooled in chunks (``lax.map``) sized so that one chunk's
gathered samples stay in cache (about 1.5 MiB): XLA:CPU materialises each
gather's ``[R, Sh*g, Sw*g, C]`` result, and at once for all RoIs that
traffic, not the arithmetic, set the cost (chunking makes the pooling
forward + backward 3-4x faster: docs/experiments.md, "Measurements behind
the code"). On GPU/TPU one gather serves all RoIs.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.checks import check_shape

# FPN level assignment (Lin et al. 2017, eq. 1): a 224x224 RoI (the ImageNet
# input size) reads level 4.
CANONICAL_LEVEL = 4
CANONICAL_BOX_SIZE = 224

Size = Union[int, Tuple[int, int]]

# Bytes of gathered samples per chunk of RoIs on CPU (see the module docstring):
# the fastest for C = 64 (32 RoIs of 7x7x2x2 samples) and C = 256 (8).
CPU_CHUNK_BYTES = 1_600_000


def roi_align(features: jnp.ndarray, boxes: jnp.ndarray, output_size: Size,
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = True, max_sampling_ratio: int = 4) -> jnp.ndarray:
  """Pools ``boxes [R, 4]`` (image coordinates) from ``features [H, W, C]``.

  Args:
    features: ``[H, W, C]`` one image's feature map.
    boxes: ``[R, 4]`` xyxy in image pixels; ``spatial_scale`` maps them onto
      the map (1/stride).
    output_size: S or (Sh, Sw).
    spatial_scale: map pixels per image pixel.
    sampling_ratio: g, samples per bin along each axis; 0 = adaptive, with
      at most ``max_sampling_ratio`` (see module docstring).
    aligned: half-pixel offset (see module docstring).

  Returns:
    ``[R, Sh, Sw, C]`` in the dtype of ``features``.
  """
  dims = check_shape("features", features, ("H", "W", "C"))
  check_shape("boxes", boxes, ("R", 4), dims)
  h, w, c = features.shape
  r = boxes.shape[0]
  return roi_align_packed(
      features.reshape(h * w, c), boxes,
      map_offset=jnp.zeros((r,), jnp.int32),
      map_height=jnp.full((r,), h, jnp.int32),
      map_width=jnp.full((r,), w, jnp.int32),
      spatial_scale=jnp.full((r,), spatial_scale, jnp.float32),
      output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
      max_sampling_ratio=max_sampling_ratio)


def assign_levels(boxes: jnp.ndarray, min_level: int, max_level: int,
                  canonical_level: int = CANONICAL_LEVEL,
                  canonical_box_size: float = CANONICAL_BOX_SIZE) -> jnp.ndarray:
  """FPN level of each of ``boxes [R, 4]`` -> ``[R]`` int32 in ``[min_level, max_level]``.

  ``k = floor(k0 + log2(sqrt(w * h) / 224))`` (FPN eq. 1), with torchvision's
  epsilon of 1e-6 inside the floor so exact powers of two land on the upper
  level. Degenerate or non-finite boxes go to ``min_level``.
  """
  check_shape("boxes", boxes, (None, 4))
  size = jnp.sqrt(box_ops.area(boxes.astype(jnp.float32)))
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size) + 1e-6)
  level = jnp.where(jnp.isfinite(level), level, min_level)
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                         strides: Sequence[int], output_size: Size,
                         sampling_ratio: int = 2, aligned: bool = True,
                         canonical_level: int = CANONICAL_LEVEL,
                         canonical_box_size: float = CANONICAL_BOX_SIZE,
                         max_sampling_ratio: int = 4) -> jnp.ndarray:
  """Pools each RoI from its own FPN level, all levels in one gather.

  Args:
    features: one ``[Hl, Wl, C]`` map per level, finest first.
    boxes: ``[R, 4]`` xyxy in image pixels.
    strides: each level's stride, powers of two (level = log2(stride)).
    output_size, sampling_ratio, aligned, max_sampling_ratio: as for ``roi_align``.
    canonical_level, canonical_box_size: see ``assign_levels``.

  Returns:
    ``[R, Sh, Sw, C]``.
  """
  check_shape("boxes", boxes, ("R", 4))
  for i, f in enumerate(features):
    check_shape(f"features[{i}]", f, (None, None, None))
  return multilevel_roi_align_batch(
      [f[None] for f in features], boxes[None], strides, output_size, sampling_ratio,
      aligned, canonical_level, canonical_box_size,
      max_sampling_ratio=max_sampling_ratio)[0]


def multilevel_roi_align_batch(features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                               strides: Sequence[int], output_size: Size,
                               sampling_ratio: int = 2, aligned: bool = True,
                               canonical_level: int = CANONICAL_LEVEL,
                               canonical_box_size: float = CANONICAL_BOX_SIZE,
                               image_extent: Optional[jnp.ndarray] = None,
                               max_sampling_ratio: int = 4) -> jnp.ndarray:
  """``multilevel_roi_align`` for a batch: every image's levels in one table.

  Args:
    features: one ``[B, Hl, Wl, C]`` map per level, finest first (a single
      level serves a single-map design such as C4).
    boxes: ``[B, R, 4]`` xyxy in image pixels; image b's RoIs read image b.
    strides, output_size, sampling_ratio, aligned, canonical_level,
    canonical_box_size, max_sampling_ratio: as for ``multilevel_roi_align``.
    image_extent: ``[B, 2]`` int (height, width) in image pixels where each
      image's maps end (modeling/padding.py), ``ceil(extent / stride)`` cells
      on a level; None: the whole map.

  Returns:
    ``[B, R, Sh, Sw, C]``.
  """
  if len(features) != len(strides):
    raise ValueError(f"strides: expected one per feature level ({len(features)}), "
                     f"got {len(strides)}")
  dims = check_shape("boxes", boxes, ("B", "R", 4))
  channels = features[0].shape[-1]
  for i, f in enumerate(features):
    check_shape(f"features[{i}]", f, ("B", None, None, channels), dims)
  levels = [int(round(math.log2(s))) for s in strides]
  if [2 ** k for k in levels] != list(strides) or levels != list(range(levels[0], levels[-1] + 1)):
    raise ValueError(f"strides: expected consecutive powers of two, got {list(strides)}")

  b, r = boxes.shape[:2]
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  offsets = [0]
  for h, w in zip(heights, widths):
    offsets.append(offsets[-1] + h * w)
  per_image = offsets[-1]
  # [B * sum(Hl * Wl), C]: image-major, then level, then row-major pixels.
  table = jnp.concatenate([f.reshape(b, -1, channels) for f in features], axis=1)
  table = table.reshape(b * per_image, channels)

  boxes = boxes.reshape(b * r, 4)
  i = assign_levels(boxes, levels[0], levels[-1], canonical_level, canonical_box_size)
  i = i - levels[0]
  as_array = lambda v, dtype: jnp.asarray(v, dtype)[i]
  image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
  map_height, map_width = as_array(heights, jnp.int32), as_array(widths, jnp.int32)
  extent_height = extent_width = None
  if image_extent is not None:
    check_shape("image_extent", image_extent, ("B", 2), dims)
    cells = -(-image_extent.astype(jnp.int32)[image] // as_array(strides, jnp.int32)[:, None])
    extent_height = jnp.minimum(cells[:, 0], map_height)
    extent_width = jnp.minimum(cells[:, 1], map_width)
  out = roi_align_packed(
      table, boxes,
      map_offset=image * per_image + as_array(offsets[:-1], jnp.int32),
      map_height=map_height, map_width=map_width,
      spatial_scale=as_array([1.0 / s for s in strides], jnp.float32),
      output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
      extent_height=extent_height, extent_width=extent_width,
      max_sampling_ratio=max_sampling_ratio)
  return out.reshape(b, r, *out.shape[1:])


def roi_align_packed(table: jnp.ndarray, boxes: jnp.ndarray, map_offset: jnp.ndarray,
                     map_height: jnp.ndarray, map_width: jnp.ndarray,
                     spatial_scale: jnp.ndarray, output_size: Size,
                     sampling_ratio: int = 2, aligned: bool = True,
                     rois_per_chunk: Optional[int] = None,
                     extent_height: Optional[jnp.ndarray] = None,
                     extent_width: Optional[jnp.ndarray] = None,
                     max_sampling_ratio: int = 4) -> jnp.ndarray:
  """RoIAlign over several maps packed in one table; each RoI names its map.

  Args:
    table: ``[T, C]``, maps flattened row-major and concatenated.
    boxes: ``[R, 4]`` xyxy; ``spatial_scale`` maps them onto their map.
    map_offset: ``[R]`` int, first table row of each RoI's map.
    map_height, map_width: ``[R]`` int, that map's size.
    spatial_scale: ``[R]`` float, that map's pixels per box unit.
    output_size, sampling_ratio, aligned: as for ``roi_align``.
    rois_per_chunk: RoIs pooled per ``lax.map`` step; 0 pools all at once;
      None (default) chunks to ``CPU_CHUNK_BYTES`` on CPU and pools all at
      once elsewhere (see the module docstring; ``lax.platform_dependent``,
      so the platform compiled for decides). The result is the same.

  Returns:
    ``[R, Sh, Sw, C]`` in the dtype of ``table``.
  """
  dims = check_shape("table", table, ("T", "C"))
  check_shape("boxes", boxes, ("R", 4), dims)
  extent_height = map_height if extent_height is None else extent_height
  extent_width = map_width if extent_width is None else extent_width
  for name, v in (("map_offset", map_offset), ("map_height", map_height),
                  ("map_width", map_width), ("spatial_scale", spatial_scale),
                  ("extent_height", extent_height), ("extent_width", extent_width)):
    check_shape(name, v, ("R",), dims)
  if sampling_ratio < 0 or (sampling_ratio == 0 and max_sampling_ratio < 1):
    raise ValueError(f"sampling_ratio: expected a fixed count > 0, or 0 (adaptive) with "
                     f"max_sampling_ratio >= 1; got {sampling_ratio} and {max_sampling_ratio}")
  sh, sw = (output_size, output_size) if isinstance(output_size, int) else output_size
  adaptive = sampling_ratio == 0
  g = max_sampling_ratio if adaptive else sampling_ratio
  r, c = boxes.shape[0], table.shape[1]
  per_roi = (boxes, map_offset, map_width, spatial_scale, extent_height, extent_width)
  settings = (sh, sw, g, aligned, adaptive)
  pool = lambda args: _pool(table, *args, *settings)
  if rois_per_chunk is None:
    sample_bytes = sh * g * sw * g * c * 4
    chunk = max(1, CPU_CHUNK_BYTES // sample_bytes)
    if r <= chunk:
      return pool(per_roi)
    # Chunks on CPU only, decided for the platform the program is compiled for
    # (a program exported for CPU, GPU and TPU keeps each its own form).
    chunked = lambda args: _pool_chunked(table, args, chunk, settings)
    return jax.lax.platform_dependent(per_roi, cpu=chunked, default=pool)
  if rois_per_chunk <= 0 or r <= rois_per_chunk:
    return pool(per_roi)
  return _pool_chunked(table, per_roi, rois_per_chunk, settings)


def _pool_chunked(table, per_roi, rois_per_chunk, settings):
  """``_pool`` over ``rois_per_chunk`` RoIs at a time (``lax.map``); the same result.

  The chunks read a float32 copy of ``table``: the loop's gradient adds each
  chunk's scatter into the table's gradient, which XLA:CPU does in place in
  float32, while in bfloat16 every chunk converted and added the whole
  table (R50-FPN at 512 px: 2.4 s of a 12.4-s train step).
  """
  r = per_roi[0].shape[0]
  chunks = -(-r // rois_per_chunk)
  pad = chunks * rois_per_chunk - r  # padding repeats the last RoI; dropped below
  per_roi = [jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1), mode="edge").reshape(
      chunks, rois_per_chunk, *v.shape[1:]) for v in per_roi]
  wide = table.astype(jnp.float32)
  out = jax.lax.map(lambda args: _pool(wide, *args, *settings), per_roi)
  return out.reshape(chunks * rois_per_chunk, *out.shape[2:])[:r].astype(table.dtype)


def _pool(table, boxes, map_offset, map_width, spatial_scale, extent_height, extent_width,
          sh, sw, g, aligned, adaptive):
  """``roi_align_packed``'s arithmetic for one chunk of RoIs."""
  r, c = boxes.shape[0], table.shape[1]
  offset = 0.5 if aligned else 0.0
  scaled = boxes.astype(jnp.float32) * spatial_scale[:, None] - offset  # (R, 4)
  roi_w = scaled[:, 2] - scaled[:, 0]
  roi_h = scaled[:, 3] - scaled[:, 1]
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)

  y_lo, y_hi, wy_lo, wy_hi = _sample_axis(scaled[:, 1], roi_h, sh, g, extent_height, adaptive)
  x_lo, x_hi, wx_lo, wx_hi = _sample_axis(scaled[:, 0], roi_w, sw, g, extent_width, adaptive)

  base = map_offset[:, None, None]
  stride = map_width[:, None, None]
  out = 0.0
  for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
    for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
      idx = base + yi[:, :, None] * stride + xi[:, None, :]  # (R, Sh*g, Sw*g)
      weight = wy[:, :, None] * wx[:, None, :]
      out = out + table[idx].astype(jnp.float32) * weight[..., None]
  out = out.reshape(r, sh, g, sw, g, c)
  # Adaptive: the weights already hold each sample's share (1 / count per axis).
  out = out.sum(axis=(2, 4)) if adaptive else out.mean(axis=(2, 4))  # (R, Sh, Sw, C)
  return out.astype(table.dtype)


def _sample_axis(start, length, bins, g, size, adaptive=False):
  """Bilinear corners and weights of the ``bins * g`` samples along one axis.

  Args:
    start: ``[R]`` first edge of each RoI in map pixels; length: ``[R]``.
    bins: S; g: samples per bin (with ``adaptive``, the most a RoI may use);
    size: ``[R]`` int map extent on this axis.
    adaptive: each RoI uses ``ceil(length / bins)`` (at most g) of the g
      samples per bin, and the weights include the 1 / count of the bin's mean.

  Returns:
    low, high ``[R, S*g]`` int32 corner coordinates and their weights
    ``[R, S*g]``; a sample out of range or unused has both weights 0.
  """
  k = jnp.arange(bins * g)
  bin_index, sub = (k // g).astype(jnp.float32), (k % g).astype(jnp.float32)
  if adaptive:
    # torchvision's roi_bin_grid = ceil(roi_size / pooled_size); 0 reads nothing.
    count = jnp.ceil(jnp.where(jnp.isfinite(length), length, 0.0) / bins)
    count = jnp.clip(count, 0.0, g)[:, None]  # (R, 1)
    frac = bin_index[None, :] + (sub[None, :] + 0.5) / jnp.maximum(count, 1.0)
    share = jnp.where(sub[None, :] < count, 1.0 / jnp.maximum(count, 1.0), 0.0)  # (R, S*g)
  else:
    frac = (bin_index + (sub + 0.5) / g)[None, :]
    share = 1.0
  pos = start[:, None] + (length / bins)[:, None] * frac  # (R, S*g)
  size = size[:, None]
  inside = (pos >= -1.0) & (pos <= size.astype(jnp.float32))
  pos = jnp.maximum(pos, 0.0)
  low = jnp.floor(pos).astype(jnp.int32)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac_hi = jnp.where(at_edge, 0.0, pos - low.astype(jnp.float32))
  # A NaN position fails `inside` and reads nothing; clip keeps gathers in range.
  low, high = jnp.clip(low, 0, size - 1), jnp.clip(high, 0, size - 1)
  return (low, high, jnp.where(inside, 1.0 - frac_hi, 0.0) * share,
          jnp.where(inside, frac_hi, 0.0) * share)
