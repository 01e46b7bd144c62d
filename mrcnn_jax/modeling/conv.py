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
  for 1x1s and for kernels whose patch matrix is deep
  (``BF16_MATMUL_MIN_DEPTH``: 3x3s of 256 channels and up) at stride 1 or
  over few pixels (``BF16_MATMUL_MAX_ROWS``), XLA's convolution elsewhere.
  16-bit stride-1 patch matmuls over many pixels run in bands of output rows
  whose patches stay in cache (``BAND_ROWS``). Larger float32 kernels stay
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
# "auto", bfloat16 kernels larger than 1x1, forward alone (inference): the
# matmul when kh * kw * Cin is at least this and the convolution has stride 1
# (in bands, below) or at most that many output pixels (batch included).
# Forward at 512 px, batch 2 (GFLOP/s, XLA's conv / one matmul): res4 3x3 256
# over 2 x 32^2 175 / 229, res5 3x3 512 over 2 x 16^2 165 / 232, the keypoint
# head 144 / 207; res3 3x3 128 (depth 1152) 187 / 142.
BF16_MATMUL_MIN_DEPTH = 2304
BF16_MATMUL_MAX_ROWS = 4096
# 16-bit stride-1 patch matmuls over more output pixels run band by band of
# output rows, at most this many pixels each: a 2048 x 2304 bfloat16 patch
# matrix (9.4 MB) stays in cache; over all rows at once (151 MB on P2) the
# copies run at memory speed. Forward at 512 px (GFLOP/s, XLA's conv / one
# matmul / bands): P2 3x3 256 182 / 172 / 274, P3 204 / 179 / 321, the mask
# head's 3x3 over 32 RoIs 177 / 159 / 308.
BAND_ROWS = 2048
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
  deep = math.prod(rhs.shape[:3]) >= BF16_MATMUL_MIN_DEPTH
  short_or_banded = rows <= BF16_MATMUL_MAX_ROWS or tuple(strides) == (1, 1)
  return "matmul" if deep and short_or_banded else "xla"


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


def _dot_tn(a, b, precision):
  """``a^T @ b`` in float32: for 16-bit ``a`` with an even row count, ``a^T``
  materialised (``_transposed``) and both operands read row-major."""
  if a.dtype.itemsize == 2 and a.shape[0] % 2 == 0:
    return _dot(_transposed(a), b, precision)
  return _dot(a, b, precision, ((0,), (0,)))


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


def _bands(x, kernel_size, strides, padding):
  """How ``_patch_matmul`` splits a 16-bit stride-1 convolution into bands of
  output rows whose patch matrices stay cache-sized (``BAND_ROWS`` rows):
  ``(band height, number of bands)``, or None for one matmul over all rows."""
  n, h, w = x.shape[:3]
  oh, ow = (_output_size(size, k, lo, hi, 1) for size, k, (lo, hi)
            in zip((h, w), kernel_size, padding))
  if (x.dtype.itemsize != 2 or tuple(strides) != (1, 1) or tuple(kernel_size) == (1, 1)
      or n * oh * ow <= BAND_ROWS):
    return None
  band = max([b for b in range(1, oh + 1) if oh % b == 0 and n * b * ow <= BAND_ROWS],
             default=1)
  return band, oh // band


def _patch_matmul(x, w2d, kernel_size, strides, padding, precision, banded=False):
  """``patches(x) @ w2d`` accumulated in float32, rounded to ``x``'s dtype:
  ``[N, OH, OW, O]``. ``banded``: band by band of output rows where ``_bands``
  says (a ``lax.map``; each band reads its rows of the row-padded input). For
  forward passes alone: differentiated, one matmul over all rows shares its
  patches with the weight gradient's (the bands measured slower there)."""
  def whole(inputs, strides, padding):
    p, lead = _flat_patches(inputs, kernel_size, strides, padding)
    return _dot(p, w2d, precision).astype(inputs.dtype).reshape(*lead, -1)

  bands = _bands(x, kernel_size, strides, padding) if banded else None
  if bands is None:
    return whole(x, strides, padding)
  (band, count), kh = bands, kernel_size[0]
  rows = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0)))

  def one(i):
    part = lax.dynamic_slice_in_dim(rows, i * band, band + kh - 1, axis=1)
    return whole(part, (1, 1), ((0, 0), padding[1]))

  y = lax.map(one, jnp.arange(count))  # [count, N, band, OW, O]
  return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], count * band, *y.shape[3:])


