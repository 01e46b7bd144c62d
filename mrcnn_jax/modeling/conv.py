"""``Conv``: flax's ``nn.Conv``, with convolutions as matmuls where those run faster.

``conv_general_dilated`` is ``lax.conv_general_dilated`` except on CPU for
plain NHWC/HWIO convolutions (any kernel, stride and padding; no dilation,
no groups), which it computes as one matmul over the input's patches
(im2col): ``y = patches(x) @ w.reshape(kh * kw * C, O)``, with float32
accumulation. Its gradients are two more matmuls (``jax.custom_vjp``) whose
operands XLA:CPU reads row-major (given a transposed one, its 16-bit matmul
converts both to float32): at stride 1 the input gradient is the convolution
of the output gradient with the flipped kernel (another patch matmul; at
other strides, the patch gradient ``dy @ w^T`` summed back in float32 by the
transpose of the slicing); the weight gradient multiplies the output
gradient, transposed, by the input's patches (16-bit), or the patches sliced
from the channel-major input by the output gradient (float32). The patches are rebuilt in the backward pass rather
than stored (XLA computes them once where the forward pass is in the same
program); 16-bit patches are copied as 32-bit words (pairs of channels),
which XLA:CPU moves about twice as fast. ``form`` picks where it applies:

- ``"auto"``: convolutions of at least ``MIN_MACS`` multiply-adds, where the
  matmul measured faster (``scripts/benchmark_convs.py``; the table in
  docs/performance.md, "bfloat16"). In float32: every 1x1. In bfloat16 (whose
  matmul with float32 accumulation is XLA:CPU's fast bfloat16 path; its
  bfloat16 convolution runs at float32 speed) every plain convolution is the
  matmul form when differentiated, the forward pass's patches then serving
  the weight gradient too; its forward pass alone (inference) is the matmul
  for 1x1s and for kernels whose patch matrix is deep and short
  (``BF16_MATMUL_MIN_DEPTH``, ``BF16_MATMUL_MAX_ROWS``: ResNet's res4 and res5
  3x3s at 512 px), XLA's convolution elsewhere. Larger float32 kernels stay
  XLA's.
- ``"matmul"``: every plain convolution, whatever its size: for code inside
  ``lax.cond`` / ``lax.scan`` bodies (``modeling/chunked.py``), where XLA:CPU
  runs convolution gradients about 100x slower than at top level and
  matmuls at full speed.
- ``"xla"``: ``lax.conv_general_dilated`` always.

The choice is made by ``lax.platform_dependent``: the platform the program
is compiled for decides, so GPU and TPU run every convolution with their own
kernels and a program exported for several platforms keeps each its own form.
Measurements: docs/experiments.md ("Convolutions as matmuls"). Parameters
are those of ``nn.Conv``.
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
MIN_MACS = 10_000_000  # "auto": smaller convs (coarse levels, test models) stay XLA's
# "auto", bfloat16 kernels larger than 1x1: the matmul when kh * kw * Cin is at
# least this and batch * output pixels at most that. Forward and both gradients
# at 512 px, batch 2 (GFLOP/s, XLA's conv / the matmul): res4 3x3 256 over
# 2 x 32^2 134 / 146, res5 3x3 512 over 2 x 16^2 180 / 280; but FPN 3x3 256
# over 2 x 64^2 162 / 126, the mask head's 3x3 256 over 256 RoIs of 14^2
# 176 / 139, res3 3x3 128 over 2 x 64^2 154 / 88.
BF16_MATMUL_MIN_DEPTH = 2304
BF16_MATMUL_MAX_ROWS = 4096
FORMS = ("auto", "matmul", "xla")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, form="auto", **kwargs):
  """``lax.conv_general_dilated``; on CPU some convolutions are matmuls (see above)."""
  if form not in FORMS:
    raise ValueError(f"conv form: expected one of {FORMS}, got {form!r}")
  conv = lambda x, w: lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation,
                                               rhs_dilation, dimension_numbers,
                                               feature_group_count, precision=precision,
                                               **kwargs)
  pads = None
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if form != "xla" and not kwargs and feature_group_count == 1 and not dilated:
    pads = _plain_padding(lhs, rhs, window_strides, padding, dimension_numbers)
  forward = None if pads is None else (
      "matmul" if form == "matmul" else _auto_forward(lhs, rhs, tuple(window_strides), pads))
  if forward is None:
    return conv(lhs, rhs)
  # Chosen when the program is lowered (or, for a program exported for several
  # platforms, compiled) for its platform, not by the backend that traced it.
  return lax.platform_dependent(
      lhs, rhs, default=conv,
      cpu=lambda x, w: _conv_matmul(x, w, tuple(window_strides), pads, precision, forward))


def _plain_padding(lhs, rhs, strides, padding, dimension_numbers):
  """Explicit ((top, bottom), (left, right)) for a 2-D NHWC/HWIO convolution with
  non-negative padding (the forms the matmul computes); else None."""
  if (lhs.ndim != 4 or dimension_numbers is None
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  if any(p < 0 for pair in padding for p in pair):
    return None
  return padding


def _auto_forward(lhs, rhs, strides, padding):
  """``form="auto"``'s rule (module docstring): ``_conv_matmul``'s forward pass
  when not differentiated ("matmul" or "xla"), or None for XLA's convolution."""
  out_pixels = math.prod(_output_size(size, k, lo, hi, s) for size, k, (lo, hi), s
                         in zip(lhs.shape[1:3], rhs.shape[:2], padding, strides))
  rows = lhs.shape[0] * out_pixels
  if rows * math.prod(rhs.shape) < MIN_MACS:
    return None
  if rhs.shape[:2] == (1, 1):
    return "matmul"
  if lhs.dtype != jnp.bfloat16:
    return None
  deep_and_short = (math.prod(rhs.shape[:3]) >= BF16_MATMUL_MIN_DEPTH
                    and rows <= BF16_MATMUL_MAX_ROWS)
  return "matmul" if deep_and_short else "xla"


