"""Greedy non-maximum suppression with a fixed-size, padded output.

Same result as torchvision.ops.nms (visit boxes by decreasing score, keep one
unless it overlaps an already kept box by IoU > threshold), computed in a
shape-static way that parallelises (the tiled scheme of the TPU Mask R-CNN's
``non_max_suppression_padded``):

1. sort by score (stable: on ties the lower index comes first);
2. walk the sorted boxes in tiles of T. Each tile is first suppressed by the
   boxes already kept in earlier tiles (one ``[N, T]`` IoU block), then
   suppresses within itself by iterating ``keep_i = cand_i and not any(keep_j
   and iou_ji > t for j < i)`` to its fixed point, which is exactly the greedy
   answer (entry i is final after i iterations; in practice a few suffice);
3. stop early once ``max_output`` boxes are kept.

Memory stays at one ``[N, T]`` block: no ``[N, N]`` matrix is formed.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.checks import check_shape

TILE_SIZE = 256


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float, max_output: int,
        valid: Optional[jnp.ndarray] = None,
        tile_size: int = TILE_SIZE) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy NMS of ``boxes [N, 4]`` by ``scores [N]``.

  Args:
    boxes: ``[N, 4]`` xyxy.
    scores: ``[N]``; NaN scores are treated as invalid.
    iou_threshold: a box is suppressed by a kept box with IoU strictly above it.
    max_output: static number of output slots.
    valid: optional ``[N]`` bool; invalid boxes are never kept and never
      suppress anything.
    tile_size: boxes handled per step (a speed knob; the result does not
      depend on it).

  Returns:
    indices ``[max_output]`` int32 of kept boxes by decreasing score (0 in
    unused slots), and valid ``[max_output]`` bool.
  """
  return _nms(boxes, scores, None, iou_threshold, max_output, valid, tile_size)


def batched_nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: jnp.ndarray,
                iou_threshold: float, max_output: int,
                valid: Optional[jnp.ndarray] = None,
                tile_size: int = TILE_SIZE) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Class-aware NMS: boxes only suppress boxes of the same ``classes [N]`` entry.

  Equal to torchvision.ops.batched_nms, with the class test done exactly in
  the IoU (no coordinate-offset trick, so no float32 precision loss). Returns
  the same as ``nms``.
  """
  return _nms(boxes, scores, classes, iou_threshold, max_output, valid, tile_size)


def _nms(boxes, scores, classes, iou_threshold, max_output, valid, tile_size):
  dims = check_shape("boxes", boxes, ("N", 4))
  check_shape("scores", scores, ("N",), dims)
  if classes is not None:
    check_shape("classes", classes, ("N",), dims)
  if valid is not None:
    check_shape("valid", valid, ("N",), dims)
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)

  scores = scores.astype(jnp.float32)
  ok = ~jnp.isnan(scores) if valid is None else valid & ~jnp.isnan(scores)
  # Stable descending sort; invalid boxes go last.
  order = jnp.argsort(jnp.where(ok, -scores, jnp.inf), stable=True)
  tile = min(tile_size, n)
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  sorted_boxes = jnp.pad(boxes.astype(jnp.float32)[order], ((0, pad), (0, 0)))
  candidate = jnp.pad(ok[order], (0, pad))
  sorted_classes = None if classes is None else jnp.pad(classes[order], (0, pad))

  def overlaps(i0, rows_boxes, rows_classes):
    """(rows, T) bool: does row box suppress box i0 + t of the tile."""
    cols = jax.lax.dynamic_slice_in_dim(sorted_boxes, i0, tile)
    over = box_ops.pairwise_iou(rows_boxes, cols) > iou_threshold
    if sorted_classes is not None:
      col_classes = jax.lax.dynamic_slice_in_dim(sorted_classes, i0, tile)
      over &= rows_classes[:, None] == col_classes[None, :]
    return over

  def process_tile(state):
    t, keep, _ = state
    i0 = t * tile
    # Suppression by boxes kept in earlier tiles (keep is False from i0 on).
    by_earlier = jnp.any(overlaps(i0, sorted_boxes, sorted_classes) & keep[:, None], axis=0)
    cand = jax.lax.dynamic_slice_in_dim(candidate, i0, tile) & ~by_earlier
    # Suppression within the tile, to the fixed point of the greedy rule.
    tile_boxes = jax.lax.dynamic_slice_in_dim(sorted_boxes, i0, tile)
    tile_classes = (None if sorted_classes is None
                    else jax.lax.dynamic_slice_in_dim(sorted_classes, i0, tile))
    earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]
    within = overlaps(i0, tile_boxes, tile_classes) & earlier  # (T, T)

    def step(s):
      prev, _ = s
      return cand & ~jnp.any(within & prev[:, None], axis=0), prev

    tile_keep, _ = jax.lax.while_loop(lambda s: jnp.any(s[0] != s[1]), step,
                                      step((cand, cand)))
    keep = jax.lax.dynamic_update_slice_in_dim(keep, tile_keep, i0, axis=0)
    return t + 1, keep, jnp.sum(keep)

  def more_tiles(state):
    t, _, kept = state
    return (t < num_tiles) & (kept < max_output)

  _, keep, kept = jax.lax.while_loop(
      more_tiles, process_tile, (0, jnp.zeros(num_tiles * tile, bool), jnp.int32(0)))

  # Compact the kept positions, in score order, into max_output slots.
  rank = jnp.cumsum(keep) - 1
  slot = jnp.where(keep & (rank < max_output), rank, max_output)
  positions = jnp.zeros((max_output,), jnp.int32).at[slot].set(
      jnp.arange(num_tiles * tile, dtype=jnp.int32), mode="drop")
  out_valid = jnp.arange(max_output) < kept
  indices = jnp.where(out_valid, order[jnp.minimum(positions, n - 1)], 0)
  return indices.astype(jnp.int32), out_valid
