"""ResNet backbones (He et al. 2016) returning C2..C5, torchvision's layout.

The stride of a downsampling bottleneck sits on its 3x3 conv (torchvision,
"ResNet v1.5"), so torchvision ImageNet weights import; ``stride_in_1x1``
moves it to the first 1x1 conv as in the original MSRA weights detectron2
ships. Parameter names mirror torchvision's (``layer1/0/conv1`` for
``layer1.0.conv1``), with norms named ``norm1..3`` whatever their kind.

Given an image extent (see padding.py), the stem's input, the max pool's
input and output and every block's output are zeroed outside it, and norms
take their statistics inside it, so an image's features do not depend on
its canvas.

Stages are frozen the detectron2 way (``freeze_at``: 0 nothing, 1 the stem,
2 the stem and res2, ...): their outputs pass through ``stop_gradient``, and
``frozen_prefixes`` names their parameters so the optimiser can leave them
untouched (weight decay included).
"""

from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import padding
from mrcnn_jax.modeling.conv import Conv, msra_init
from mrcnn_jax.modeling.norm import make_norm

# depth -> (block kind, blocks per stage res2..res5)
ARCHS = {
    "tiny": ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def arch(depth) -> Tuple[str, Tuple[int, ...]]:
  """(block kind, blocks per stage) of a ResNet depth, with a clear error."""
  key = depth if depth == "tiny" else int(depth)
  if key not in ARCHS:
    raise ValueError(f"depth: expected one of {sorted(map(str, ARCHS))}, got {depth!r}")
  return ARCHS[key]


def stage_channels(depth, width: int = 64) -> Tuple[int, ...]:
  """Output channels of res2..res5."""
  kind, _ = arch(depth)
  expansion = 4 if kind == "bottleneck" else 1
  return tuple(width * expansion * 2 ** i for i in range(4))


def conv(features, kernel, stride=1, use_bias=False, dtype=jnp.float32, name=None):
  """A conv with torchvision's symmetric ``kernel // 2`` padding (not XLA's SAME)."""
  pad = kernel // 2
  return Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
              use_bias=use_bias, kernel_init=msra_init, dtype=dtype, name=name)


class Block(nn.Module):
  """A residual block: ``basic`` (two 3x3) or ``bottleneck`` (1x1, 3x3, 1x1 x4)."""
  kind: str = "bottleneck"
  width: int = 64  # channels of the block's inner convs
  stride: int = 1
  norm: str = "frozen_bn"
  stride_in_1x1: bool = False  # MSRA/detectron2 weights put the stride here
  zero_init_residual: bool = False  # start each block as the identity
  train: bool = False
  dtype: jnp.dtype = jnp.float32
  bn_groups: int = 1  # "bn": statistics groups of the batch (batch_norm.py)

  @nn.compact
  def __call__(self, x, image_extent=None, in_stride: int = 1):
    """``x`` at ``in_stride`` (zero outside ``image_extent`` if given) -> the block's output.

    The output is zeroed outside the extent too, so the next block's 3x3
    convs read zeros there.
    """
    bias = self.norm == "none"
    mask_in = padding.valid_mask(x, image_extent, in_stride)
    mask_out = padding.valid_mask(x[:, ::self.stride, ::self.stride], image_extent,
                                  in_stride * self.stride)

    def norm(c, name, y, mask, zero=False):
      layer = make_norm(self.norm, c, self.train, self.dtype, name,
                        zero_init=zero and self.zero_init_residual, bn_groups=self.bn_groups)
      return layer(y, mask=padding.norm_mask(y, mask))

    if self.kind == "bottleneck":
      out_c = self.width * 4
      s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
      mask_mid = mask_out if self.stride_in_1x1 else mask_in
      y = nn.relu(norm(self.width, "norm1",
                       conv(self.width, 1, s1, bias, self.dtype, "conv1")(x), mask_mid))
      y = padding.zero_outside(y, mask_mid)  # conv2 is 3x3
      y = nn.relu(norm(self.width, "norm2",
                       conv(self.width, 3, s3, bias, self.dtype, "conv2")(y), mask_out))
      y = norm(out_c, "norm3", conv(out_c, 1, 1, bias, self.dtype, "conv3")(y), mask_out, True)
    else:
      out_c = self.width
      y = nn.relu(norm(out_c, "norm1", conv(out_c, 3, self.stride, bias, self.dtype,
                                            "conv1")(x), mask_out))
      y = padding.zero_outside(y, mask_out)
      y = norm(out_c, "norm2", conv(out_c, 3, 1, bias, self.dtype, "conv2")(y), mask_out, True)
    if self.stride != 1 or x.shape[-1] != out_c:
      x = norm(out_c, "downsample_norm",
               conv(out_c, 1, self.stride, bias, self.dtype, "downsample_conv")(x), mask_out)
    return padding.zero_outside(nn.relu(y + x), mask_out)