def _output_size(size, kernel, lo, hi, stride):
  return (size + lo + hi - kernel) // stride + 1


def _taps(x, kernel_size, strides, padding, axes):
  """The pixels each kernel tap (i, j) reads from ``x`` (spatial ``axes``), tap-major."""
  pads = [(0, 0)] * x.ndim
  pads[axes[0]], pads[axes[1]] = padding
  x = jnp.pad(x, pads)
  (kh, kw), (sh, sw) = kernel_size, strides
  oh = (x.shape[axes[0]] - kh) // sh + 1
  ow = (x.shape[axes[1]] - kw) // sw + 1
  taps = []
  for i in range(kh):
    for j in range(kw):
      index = [slice(None)] * x.ndim
      index[axes[0]] = slice(i, i + sh * (oh - 1) + 1, sh)
      index[axes[1]] = slice(j, j + sw * (ow - 1) + 1, sw)
      taps.append(x[tuple(index)])
  return taps


def _patches(x, kernel_size, strides, padding):
  """``x [N, H, W, C]`` -> the pixels each output reads ``[N, OH, OW, kh * kw * C]``.

  Tap-major: channel ``(i * kw + j) * C + c`` is input channel c at kernel
  offset (i, j), the order of ``w.reshape(kh * kw * C, O)`` for an HWIO ``w``.
  16-bit ``x`` with an even C is moved as 32-bit words (pairs of channels):
  XLA:CPU copies 16-bit elements about half as fast. Not differentiable
  there (``_conv_matmul`` has its own gradients).
  """
  if x.dtype.itemsize == 2 and x.shape[-1] % 2 == 0:
    words = lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), jnp.uint32)
    p = _patches(words, kernel_size, strides, padding)
    return lax.bitcast_convert_type(p, x.dtype).reshape(*p.shape[:-1], -1)
  taps = _taps(x, kernel_size, strides, padding, (1, 2))
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _flat_patches(x, kernel_size, strides, padding):
  """``_patches`` as a materialised ``[N * OH * OW, kh * kw * C]`` matrix: the
  barrier keeps XLA from fusing the slices into the matmul, which would take
  it off the library matmul (and the CPU's matrix units)."""
  p = _patches(x, kernel_size, strides, padding)
  if kernel_size != (1, 1):
    p = lax.optimization_barrier(p)
  return p.reshape(-1, p.shape[-1]), p.shape[:3]


