"""The C4 design's RoI head (Mask R-CNN, fig. 4 left; detectron2's Res5ROIHeads).

RoIs are pooled 14x14 from C4 (stride 16), run through ResNet's res5 stage
(stride 2, so 7x7), and average-pooled for the box predictor. The mask head
is a deconv on the same res5 output (``MaskHead(num_convs=0)``), so the mask
is 14x14.
"""

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling import resnet
from mrcnn_jax.modeling.box_head import BoxPredictor


class Res5Head(nn.Module):
  """``pooled [..., 14, 14, C4] -> (res5 [..., 7, 7, C5], logits, deltas)``."""
  num_classes: int = 80
  depth: int | str = 50
  width: int = 64  # the backbone's width (res5 has width * 8 inner channels)
  norm: str = "frozen_bn"
  stride_in_1x1: bool = False
  class_agnostic: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jnp.ndarray, train: bool = False):
    kind, blocks = resnet.arch(self.depth)
    lead = pooled.shape[:-3]
    x = pooled.reshape(-1, *pooled.shape[-3:]).astype(self.dtype)
    x = resnet.Stage(kind, blocks[3], self.width * 8, 2, self.norm, self.stride_in_1x1,
                     False, train, self.dtype, name="res5")(x)
    logits, deltas = BoxPredictor(self.num_classes, self.class_agnostic,
                                  name="predictor")(x.mean(axis=(1, 2)))
    unflat = lambda a: a.reshape(*lead, *a.shape[1:])
    return unflat(x), unflat(logits), unflat(deltas)
