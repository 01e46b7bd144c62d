"""``Conv``: flax's ``nn.Conv`` with faster 1x1 convolutions and weight gradients on CPU.

XLA:CPU computes a convolution's weight gradient (the "backward filter"
convolution, contracting over batch and positions) at a fraction of its
forward speed, and a 1x1 convolution at a fraction of the speed of the
matmul it is. Measured on the 2-core CPU (2026-11-27, fwd or one gradient):
- a 3x3 256->256 conv's weight gradient over 256 RoIs of 14x14: XLA's 902 ms;
  written as one matmul per kernel tap (the inputs shifted by the tap, times
  the output gradient, summed over batch and positions) 654 ms; the same with
  the output gradient transposed once to ``[O, N*H*W]``, so each tap's matmul
  reads both operands in the order XLA:CPU's matmul wants, 422 ms (here);
- the mask predictor, a 1x1 256->80 conv over 256 RoIs of 28x28: forward
  227 ms as XLA's convolution, 55 ms as a matmul; input gradient 165 -> 74 ms;
  weight gradient 774 ms (XLA's) -> 54 ms (here). A 1x1 256->256 over 2 x
  128x128: 48 -> 25 ms forward.

``conv_general_dilated`` is ``lax.conv_general_dilated`` with that weight
gradient (``jax.custom_vjp``; the input gradient is XLA's gradient of the
forward pass) for the plain NHWC/HWIO convolutions the models use (any
stride and padding, no dilation, no groups), on the CPU backend only, and
computes 1x1 kernels as matmuls over the (padded, strided) pixels. GPU and
TPU run convolutions and both gradients with their own fast kernels, so
there and for any other convolution it is ``lax.conv_general_dilated``
itself. Convolutions under ``MIN_MACS`` multiply-adds also stay lax's: there
the extra ops cost more compile time than they save (the test suite's tiny
models). So do kernels larger than 1x1 with fewer than ``MIN_CHANNELS``
input channels, whose weight gradient XLA computes about as fast (measured:
see ``MIN_CHANNELS``). Parameters are those of ``nn.Conv``.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax.modeling.norm import HEAD_NORMS, make_norm

# He normal over fan_out: torchvision's ResNet init and detectron2's c2_msra_fill
# (box, mask and keypoint head convs). Transposed convs use deconv.msra_fill.
msra_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_NHWC = ("NHWC", "HWIO", "NHWC")
MIN_MACS = 10_000_000  # tiny convs (predictors on coarse levels, test models) stay lax's
# Kernels larger than 1x1 take the per-tap weight gradient only with at least
# this many input channels. Measured on the 2-core CPU, weight gradient alone,
# per-tap (with the transposed output gradient) / XLA's time: 3x3 256->256
# over 256 RoIs of 14x14 0.47, over 2 x 32x32 0.69, 2 x 128x128 0.28; below
# 256 channels mixed: 128->128 over 2 x 64x64 0.83, 32->32 over 8 x 32x32
# 0.81, but 64->64 over 8 x 16x16 1.28, 128->128 over 8 x 8x8 1.15 and the
# shapes config's box head (64->64 on 512 RoIs of 7x7) 1.11.
MIN_CHANNELS = 256


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """``lax.conv_general_dilated``; on CPU plain 2-D convs get the fast paths above."""
  pads = None
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if not kwargs and feature_group_count == 1 and not dilated:
    pads = _plain_padding(lhs, rhs, window_strides, padding, dimension_numbers)
  if pads is None:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  return _conv(lhs, rhs, tuple(window_strides), pads, precision)


def _plain_padding(lhs, rhs, strides, padding, dimension_numbers):
  """Explicit ((top, bottom), (left, right)) where the per-tap weight gradient applies.

  It applies on the CPU backend to NHWC/HWIO 2-D convolutions with
  non-negative padding, at least ``MIN_MACS`` multiply-adds and, for kernels
  larger than 1x1, at least ``MIN_CHANNELS`` input channels; else None.
  """
  if (jax.default_backend() != "cpu" or lhs.ndim != 4 or dimension_numbers is None
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple(tuple(p) for p in padding)
  if any(p < 0 for pair in padding for p in pair):
    return None
  if math.prod(rhs.shape[:2]) > 1 and rhs.shape[2] < MIN_CHANNELS:
    return None
  out_positions = math.prod(
      (size + lo + hi - k) // s + 1
      for size, (lo, hi), k, s in zip(lhs.shape[1:3], padding, rhs.shape[:2], strides))
  if lhs.shape[0] * out_positions * math.prod(rhs.shape) < MIN_MACS:
    return None
  return padding


def _plain_conv(x, w, strides, padding, precision):
  if w.shape[:2] == (1, 1):
    return _pointwise(x, w, strides, padding, precision)
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _pointwise(x, w, strides, padding, precision):
  """A 1x1 convolution as one matmul over the (padded, strided) pixels.

  The same numbers as ``lax.conv_general_dilated``; XLA:CPU runs the matmul,
  and its input gradient, 2-4x faster than its own 1x1 convolution.
  """
  (top, bottom), (left, right) = padding
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))[:, ::strides[0], ::strides[1]]
  return jnp.einsum("nhwc,co->nhwo", x, w[0, 0], precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return _plain_conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _plain_conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda v: _plain_conv(v, w, strides, padding, precision), x)
  dx, = input_vjp(dy)
  kh, kw, c, o = w.shape
  n, ho, wo = dy.shape[:3]
  (top, bottom), (left, right) = padding
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  sh, sw = strides
  # The output gradient transposed once, [O, N*Ho*Wo], so that every tap's
  # matmul below reads both operands in the order XLA:CPU's matmul wants.
  dy_t = dy.reshape(n * ho * wo, o).T
  taps = []
  for i in range(kh):
    for j in range(kw):
      # The inputs tap (i, j) multiplies, at every output position: [N*Ho*Wo, C].
      shifted = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                          (1, sh, sw, 1))
      taps.append(jnp.matmul(dy_t, shifted.reshape(n * ho * wo, c), precision=precision,
                             preferred_element_type=jnp.float32))  # [O, C]
  dw = jnp.stack(taps).transpose(0, 2, 1).reshape(kh, kw, c, o).astype(w.dtype)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def conv_stack(x: jnp.ndarray, num_convs: int, dim: int, name: str, norm: str = "none",
               dtype=jnp.float32) -> jnp.ndarray:
  """The RoI heads' conv tower: ``num_convs`` x (3x3 conv of ``dim``, norm, ReLU).

  Call it from a compact module's ``__call__``. Conv i is named
  ``name.format(i + 1)``, its norm that name + ``"_norm"``. ``norm`` is
  detectron2's ROI_BOX_HEAD.NORM / ROI_MASK_HEAD.NORM: "none" (convs with a
  bias) or "gn" (GroupNorm after bias-free convs, as in its GN configs).
  """
  if norm not in HEAD_NORMS:
    raise ValueError(f"head norm: expected one of {HEAD_NORMS}, got {norm!r}")
  for i in range(num_convs):
    conv_name = name.format(i + 1)
    x = Conv(dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=norm == "none",
             kernel_init=msra_init, dtype=dtype, name=conv_name)(x)
    x = nn.relu(make_norm(norm, dim, False, dtype, conv_name + "_norm")(x))
  return x