class Stage(nn.Module):
  """``num_blocks`` blocks; the first one carries the stride."""
  kind: str = "bottleneck"
  num_blocks: int = 3
  width: int = 64
  stride: int = 1
  norm: str = "frozen_bn"
  stride_in_1x1: bool = False
  zero_init_residual: bool = False
  train: bool = False
  dtype: jnp.dtype = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, image_extent=None, in_stride: int = 1):
    for i in range(self.num_blocks):
      stride = self.stride if i == 0 else 1
      x = Block(self.kind, self.width, stride, self.norm,
                self.stride_in_1x1, self.zero_init_residual, self.train, self.dtype,
                bn_groups=self.bn_groups, name=str(i))(x, image_extent, in_stride)
      in_stride *= stride
    return x


class ResNet(nn.Module):
  """ResNet trunk: ``images [B, H, W, 3] -> {"c2": stride 4, ..., "c5": stride 32}``."""
  depth: int | str = 50  # 18, 34, 50, 101 or "tiny" (one basic block per stage)
  width: int = 64  # stem channels; stage i has width * 2**i inner channels
  norm: str = "frozen_bn"  # see norm.py
  freeze_at: int = 2  # detectron2's default: stem and res2 frozen
  num_stages: int = 4  # 3 stops after res4 (the C4 design runs res5 in its head)
  stride_in_1x1: bool = False
  zero_init_residual: bool = False
  dtype: jnp.dtype = jnp.float32  # compute dtype; params stay float32
  bn_groups: int = 1  # "bn": statistics groups of the batch (batch_norm.py)

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False,
               image_extent: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
    """``image_extent [B, 2]``: masked padding outside it (padding.py); None: none."""
    kind, blocks = arch(self.depth)
    x = images.astype(self.dtype)
    x = padding.zero_outside(x, padding.valid_mask(x, image_extent, 1))
    x = conv(self.width, 7, 2, self.norm == "none", self.dtype, "conv1")(x)
    mask = padding.valid_mask(x, image_extent, 2)
    x = nn.relu(make_norm(self.norm, self.width, train, self.dtype, "norm1",
                          bn_groups=self.bn_groups)(
        x, mask=padding.norm_mask(x, mask)))
    # Zeros, not -inf, outside: after the ReLU they never win the max (as
    # the references' -inf padding never does).
    x = nn.max_pool(padding.zero_outside(x, mask), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    # The pool's windows at the extent's edge reach inside it: zero what lies past it.
    x = padding.zero_outside(x, padding.valid_mask(x, image_extent, 4))
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    stride = 4
    for i in range(self.num_stages):
      x = Stage(kind, blocks[i], self.width * 2 ** i, 1 if i == 0 else 2, self.norm,
                self.stride_in_1x1, self.zero_init_residual, train, self.dtype,
                bn_groups=self.bn_groups, name=f"layer{i + 1}")(x, image_extent, stride)
      stride *= 1 if i == 0 else 2
      if self.freeze_at >= i + 2:
        x = jax.lax.stop_gradient(x)
      outputs[f"c{i + 2}"] = x
    return outputs


def frozen_prefixes(freeze_at: int) -> Sequence[str]:
  """Top-level parameter names of a ResNet that ``freeze_at`` freezes."""
  names = ["conv1", "norm1"] if freeze_at >= 1 else []
  return names + [f"layer{i}" for i in range(1, min(freeze_at, 5))]