def _weight_gradient(x, dy, kernel_size, strides, padding, precision):
  """``patches(x)^T @ dy`` in float32, ``[kh * kw * C, O]``. 16-bit, over an even
  number of pixels: ``(dy^T @ patches)^T`` with both operands row-major (the
  barrier keeps XLA from folding the final, small, transpose into the matmul by
  swapping its operands); else the channel-major patches times dy."""
  flat_dy = dy.reshape(-1, dy.shape[-1])
  if x.dtype.itemsize != 2 or flat_dy.shape[0] % 2:
    return _dot(_flat_patches_t(x, kernel_size, strides, padding), flat_dy, precision)
  p, _ = _flat_patches(x, kernel_size, strides, padding)
  return lax.optimization_barrier(_dot_tn(flat_dy, p, precision)).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_matmul(x, w, strides, padding, precision, forward="matmul"):
  """A convolution as matmuls: ``lax.conv_general_dilated``'s numbers.
  Differentiated, one matmul over the patches forward and two backward; not
  differentiated, ``forward``: "matmul" (in bands where ``_bands`` says) or
  "xla" (XLA's convolution, where that is faster alone)."""
  if forward == "xla":
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)
  return _patch_matmul(x, w.reshape(-1, w.shape[-1]), w.shape[:2], strides, padding, precision,
                       banded=True)


def _conv_matmul_fwd(x, w, strides, padding, precision, forward):
  del forward  # differentiated: one matmul, its patches shared with the weight gradient
  y = _patch_matmul(x, w.reshape(-1, w.shape[-1]), w.shape[:2], strides, padding, precision)
  return y, (x, w)


def _conv_matmul_bwd(strides, padding, precision, forward, residuals, dy):
  del forward
  x, w = residuals
  kernel_size, (c, o) = w.shape[:2], w.shape[2:]
  full = _flipped_padding(kernel_size, strides, padding)
  if full is not None:
    # dx = dy convolved with the flipped kernel, its in/out channels swapped.
    flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3).reshape(-1, c)
    dx = _patch_matmul(dy, flipped, kernel_size, (1, 1), full, precision)
  else:
    # The patch gradient dy @ w^T (contracting both on O: no transposed copy of
    # w), summed back in float32 by the transpose of the slicing.
    dp = _dot(dy.reshape(-1, o), w.reshape(-1, o), precision, ((1,), (1,)))
    unslice = jax.linear_transpose(lambda v: _patches(v, kernel_size, strides, padding),
                                   jax.ShapeDtypeStruct(x.shape, dp.dtype))
    dx, = unslice(dp.reshape(*dy.shape[:3], -1))
  dw = _weight_gradient(x, dy, kernel_size, strides, padding, precision)
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
  as ``x^T @ dy`` with ``x^T`` materialised where ``x`` is 16-bit (``_dot_tn``),
  a transposed operand taking XLA:CPU's 16-bit matmul off its fast path."""
  return _dot(x.reshape(-1, x.shape[-1]), w, precision).reshape(
      *x.shape[:-1], w.shape[-1]).astype(x.dtype)


def _matmul_fwd(x, w, precision):
  return matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, dy):
  x, w = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dx = _dot(dy2, w, precision, ((1,), (1,))).reshape(x.shape)
  return dx.astype(x.dtype), _dot_tn(x2, dy2, precision).astype(w.dtype)


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
