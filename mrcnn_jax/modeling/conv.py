"""``Conv``: flax's ``nn.Conv`` with 1x1 convolutions as matmuls on CPU.

XLA:CPU runs a 1x1 convolution, and more so its gradients, slower than the
matmul it is. Measured on the 2-core CPU (2026-11-28, XLA's own convolutions,
see ``mrcnn_jax.xla_flags``; forward / forward and both gradients, ms):
ResNet's 256->64 1x1 over 2 x 128x128 7.9 / 32.9 as a convolution, 4.5 / 22.2
here; its strided 512->1024 shortcut 7.5 / 32.5 -> 8.5 / 18.4; the mask
predictor (256->80 over 256 RoIs of 28x28) 49 / 229 -> 58 / 200; the RPN's
256->3 objectness over 2 x 128x128 1.8 / 24.9 -> 0.9 / 10.6.

``conv_general_dilated`` is ``lax.conv_general_dilated`` except for plain
NHWC/HWIO 1x1 convolutions (any stride and padding, no dilation, no groups)
on CPU (``lax.platform_dependent``: the platform the program is compiled
for decides, so a program exported for CPU, GPU and TPU keeps each its
own form): those are one matmul over the (padded, strided) pixels,
with the weight gradient as one matmul that reads the output gradient
transposed (``jax.custom_vjp``; autodiff's own form of it was 1.1-1.6x
slower). Larger kernels stay XLA's: with XLA's own convolutions their weight
gradient beats one matmul per kernel tap (the mask head's 3x3 256->256,
forward and gradients: 482 ms against 637 ms), which an earlier version of
this module computed when XLA:CPU ran convolutions through YNNPACK. GPU and
TPU run every convolution with their own kernels. Convolutions under
``MIN_MACS`` multiply-adds also stay lax's: there the extra ops cost more
compile time than they save (the test suite's tiny models). Parameters are
those of ``nn.Conv``.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax.modeling.norm import BOX_HEAD_NORMS, make_norm

# He normal over fan_out: torchvision's ResNet init and detectron2's c2_msra_fill
# (box, mask and keypoint head convs). Transposed convs use deconv.msra_fill.
msra_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_NHWC = ("NHWC", "HWIO", "NHWC")
MIN_MACS = 10_000_000  # tiny convs (predictors on coarse levels, test models) stay lax's


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """``lax.conv_general_dilated``; on CPU plain 1x1 convs are matmuls (see above)."""
  pads = None
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if not kwargs and feature_group_count == 1 and not dilated:
    pads = _pointwise_padding(lhs, rhs, window_strides, padding, dimension_numbers)
  conv = lambda x, w: lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation,
                                               rhs_dilation, dimension_numbers,
                                               feature_group_count, precision=precision,
                                               **kwargs)
  if pads is None:
    return conv(lhs, rhs)
  # Chosen when the program is lowered (or, for a program exported for several
  # platforms, compiled) for its platform, not by the backend that traced it.
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, w: _pointwise(x, w, tuple(window_strides), pads, precision),
      default=conv)


def _pointwise_padding(lhs, rhs, strides, padding, dimension_numbers):
  """Explicit ((top, bottom), (left, right)) where the matmul form applies.

  It applies to NHWC/HWIO 2-D convolutions with a 1x1 kernel, non-negative
  padding and at least ``MIN_MACS`` multiply-adds (on CPU: see
  ``conv_general_dilated``); else None.
  """
  if (lhs.ndim != 4 or rhs.shape[:2] != (1, 1)
      or dimension_numbers is None
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple(tuple(p) for p in padding)
  if any(p < 0 for pair in padding for p in pair):
    return None
  out_pixels = math.prod((size + lo + hi - 1) // s + 1
                         for size, (lo, hi), s in zip(lhs.shape[1:3], padding, strides))
  if lhs.shape[0] * out_pixels * math.prod(rhs.shape) < MIN_MACS:
    return None
  return padding


def _pixels(x, strides, padding):
  """The input pixels a 1x1 kernel reads: ``x`` padded, then strided."""
  (top, bottom), (left, right) = padding
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  return x[:, ::strides[0], ::strides[1]]


def _matmul(x, w, strides, padding, precision):
  return jnp.einsum("nhwc,co->nhwo", _pixels(x, strides, padding), w[0, 0], precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pointwise(x, w, strides, padding, precision):
  """A 1x1 convolution as one matmul: the same numbers as ``lax.conv_general_dilated``."""
  return _matmul(x, w, strides, padding, precision)


def _pointwise_fwd(x, w, strides, padding, precision):
  return _matmul(x, w, strides, padding, precision), (x, w)


def _pointwise_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  pixels, pixels_vjp = jax.vjp(lambda v: _pixels(v, strides, padding), x)
  dx, = pixels_vjp(jnp.einsum("nhwo,co->nhwc", dy, w[0, 0], precision=precision))
  c, o = w.shape[2:]
  # [O, N*H*W] @ [N*H*W, C]: the output gradient transposed once, so that the
  # matmul reads both operands in the order XLA:CPU's matmul wants.
  dw = jnp.matmul(dy.reshape(-1, o).T, pixels.reshape(-1, c), precision=precision,
                  preferred_element_type=jnp.float32)
  return dx, dw.T.reshape(w.shape).astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def conv_stack(x: jnp.ndarray, num_convs: int, dim: int, name: str, norm: str = "none",
               dtype=jnp.float32, train: bool = False, bn_groups: int = 1) -> jnp.ndarray:
  """The RoI heads' conv tower: ``num_convs`` x (3x3 conv of ``dim``, norm, ReLU).

  Call it from a compact module's ``__call__``. Conv i is named
  ``name.format(i + 1)``, its norm that name + ``"_norm"``. ``norm`` is
  detectron2's ROI_BOX_HEAD.NORM / ROI_MASK_HEAD.NORM: "none" (convs with a
  bias), "gn" (GroupNorm after bias-free convs, as in its GN configs) or "bn"
  (BatchNorm over the batch's RoIs, ``bn_groups`` groups of them, batch
  statistics when ``train``: its SyncBN configs with stats_mode "N").
  """
  if norm not in BOX_HEAD_NORMS:
    raise ValueError(f"head norm: expected one of {BOX_HEAD_NORMS}, got {norm!r}")
  for i in range(num_convs):
    conv_name = name.format(i + 1)
    x = Conv(dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=norm == "none",
             kernel_init=msra_init, dtype=dtype, name=conv_name)(x)
    x = nn.relu(make_norm(norm, dim, train, dtype, conv_name + "_norm", bn_groups=bn_groups)(x))
  return x
