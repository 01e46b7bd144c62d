"""Keypoint head (Mask R-CNN, sec. 5) and heatmap decoding.

Eight 3x3 convs of 512 on the 14x14 RoIAlign output, a 4x4 stride-2 deconv to
one 28x28 logit map per keypoint, then 2x bilinear upsampling to 56x56. Each
keypoint is trained as a one-hot 56*56-way softmax (losses.py).

Decoding follows detectron2's ``heatmaps_to_keypoints`` (torchvision's is the
same): it upsamples each map bicubically to the RoI's size in whole pixels,
ceil(w) x ceil(h), takes the argmax pixel j and returns x1 + (j + 0.5) * w /
ceil(w). That size varies per RoI, so here the same bicubic interpolant
(PyTorch's: a = -0.75, half-pixel centres, clamped borders) is evaluated only
at the RoI pixels within 8 of each of the map's 32 highest local maxima
(every k-th pixel, k = ceil(w / 448), on RoIs wider than 448, so that the
window still spans a cell), one peak at a time. The answer is detectron2's
whenever its pixel lies that near one of those peaks: always on peaked
(trained) maps, and for all but ~0.1% of keypoints on the rough maps of
random weights (tests/parity), where a thin RoI's few pixel columns can put
the maximum far from where the map itself peaks. Cost: 32 x 17 x 17 samples
per map (~4 GFLOP for 100 detections x 17 keypoints: ~2 s on a 2-core CPU,
little on an accelerator).

``decode="local_mean"`` (``model.keypoint_head.decode``) is the alternative
for keypoints that must be placed to a fraction of a pixel: the mean of the
cell centres within ``LOCAL_HALF_WINDOW`` cells of the map's highest cell,
weighted by the softmax of their logits (the softmax the loss trains, renormalised
over the window: a local soft-argmax, as in integral pose regression, Sun et
al. 2018). The argmax over whole RoI pixels cannot resolve better than half a
pixel, which on small objects is much of the OKS tolerance (with a sigma of
0.05, one pixel of error on an object of 100 px^2 scores OKS 0.61). On the
shapes demo it raises keypoint AP by a few points over "bicubic"; the
window's half-width was chosen by that measurement (docs/experiments.md,
"Measurements behind the code").
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.conv import conv_stack
from mrcnn_jax.modeling.deconv import Deconv, msra_fill
from mrcnn_jax.ops.checks import check_shape

NUM_PEAKS = 32  # local maxima searched around, per map
HALF_WINDOW = 8  # pixels on each side of a peak, per axis
CUBIC_A = -0.75  # PyTorch's bicubic coefficient
LOCAL_HALF_WINDOW = 7  # "local_mean": cells on each side of the highest, per axis
DECODES = ("bicubic", "local_mean")


class KeypointHead(nn.Module):
  """``pooled [..., S, S, C] -> heatmap logits [..., 4S, 4S, K]`` (float32)."""
  num_keypoints: int = 17  # COCO person keypoints
  num_convs: int = 8
  conv_dim: int = 512
  dtype: jnp.dtype = jnp.float32
  conv_form: str = "auto"  # conv.FORMS; "matmul" inside control flow (chunked.py)

  @nn.compact
  def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
    lead = pooled.shape[:-3]
    x = pooled.reshape(-1, *pooled.shape[-3:]).astype(self.dtype)
    x = conv_stack(x, self.num_convs, self.conv_dim, "conv_fcn{}", dtype=self.dtype,
                   form=self.conv_form)
    # 4x4 stride-2 deconv with PyTorch padding 1: output exactly 2x.
    x = Deconv(self.num_keypoints, 4, 2, padding=1, kernel_init=msra_fill(),
               name="score_lowres")(x.astype(jnp.float32))
    n, h, w, k = x.shape
    x = jax.image.resize(x, (n, 2 * h, 2 * w, k), "bilinear")
    return x.reshape(*lead, *x.shape[1:])


def decode_keypoints(heatmaps: jnp.ndarray, boxes: jnp.ndarray,
                     method: str = "bicubic") -> jnp.ndarray:
  """``heatmaps_to_keypoints`` ("bicubic", detectron2's) or ``local_mean_keypoints``.

  Same arguments and result as those; ``method`` is one of ``DECODES``.
  """
  if method == "bicubic":
    return heatmaps_to_keypoints(heatmaps, boxes)
  if method == "local_mean":
    return local_mean_keypoints(heatmaps, boxes)
  raise ValueError(f"keypoint decode: expected one of {DECODES}, got {method!r}")


def local_mean_keypoints(heatmaps: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
  """Keypoints at the softmax-weighted mean cell centre around each map's highest cell.

  Args and result as ``heatmaps_to_keypoints``; the score is the same kind
  (the highest cell's softmax weight over the whole map), positions are
  continuous: ``x1 + (u + 0.5) * w / m`` for the mean cell coordinate ``u``
  over the cells within ``LOCAL_HALF_WINDOW`` of the highest (cells beyond
  the map's border are left out).
  """
  dims = check_shape("heatmaps", heatmaps, ("D", "m", "m", "K"))
  check_shape("boxes", boxes, ("D", 4), dims)
  d, m, _, k = heatmaps.shape
  maps = jnp.moveaxis(heatmaps.astype(jnp.float32), -1, 1).reshape(d * k, m * m)
  top = jnp.argmax(maps, axis=1)  # (DK,)
  offsets = jnp.arange(-LOCAL_HALF_WINDOW, LOCAL_HALF_WINDOW + 1)
  cols = (top % m)[:, None] + offsets  # (DK, S)
  rows = (top // m)[:, None] + offsets
  inside = ((cols >= 0) & (cols < m))[:, None, :] & ((rows >= 0) & (rows < m))[:, :, None]
  index = jnp.clip(rows, 0, m - 1)[:, :, None] * m + jnp.clip(cols, 0, m - 1)[:, None, :]
  logits = jnp.take_along_axis(maps, index.reshape(d * k, -1), axis=1).reshape(index.shape)
  weights = jax.nn.softmax(jnp.where(inside, logits, -jnp.inf), axis=(1, 2))  # (DK, S, S)
  u = jnp.sum(weights * cols[:, None, :], axis=(1, 2))
  v = jnp.sum(weights * rows[:, :, None], axis=(1, 2))
  peak = jnp.max(maps, axis=1)
  score = 1.0 / jnp.sum(jnp.exp(maps - peak[:, None]), axis=1)
  boxes = jnp.repeat(boxes.astype(jnp.float32), k, axis=0)  # (DK, 4)
  x = boxes[:, 0] + (u + 0.5) * (boxes[:, 2] - boxes[:, 0]) / m
  y = boxes[:, 1] + (v + 0.5) * (boxes[:, 3] - boxes[:, 1]) / m
  return jnp.stack([x, y, score], axis=-1).reshape(d, k, 3)


def heatmaps_to_keypoints(heatmaps: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
  """Keypoints from heatmap logits, detectron2's decoding with static shapes.

  Args:
    heatmaps: ``[D, m, m, K]`` logits over each box.
    boxes: ``[D, 4]`` the boxes the heatmaps cover (image coordinates).

  Returns:
    ``[D, K, 3]``: x, y in continuous image coordinates (pixel centres at
    i + 0.5; subtract 0.5 for COCO's integer convention) and detectron2's
    score: the maximum's softmax weight with the sum taken over the m x m map.
  """
  dims = check_shape("heatmaps", heatmaps, ("D", "m", "m", "K"))
  check_shape("boxes", boxes, ("D", 4), dims)
  d, m, _, k = heatmaps.shape
  maps = jnp.moveaxis(heatmaps.astype(jnp.float32), -1, 1).reshape(d * k, m, m)
  # Candidate cells: the map's highest local maxima (3 x 3). The maximum over
  # the RoI's pixels lies within a cell of one of them, and not always of the
  # highest cell (near-equal peaks, bicubic overshoot).
  pooled = jax.lax.reduce_window(maps, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
  peaks = jnp.where(maps >= pooled, maps, -jnp.inf).reshape(d * k, m * m)
  _, top = jax.lax.top_k(peaks, NUM_PEAKS)  # (DK, P): highest local maxima (3 x 3)

  boxes = jnp.repeat(boxes.astype(jnp.float32), k, axis=0)  # (DK, 4)
  size = jnp.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)  # (DK, 2) w, h; detectron2 clamps at 1
  pixels = jnp.ceil(size)  # the RoI-sized map's width and height
  offsets = jnp.arange(-HALF_WINDOW, HALF_WINDOW + 1, dtype=jnp.float32)

  def window(centre, step, extent):
    """RoI pixels ``centre + step * offsets`` (centre, step: (DK,)): indices, validity,
    bicubic weights (DK, S, m)."""
    j = centre[:, None] + step[:, None] * offsets
    ok = (j >= 0) & (j < extent[:, None])
    j = jnp.clip(j, 0, extent[:, None] - 1)
    coords = (j + 0.5) * (m / extent[:, None]) - 0.5  # pixel centres in map coordinates
    return j, ok, _bicubic_weights(coords, m)

  rows = jnp.arange(d * k)

  def best_pixel(cx, cy, sx, sy):
    """The highest of the window's sampled pixels: (value, x, y), each (DK,)."""
    jx, okx, wx = window(cx, sx, pixels[:, 0])
    jy, oky, wy = window(cy, sy, pixels[:, 1])
    values = jnp.einsum("nsa,nat->nst", wy, jnp.einsum("nab,ntb->nat", maps, wx))  # (DK, S, S)
    values = jnp.where(oky[:, :, None] & okx[:, None, :], values, -jnp.inf).reshape(d * k, -1)
    i = jnp.argmax(values, axis=1)
    return values[rows, i], jx[rows, i % jx.shape[1]], jy[rows, i // jx.shape[1]]

  # Around each peak, pixels `step` apart: every pixel while a cell spans at most
  # HALF_WINDOW pixels, every step-th on larger boxes, refined below.
  step = jnp.maximum(jnp.ceil(pixels / (HALF_WINDOW * m)), 1.0)  # (DK, 2)
  nearest = lambda cell, extent: jnp.round((cell + 0.5) * extent / m - 0.5)  # cell -> pixel

  def search(best, cell):
    """Keeps the best sampled pixel so far, over one more peak's window."""
    found = best_pixel(nearest((cell % m).astype(jnp.float32), pixels[:, 0]),
                       nearest((cell // m).astype(jnp.float32), pixels[:, 1]),
                       step[:, 0], step[:, 1])
    better = found[0] > best[0]
    return tuple(jnp.where(better, f, b) for f, b in zip(found, best)), None

  start = (jnp.full((d * k,), -jnp.inf), jnp.zeros((d * k,)), jnp.zeros((d * k,)))
  best, _ = jax.lax.scan(search, start, top.T)
  # Every pixel around the best one: where the search skipped pixels (boxes over
  # HALF_WINDOW * m pixels), the maximum lies between the samples around it.
  ones = jnp.ones((d * k,), jnp.float32)
  refined = best_pixel(best[1], best[2], ones, ones)
  better = refined[0] > best[0]
  peak, x_pixel, y_pixel = (jnp.where(better, r, b) for r, b in zip(refined, best))
  score = 1.0 / jnp.sum(jnp.exp(maps - peak[:, None, None]), axis=(1, 2))
  x = boxes[:, 0] + (x_pixel + 0.5) * size[:, 0] / pixels[:, 0]
  y = boxes[:, 1] + (y_pixel + 0.5) * size[:, 1] / pixels[:, 1]
  return jnp.stack([x, y, score], axis=-1).reshape(d, k, 3)


def _bicubic_weights(coords: jnp.ndarray, m: int) -> jnp.ndarray:
  """``[..., S]`` map coordinates -> ``[..., S, m]`` bicubic weights over the m cells.

  Taps beyond the border land on the border cell, as PyTorch clamps them.
  """
  base = jnp.floor(coords)
  taps = jnp.clip(base[..., None] + jnp.arange(-1, 3), 0, m - 1).astype(jnp.int32)  # (..., S, 4)
  weights = _cubic(coords - base)  # (..., S, 4)
  return jnp.sum(jax.nn.one_hot(taps, m, dtype=jnp.float32) * weights[..., None], axis=-2)


def _cubic(t):
  """PyTorch's cubic convolution weights of the 4 taps (floor - 1 .. floor + 2) at fraction t, ``[..., 4]``."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)
