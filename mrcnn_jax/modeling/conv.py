"""``Conv``: flax's ``nn.Conv`` with a fast weight gradient on CPU.

XLA:CPU computes a convolution's weight gradient (the "backward filter"
convolution, contracting over batch and positions) at a fraction of its
forward speed. Measured on the 2-core CPU for a 3x3 256->256 conv over 256
RoIs of 14x14: forward 137 GFLOP/s, input gradient 135, weight gradient 32.
Written as one matmul per kernel tap (the inputs shifted by the tap, times
the output gradient, summed over batch and positions) the same weight
gradient runs at 161 GFLOP/s.

``conv_general_dilated`` is ``lax.conv_general_dilated`` with that weight
gradient (``jax.custom_vjp``; the input gradient stays XLA's) for the plain
NHWC/HWIO convolutions the models use (any stride and padding, no dilation,
no groups), on the CPU backend only: GPU and TPU compute both gradients with
their own fast kernels, so there and for any other convolution it is
``lax.conv_general_dilated`` itself. Convolutions under ``MIN_MACS``
multiply-adds also stay lax's: there the extra ops cost more compile time
than they save (the test suite's tiny models). So do kernels larger than 1x1
with fewer than ``MIN_CHANNELS`` input channels, whose weight gradient XLA
computes faster than the per-tap matmuls (measured: see ``MIN_CHANNELS``).
Parameters are those of ``nn.Conv``.
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
# this many input channels. Measured on the 2-core CPU, fwd+bwd of one conv,
# per-tap / XLA's time: 1x1 convs 0.72-0.77; 3x3 with 256-512 input channels
# 0.61-1.15 (RoI heads and FPN at 256: 0.61-0.64); 3x3 with 32-128 mostly
# 1.1-1.9 (ResNet's 64->64 at 128x128: 1.86; the shapes config's box head,
# 64->64 on 1024 RoIs of 7x7: 1.12), a few small ones 0.67-0.93.
MIN_CHANNELS = 256


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """``lax.conv_general_dilated``; on CPU plain 2-D convs get the fast weight gradient."""
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
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


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
  taps = []
  for i in range(kh):
    for j in range(kw):
      # The inputs tap (i, j) multiplies, at every output position: [N, Ho, Wo, C].
      shifted = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                          (1, sh, sw, 1))
      taps.append(jnp.einsum("nhwc,nhwo->co", shifted, dy, precision=precision,
                             preferred_element_type=jnp.float32))
  dw = jnp.stack(taps).reshape(kh, kw, c, o).astype(w.dtype)
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