def _flat_patches_t(x, kernel_size, strides, padding):
  """``_flat_patches`` transposed, ``[kh * kw * C, N * OH * OW]``, sliced from the
  channel-major input: the weight gradient's matmul then reads both operands
  row-major."""
  taps = _taps(jnp.moveaxis(x, -1, 0), kernel_size, strides, padding, (2, 3))
  p = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=0)  # (kh*kw*C, N, OH, OW)
  return p.reshape(p.shape[0], -1)


def _transposed(a):
  """``a.T`` of a 16-bit ``[R, K]`` with an even R, materialised row-major:
  transposed as 32-bit words (pairs of rows), behind a barrier. A 16-bit
  matmul reading a transposed operand is off XLA:CPU's fast path (it converts
  both to float32), and XLA folds a plain transpose into the matmul."""
  pairs = jnp.transpose(a.reshape(a.shape[0] // 2, 2, a.shape[1]), (2, 0, 1))
  words = lax.optimization_barrier(lax.bitcast_convert_type(pairs, jnp.uint32))
  return lax.bitcast_convert_type(words, a.dtype).reshape(a.shape[1], a.shape[0])


def _flipped_padding(kernel_size, strides, padding):
  """The padding under which the input gradient of a stride-1 convolution is the
  convolution of its output gradient with the flipped kernel; None where there
  is none (other strides, padding beyond the kernel)."""
  full = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_size, padding))
  if tuple(strides) != (1, 1) or min(min(pair) for pair in full) < 0:
    return None
  return full


def _dot(a, b, precision, contract=((1,), (0,))):
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_matmul(x, w, strides, padding, precision, forward="matmul"):
  """A convolution as matmuls: ``lax.conv_general_dilated``'s numbers.
  Differentiated, one matmul over the patches forward (which the weight
  gradient's matmul reuses) and two backward; not differentiated, ``forward``:
  "matmul" or "xla" (XLA's convolution, where that is faster alone)."""
  if forward == "xla":
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)
  p, lead = _flat_patches(x, w.shape[:2], strides, padding)
  y = _dot(p, w.reshape(-1, w.shape[-1]), precision)
  return y.reshape(*lead, -1).astype(x.dtype)


def _conv_matmul_fwd(x, w, strides, padding, precision, forward):
  del forward  # differentiated: the matmul, its patches shared with the weight gradient
  return _conv_matmul(x, w, strides, padding, precision, "matmul"), (x, w)


def _conv_matmul_bwd(strides, padding, precision, forward, residuals, dy):
  del forward
  x, w = residuals
  kernel_size, (c, o) = w.shape[:2], w.shape[2:]
  flat_dy = dy.reshape(-1, o)
  full = _flipped_padding(kernel_size, strides, padding)
  if full is not None:
    # dx = dy convolved with the flipped kernel, its in/out channels swapped.
    p, lead = _flat_patches(dy, kernel_size, (1, 1), full)
    flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3).reshape(-1, c)
    dx = _dot(p, flipped, precision).reshape(*lead, c)
  else:
    # The patch gradient dy @ w^T (contracting both on O: no transposed copy of
    # w), summed back in float32 by the transpose of the slicing.
    dp = _dot(flat_dy, w.reshape(-1, o), precision, ((1,), (1,)))
    unslice = jax.linear_transpose(lambda v: _patches(v, kernel_size, strides, padding),
                                   jax.ShapeDtypeStruct(x.shape, dp.dtype))
    dx, = unslice(dp.reshape(*dy.shape[:3], -1))
  if x.dtype.itemsize == 2 and flat_dy.shape[0] % 2 == 0:
    # dw^T = dy^T @ patches, both row-major; the barrier keeps XLA from folding
    # the final (small) transpose into the matmul by swapping its operands.
    p, _ = _flat_patches(x, kernel_size, strides, padding)
    dw = lax.optimization_barrier(_dot(_transposed(flat_dy), p, precision)).T
  else:
    dw = _dot(_flat_patches_t(x, kernel_size, strides, padding), flat_dy, precision)
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)

