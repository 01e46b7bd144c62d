"""Feature Pyramid Network (Lin et al. 2017): C2..C5 -> P2..P6, 256 channels.

A 1x1 lateral conv per input level, top-down nearest-neighbour upsampling
added to the laterals, a 3x3 output conv per level, and P6 as a stride-2
subsample of P5 (torchvision's LastLevelMaxPool, a 1x1 max pool). Parameter
names: ``lateral{k}`` / ``output{k}`` for level k = 2..5.

``norm`` (detectron2's FPN.NORM) follows each lateral and output conv with
a norm (norm.py; the convs then have no bias), named ``lateral{k}_norm`` /
``output{k}_norm``, with statistics inside the image extent.

Given an image extent (padding.py), each output conv's input and each
output are zeroed outside it, so the RPN's 3x3 conv reads zeros there too.
"""

from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax import sharding
from mrcnn_jax.modeling import padding
from mrcnn_jax.modeling.conv import Conv
from mrcnn_jax.modeling.norm import make_norm

# detectron2 and torchvision initialise FPN convs with kaiming_uniform(a=1).
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def upsample_nearest(x: jnp.ndarray, size) -> jnp.ndarray:
  """``[B, h, w, C] -> [B, H, W, C]``, PyTorch's legacy 'nearest' (index floor(i * h / H))."""
  b, h, w, c = x.shape
  # Exactly 2x (every level of a canvas divisible by the top stride): a broadcast,
  # not a gather, which XLA:CPU fused with its neighbours into a slow loop in
  # bfloat16 (R50-FPN at 512 px: ~0.5 s of the train step). Not with maps split
  # by rows (sharding.constrain_spatial): there XLA's partitioner got the
  # broadcast's gradient wrong (24% off at an FPN bias; the gather's is exact).
  spatial = sharding.space_size(jax.sharding.get_abstract_mesh()) > 1
  if tuple(size) == (2 * h, 2 * w) and not spatial:
    return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
  rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
  cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """``{"c2".."c5"} -> {"p2".."p6"}`` (strides 4..64)."""
  channels: int = 256
  top_block: bool = True  # add P6 = P5[::2, ::2]
  dtype: jnp.dtype = jnp.float32
  norm: str = "none"  # after each conv (norm.py); "none": convs with a bias
  bn_groups: int = 1  # norm "bn": statistics groups of the batch (batch_norm.py)

  @nn.compact
  def __call__(self, features: Dict[str, jnp.ndarray],
               image_extent: Optional[jnp.ndarray] = None,
               train: bool = False) -> Dict[str, jnp.ndarray]:
    levels = sorted(int(k[1:]) for k in features)
    bias = self.norm == "none"

    def norm(y, name, mask):
      layer = make_norm(self.norm, self.channels, train, self.dtype, name,
                        bn_groups=self.bn_groups)
      return layer(y, mask=padding.norm_mask(y, mask))

    out, top = {}, None
    for k in reversed(levels):
      c = features[f"c{k}"]
      mask = padding.valid_mask(c, image_extent, 2 ** k)
      lateral = norm(Conv(self.channels, (1, 1), use_bias=bias, kernel_init=fpn_init,
                          dtype=self.dtype, name=f"lateral{k}")(c), f"lateral{k}_norm", mask)
      top = lateral if top is None else lateral + upsample_nearest(top, lateral.shape[1:3])
      top = padding.zero_outside(top, mask)
      y = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=bias,
               kernel_init=fpn_init, dtype=self.dtype, name=f"output{k}")(top)
      out[f"p{k}"] = padding.zero_outside(norm(y, f"output{k}_norm", mask), mask)
    if self.top_block:
      out[f"p{levels[-1] + 1}"] = out[f"p{levels[-1]}"][:, ::2, ::2]
    return {k: out[k] for k in sorted(out)}
