"""Anchor boxes, laid out as torchvision's AnchorGenerator or detectron2's.

``multilevel_anchors`` gives a whole canvas's anchors as NumPy constants;
``image_anchors`` gives one image's anchors inside a larger static canvas as
each source lays them for that image alone (its size padded to a multiple of
32, see modeling/padding.py), with which of the canvas's anchors exist for it:
- ``"torchvision"``: corners rounded to integers, and the stride of each
  level is (padded image size) // (its feature grid), e.g. 800 // 13 = 61 on
  P6 of an 800-pixel image, not 64;
- ``"detectron2"``: corners not rounded, the nominal stride 2**level.
Positions past the image's own feature grid exist in neither source, so
they are marked invalid.

Layout (it must match for imported RPN weights to line up): for each
level, positions in row-major order (y outer, x inner), and at each position
the ``len(aspect_ratios) * len(sizes)`` cell anchors with the aspect ratio as
the outer loop. Cell anchors are centred on the position's top-left pixel
corner ``(x * stride, y * stride)`` (offset 0, as torchvision and detectron2)
and their corners are rounded to integers as torchvision does (detectron2 does
not round; the difference is under half a pixel).
"""

import math
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.checks import check_shape

# FPN defaults (Lin et al. 2017, sec. 4.1): one size per level P2..P6 and
# three aspect ratios (height / width).
FPN_STRIDES = (4, 8, 16, 32, 64)
FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float] = ASPECT_RATIOS,
                 round_corners: bool = True) -> np.ndarray:
  """Anchors centred at the origin -> ``[len(aspect_ratios) * len(sizes), 4]``.

  An anchor of size ``s`` and aspect ratio ``r = h / w`` has area ``s**2``:
  ``w = s / sqrt(r)``, ``h = s * sqrt(r)``.
  """
  sizes = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  w_ratios = 1.0 / h_ratios
  ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # ratio-major
  hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
  anchors = np.stack([-ws, -hs, ws, hs], axis=1) / 2.0
  # np.round and torch.round both round half to even.
  return np.round(anchors) if round_corners else anchors


def grid_anchors(grid_size: Tuple[int, int], stride: Tuple[int, int],
                 cells: np.ndarray) -> np.ndarray:
  """Tiles ``cells [A, 4]`` over a ``(Hf, Wf)`` grid -> ``[Hf * Wf * A, 4]``."""
  check_shape("cells", cells, (None, 4))  # an [A, 1] would broadcast silently
  (hf, wf), (sy, sx) = grid_size, stride
  ys, xs = np.meshgrid(np.arange(hf, dtype=np.float32) * sy,
                       np.arange(wf, dtype=np.float32) * sx, indexing="ij")
  shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
  return (shifts + cells[None, :, :]).reshape(-1, 4).astype(np.float32)


def feature_grid(canvas_size: Tuple[int, int], stride: int) -> Tuple[int, int]:
  """Size of a stride-``stride`` feature map over the canvas (padded convs round up)."""
  return tuple(int(math.ceil(c / stride)) for c in canvas_size)


def multilevel_anchors(canvas_size: Tuple[int, int],
                       strides: Sequence[int] = FPN_STRIDES,
                       sizes: Sequence[Sequence[float]] = FPN_SIZES,
                       aspect_ratios: Sequence[float] = ASPECT_RATIOS,
                       round_corners: bool = True) -> list:
  """Anchors of every level for a ``(height, width)`` canvas.

  Returns:
    one ``[Hl * Wl * A, 4]`` float32 array per level, in ``strides`` order.
    Concatenating them gives torchvision's per-image anchor list.
  """
  if len(strides) != len(sizes):
    raise ValueError(f"sizes: expected one tuple per level ({len(strides)} strides), "
                     f"got {len(sizes)}")
  out = []
  for stride, level_sizes in zip(strides, sizes):
    grid = feature_grid(canvas_size, stride)
    # torchvision derives the stride as image_size // grid_size per axis.
    level_stride = tuple(c // g for c, g in zip(canvas_size, grid))
    cells = cell_anchors(level_sizes, aspect_ratios, round_corners)
    out.append(grid_anchors(grid, level_stride, cells))
  return out


LAYOUTS = ("detectron2", "torchvision")


def image_anchors(grid_size: Tuple[int, int], stride: int, sizes: Sequence[float],
                  aspect_ratios: Sequence[float], image_extent: jnp.ndarray,
                  layout: str = "detectron2") -> Tuple[jnp.ndarray, jnp.ndarray]:
  """One level's anchors for one image over a ``(Hf, Wf)`` canvas grid.

  Args:
    grid_size: the level's feature grid over the whole canvas.
    stride: the level's nominal stride.
    sizes, aspect_ratios: as for ``cell_anchors``.
    image_extent: ``(2,)`` int, the image's (height, width) padded to a
      multiple of 32 (may be traced); the whole canvas for the canvas's anchors.
    layout: ``"detectron2"`` or ``"torchvision"`` (see the module docstring).

  Returns:
    anchors ``[Hf * Wf * A, 4]`` float32 and valid ``[Hf * Wf * A]`` bool
    (the anchor exists for this image), in ``grid_anchors``' order.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"anchor layout: expected one of {LAYOUTS}, got {layout!r}")
  cells = jnp.asarray(cell_anchors(sizes, aspect_ratios, layout == "torchvision"))
  hf, wf = grid_size
  image_grid = -(-jnp.asarray(image_extent, jnp.int32) // stride)  # (2,) its own feature grid
  if layout == "torchvision":
    step = (image_extent // jnp.maximum(image_grid, 1)).astype(jnp.float32)  # (sy, sx)
  else:
    step = jnp.full((2,), stride, jnp.float32)
  rows, cols = jnp.arange(hf), jnp.arange(wf)
  ys, xs = jnp.meshgrid(rows * step[0], cols * step[1], indexing="ij")
  shifts = jnp.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
  anchors = (shifts + cells[None]).reshape(-1, 4)
  inside = (rows[:, None] < image_grid[0]) & (cols[None, :] < image_grid[1])  # (Hf, Wf)
  valid = jnp.repeat(inside.reshape(-1), cells.shape[0])
  return anchors, valid


def num_anchors_per_location(sizes: Sequence[float],
                             aspect_ratios: Sequence[float] = ASPECT_RATIOS) -> int:
  """A: how many anchors sit at each feature-map position of one level."""
  return len(sizes) * len(aspect_ratios)