def conv_class(form: str = "auto"):
  """``Conv`` with convolutions in ``form`` (one of ``FORMS``)."""
  if form not in FORMS:
    raise ValueError(f"conv form: expected one of {FORMS}, got {form!r}")
  return functools.partial(nn.Conv, conv_general_dilated=functools.partial(
      conv_general_dilated, form=form))


Conv = conv_class("auto")


def accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None,
                             preferred_element_type=None, **kwargs):
  """``lax.dot_general`` accumulating in float32, rounded to the inputs' dtype.

  A bfloat16 matmul that accumulates (and returns) float32 takes XLA:CPU's
  fast bfloat16 path (its bfloat16-out matmul does not) and is what TPUs and
  GPUs do natively; in float32 it is the plain matmul. For
  ``nn.Dense(dot_general=...)``: on CPU a 16-bit ``x [..., K] @ w [K, N]``
  is ``matmul``, whose gradients stay on that path.
  """
  del preferred_element_type  # always float32, then the inputs' dtype
  dtype = jnp.result_type(lhs, rhs)
  dense = (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
           and lhs.dtype == rhs.dtype and dtype.itemsize == 2 and not kwargs)
  out = lambda x, w: lax.dot_general(x, w, dimension_numbers, precision=precision,
                                     preferred_element_type=jnp.float32, **kwargs).astype(dtype)
  if not dense:
    return out(lhs, rhs)
  return lax.platform_dependent(lhs, rhs, default=out,
                                cpu=lambda x, w: matmul(x, w, precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x, w, precision=None):
  """``x [..., K] @ w [K, N]`` accumulating in float32, in ``x``'s dtype, with
  gradients whose matmuls read their operands row-major: the weight gradient
  as ``x^T @ dy`` with ``x^T`` materialised (``_transposed``) where ``x`` is
  16-bit, a transposed operand taking XLA:CPU's 16-bit matmul off its fast path."""
  return _dot(x.reshape(-1, x.shape[-1]), w, precision).reshape(
      *x.shape[:-1], w.shape[-1]).astype(x.dtype)


def _matmul_fwd(x, w, precision):
  return matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, dy):
  x, w = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dx = _dot(dy2, w, precision, ((1,), (1,))).reshape(x.shape)
  if x.dtype.itemsize == 2 and x2.shape[0] % 2 == 0:
    dw = _dot(_transposed(x2), dy2, precision)
  else:
    dw = _dot(x2, dy2, precision, ((0,), (0,)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


Dense = functools.partial(nn.Dense, dot_general=accumulating_dot_general)




def conv_stack(x: jnp.ndarray, num_convs: int, dim: int, name: str, norm: str = "none",
               dtype=jnp.float32, train: bool = False, bn_groups: int = 1,
               form: str = "auto") -> jnp.ndarray:
  """The RoI heads' conv tower: ``num_convs`` x (3x3 conv of ``dim``, norm, ReLU).

  Call it from a compact module's ``__call__``. Conv i is named
  ``name.format(i + 1)``, its norm that name + ``"_norm"``. ``norm`` is
  detectron2's ROI_BOX_HEAD.NORM / ROI_MASK_HEAD.NORM: "none" (convs with a
  bias), "gn" (GroupNorm after bias-free convs, as in its GN configs) or "bn"
  (BatchNorm over the batch's RoIs, ``bn_groups`` groups of them, batch
  statistics when ``train``: its SyncBN configs with stats_mode "N").
  ``form``: how the convolutions are computed (``FORMS``).
  """
  if norm not in BOX_HEAD_NORMS:
    raise ValueError(f"head norm: expected one of {BOX_HEAD_NORMS}, got {norm!r}")
  conv = conv_class(form)
  for i in range(num_convs):
    conv_name = name.format(i + 1)
    x = conv(dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=norm == "none",
             kernel_init=msra_init, dtype=dtype, name=conv_name)(x)
    x = nn.relu(make_norm(norm, dim, train, dtype, conv_name + "_norm", bn_groups=bn_groups)(x))
  return x
