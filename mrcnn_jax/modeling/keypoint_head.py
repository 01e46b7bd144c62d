"""Keypoint head (Mask R-CNN, sec. 5) and heatmap decoding.

Eight 3x3 convs of 512 on the 14x14 RoIAlign output, a 4x4 stride-2 deconv to
one 28x28 logit map per keypoint, then 2x bilinear upsampling to 56x56. Each
keypoint is trained as a one-hot 56*56-way softmax (losses.py).

Decoding follows detectron2's ``heatmaps_to_keypoints``, which upsamples each
map bicubically to the RoI's size in pixels and takes the argmax. That size
varies per RoI, so here the same bicubic interpolant (PyTorch's, a = -0.75,
half-pixel centres) is evaluated on a fixed sub-cell grid around each map's
coarse maximum instead: same function, same kind of maximum, static shapes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling.deconv import Deconv
from mrcnn_jax.ops.checks import check_shape

msra_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Sub-cell search: offsets in [-1, 1] heatmap cells in steps of 1/8 cell (a
# 56-cell map over a 448-pixel RoI then resolves one pixel, as detectron2).
REFINE_STEPS = 8
CUBIC_A = -0.75  # PyTorch's bicubic coefficient


class KeypointHead(nn.Module):
  """``pooled [..., S, S, C] -> heatmap logits [..., 4S, 4S, K]`` (float32)."""
  num_keypoints: int = 17  # COCO person keypoints
  num_convs: int = 8
  conv_dim: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
    lead = pooled.shape[:-3]
    x = pooled.reshape(-1, *pooled.shape[-3:]).astype(self.dtype)
    for i in range(self.num_convs):
      x = nn.relu(nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)),
                          kernel_init=msra_init, dtype=self.dtype, name=f"conv_fcn{i + 1}")(x))
    # 4x4 stride-2 deconv with PyTorch padding 1: output exactly 2x.
    x = Deconv(self.num_keypoints, 4, 2, padding=1, kernel_init=msra_init,
               name="score_lowres")(x.astype(jnp.float32))
    n, h, w, k = x.shape
    x = jax.image.resize(x, (n, 2 * h, 2 * w, k), "bilinear")
    return x.reshape(*lead, *x.shape[1:])


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
  coarse = jnp.argmax(maps.reshape(d * k, m * m), axis=1)
  cy, cx = coarse // m, coarse % m

  # The bicubic interpolant near (cy, cx) needs rows/cols cy-3..cy+3; the
  # weights of the sub-cell grid over those 7 taps are constants.
  taps = jnp.arange(-3, 4)
  rows = jnp.clip(cy[:, None] + taps, 0, m - 1)  # (DK, 7)
  cols = jnp.clip(cx[:, None] + taps, 0, m - 1)
  patch = maps[jnp.arange(d * k)[:, None, None], rows[:, :, None], cols[:, None, :]]
  weights = jnp.asarray(_subcell_weights())  # (G, 7)
  fine = jnp.einsum("ga,nab,hb->ngh", weights, patch, weights)  # (DK, G, G)
  g = weights.shape[0]
  offsets = jnp.linspace(-1.0, 1.0, g)
  # Stay inside the map's extent [-0.5, m - 0.5], where detectron2 samples.
  inside = lambda c: jnp.abs(c[:, None] + offsets[None, :] - (m - 1) / 2) <= m / 2
  fine = jnp.where(inside(cy)[:, :, None] & inside(cx)[:, None, :], fine, -jnp.inf)
  best = jnp.argmax(fine.reshape(d * k, g * g), axis=1)
  u = cx + offsets[best % g]  # continuous map coordinate, pixel centres at integers
  v = cy + offsets[best // g]
  peak = jnp.max(fine.reshape(d * k, g * g), axis=1)
  score = 1.0 / jnp.sum(jnp.exp(maps - peak[:, None, None]), axis=(1, 2))

  boxes = jnp.repeat(boxes.astype(jnp.float32), k, axis=0)
  x = boxes[:, 0] + (u + 0.5) * (boxes[:, 2] - boxes[:, 0]) / m
  y = boxes[:, 1] + (v + 0.5) * (boxes[:, 3] - boxes[:, 1]) / m
  return jnp.stack([x, y, score], axis=-1).reshape(d, k, 3)


def _cubic(t):
  """PyTorch's cubic convolution kernel weights for the 4 taps at fraction t."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _subcell_weights() -> np.ndarray:
  """``[G, 7]`` weights of taps -3..3 for sample offsets linspace(-1, 1, G)."""
  g = 2 * REFINE_STEPS + 1
  out = np.zeros((g, 7), np.float32)
  for i, off in enumerate(np.linspace(-1.0, 1.0, g)):
    base = math.floor(off)
    out[i, base - 1 + 3:base + 3 + 3] = _cubic(off - base)
  return out
