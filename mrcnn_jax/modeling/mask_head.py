"""Mask head (Mask R-CNN, sec. 3, fig. 4 right): a small FCN per RoI.

FPN design: four 3x3 convs of 256 on the 14x14 RoIAlign output, a 2x2
stride-2 deconv to 28x28, and a 1x1 conv to one mask logit per class
(``norm="gn"``: a GroupNorm after each 3x3 conv, detectron2's GN configs). The
loss (losses.py) reads only the ground-truth class's channel, so classes do
not compete: a per-pixel sigmoid, not a softmax. With ``num_convs=0`` on res5
features this is the C4 design's mask head.
"""

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling.conv import conv_class, conv_stack
from mrcnn_jax.modeling.deconv import Deconv, msra_fill


class MaskHead(nn.Module):
  """``pooled [..., S, S, C] -> mask logits [..., 2S, 2S, K]`` (float32)."""
  num_classes: int = 80
  num_convs: int = 4
  conv_dim: int = 256
  norm: str = "none"  # after each conv: "none" or "gn" (norm.HEAD_NORMS)
  dtype: jnp.dtype = jnp.float32
  conv_form: str = "auto"  # conv.FORMS; "matmul" inside control flow (chunked.py)

  @nn.compact
  def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
    lead = pooled.shape[:-3]
    x = pooled.reshape(-1, *pooled.shape[-3:]).astype(self.dtype)
    x = conv_stack(x, self.num_convs, self.conv_dim, "mask_fcn{}", self.norm, self.dtype,
                   form=self.conv_form)
    x = nn.relu(Deconv(self.conv_dim, 2, 2, kernel_init=msra_fill(), dtype=self.dtype,
                       name="deconv")(x))
    # The predictor runs in float32 (DESIGN.md); normal(0.001) as detectron2.
    x = conv_class(self.conv_form)(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.001),
             name="predictor")(x.astype(jnp.float32))
    return x.reshape(*lead, *x.shape[1:])
