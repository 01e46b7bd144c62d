"""Box head (Fast R-CNN): pooled RoI features -> class logits and box deltas.

FPN design (Lin et al. 2017, sec. 4.2): two 1024-d FC layers on the flattened
7x7 RoIAlign output ("2fc"), then the predictor. ``num_convs`` 3x3 convs
before the FCs give detectron2's FastRCNNConvFCHead ("4conv1fc" with
``num_convs=4, fc_dims=(1024,)``; ``norm="gn"`` adds a GroupNorm after each
conv, as detectron2's GN configs do, ``norm="bn"`` a BatchNorm over the
batch's RoIs, as its SyncBN and LSJ configs do). Flattening is NHWC, (y, x, c) order;
torchvision flattens (c, y, x), so imported fc6 weights are reordered.
Classes follow detectron2: logits for K foreground classes then background,
and K class-specific box deltas.
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling.conv import Dense, conv_stack

# detectron2's c2_xavier_fill: kaiming_uniform(a=1), i.e. uniform, fan_in, scale 1.
fc_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class BoxPredictor(nn.Module):
  """``[..., D] -> logits [..., K + 1] (background last), deltas [..., K, 4]``."""
  num_classes: int = 80  # K, foreground classes
  class_agnostic: bool = False  # one box per RoI instead of one per class

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    # Predictors run in float32 (DESIGN.md): logits and deltas feed the losses.
    x = x.astype(jnp.float32)
    logits = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01),
                      name="cls_score")(x)
    num_boxes = 1 if self.class_agnostic else self.num_classes
    deltas = nn.Dense(num_boxes * 4, kernel_init=nn.initializers.normal(0.001),
                      name="bbox_pred")(x)
    return logits, deltas.reshape(*x.shape[:-1], num_boxes, 4)


class BoxHead(nn.Module):
  """``pooled [..., S, S, C] -> (logits [..., K + 1], deltas [..., K, 4])``."""
  num_classes: int = 80
  fc_dims: Sequence[int] = (1024, 1024)  # "2fc" head
  class_agnostic: bool = False
  num_convs: int = 0  # 3x3 convs (with ReLU) before the FCs
  conv_dim: int = 256
  norm: str = "none"  # after each conv: "none", "gn" or "bn" (norm.BOX_HEAD_NORMS)
  dtype: jnp.dtype = jnp.float32
  bn_groups: int = 1  # norm "bn": statistics groups of the batch's RoIs (batch_norm.py)

  @nn.compact
  def __call__(self, pooled: jnp.ndarray, train: bool = False):
    """``train``: "bn" uses batch statistics (else the running averages)."""
    lead = pooled.shape[:-3]
    x = pooled.astype(self.dtype)
    if self.num_convs:
      x = x.reshape(-1, *pooled.shape[-3:])
      x = conv_stack(x, self.num_convs, self.conv_dim, "conv{}", self.norm, self.dtype,
                     train=train, bn_groups=self.bn_groups)
    x = x.reshape(*lead, -1)
    for i, dim in enumerate(self.fc_dims):
      x = nn.relu(Dense(dim, kernel_init=fc_init, dtype=self.dtype, name=f"fc{i + 6}")(x))
    return BoxPredictor(self.num_classes, self.class_agnostic, name="predictor")(x)
