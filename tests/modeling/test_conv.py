"""modeling/conv.py: convolutions as matmuls on CPU equal XLA's, and Conv is nn.Conv otherwise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mrcnn_jax.modeling import conv


@pytest.fixture(autouse=True)
def _always_fast_path(monkeypatch):
  """These shapes are tiny: take the matmul form whatever their size."""
  monkeypatch.setattr(conv, "MIN_MACS", 0)


def _lax(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("form", ["auto", "matmul"])
@pytest.mark.parametrize("kernel,strides,padding", [
    (1, (1, 1), "SAME"),             # laterals, predictors
    (1, (2, 2), ((0, 0), (0, 0))),   # ResNet's strided 1x1 shortcut
    (1, (2, 3), ((1, 0), (2, 1))),   # a padded 1x1, uneven strides
    (1, (3, 2), "SAME"),             # strides that do not divide the input
    (3, (1, 1), ((1, 1), (1, 1))),   # the heads' 3x3 ("auto": lax's own in float32)
    (3, (2, 2), ((1, 1), (1, 1))),   # ResNet's strided 3x3
    (7, (2, 2), ((3, 3), (3, 3))),   # the stem
    (2, (1, 2), "VALID"),
])
def test_value_and_gradients_equal_xla(rng, kernel, strides, padding, form):
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  pads = (padding if not isinstance(padding, str)
          else lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding))
  ours_fn = lambda x, w: conv.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), form=form)
  got = jax.jit(ours_fn)(x, w)
  want = _lax(x, w, strides, pads)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * cot)
  ours = jax.jit(jax.grad(loss(ours_fn), (0, 1)))(x, w)
  theirs = jax.grad(loss(lambda x, w: _lax(x, w, strides, pads)), (0, 1))(x, w)
  for name, a, b in zip(("input", "weight"), ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_weight_gradient_by_hand():
  """1x1 conv, one pixel: dL/dw[c, o] = x[c] * dy[o]."""
  x = jnp.array([[[[2.0, -1.0]]]])
  w = jnp.zeros((1, 1, 2, 3))
  dy = jnp.array([1.0, 0.5, -2.0])
  g = jax.grad(lambda w: jnp.sum(conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) * dy))(w)
  np.testing.assert_allclose(g[0, 0], [[2.0, 1.0, -4.0], [-1.0, -0.5, 2.0]])


def test_bfloat16_gradient_dtype(rng):
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(1, 1, 4, 4)), jnp.bfloat16)
  f = lambda x, w: jnp.sum(conv.conv_general_dilated(
      x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
                           .astype(jnp.float32))
  gx, gw = jax.grad(f, (0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  ref = jax.grad(lambda w: jnp.sum(_lax(x.astype(jnp.float32), w, (1, 1), ((0, 0), (0, 0)))))(
      w.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(gw, np.float32), ref, rtol=3e-2, atol=3e-1)


@pytest.mark.parametrize("form", ["auto", "matmul"])
# 4 channels, 2 images: patches and the weight gradient's transpose as 32-bit
# words; 3 channels, one 7x9 image (an odd pixel count): 16-bit copies.
@pytest.mark.parametrize("channels", [4, 3])
@pytest.mark.parametrize("kernel,strides,padding", [
    (3, (1, 1), ((1, 1), (1, 1))),   # "auto": XLA's forward alone, matmuls differentiated
    (3, (2, 2), ((1, 1), (1, 1))),
    (1, (1, 1), ((0, 0), (0, 0))),
    (1, (2, 2), ((0, 0), (0, 0))),
    (3, (1, 1), ((2, 0), (0, 1))),   # uneven padding: the flipped kernel's is too
    (2, (1, 1), ((3, 0), (0, 0))),   # padding beyond the kernel: the sliced gradient
])
@pytest.mark.parametrize("band_rows", [None, 20])  # 20: stride-1 patch matmuls in bands
def test_bfloat16_values_and_gradients(rng, monkeypatch, kernel, strides, padding, channels,
                                       form, band_rows):
  """bfloat16 against float32 XLA on the same (bfloat16-rounded) numbers, within
  bfloat16's rounding of the outputs and gradients."""
  if band_rows:
    monkeypatch.setattr(conv, "BAND_ROWS", band_rows)
  x = jnp.asarray(rng.normal(size=(channels - 2, 7, 9, channels)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, channels, 6)), jnp.bfloat16)
  ours_fn = lambda x, w: conv.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), form=form)
  want = _lax(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding)
  got = jax.jit(ours_fn)(x, w)
  assert got.dtype == jnp.bfloat16
  scale = lambda a: float(np.max(np.abs(a)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-2 * scale(want))
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  ours = jax.jit(jax.grad(lambda x, w: jnp.sum(ours_fn(x, w) * cot), (0, 1)))(x, w)
  theirs = jax.grad(lambda x, w: jnp.sum(_lax(x, w, strides, padding) * cot), (0, 1))(
      x.astype(jnp.float32), w.astype(jnp.float32))
  for name, a, b in zip(("input", "weight"), ours, theirs):
    assert a.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=1e-2 * scale(b), err_msg=name)


def test_bands(rng, monkeypatch):
  """Forward alone, stride-1 16-bit patch matmuls over more than BAND_ROWS output
  pixels run in bands of output rows (the largest divisor of the output height
  that fits, at least one row): the same numbers as one matmul."""
  x = jnp.asarray(rng.normal(size=(2, 12, 10, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.bfloat16)
  pads = ((1, 1), (1, 1))
  assert conv._bands(x, (3, 3), (1, 1), pads) is None  # 240 pixels: one matmul
  monkeypatch.setattr(conv, "BAND_ROWS", 2 * 4 * 10 + 5)
  assert conv._bands(x, (3, 3), (1, 1), pads) == (4, 3)
  assert conv._bands(x[:, :5], (3, 3), (1, 1), pads) == (1, 5)  # 5 rows: no divisor fits
  assert conv._bands(x, (3, 3), (2, 2), pads) is None  # strided: never
  assert conv._bands(x.astype(jnp.float32), (3, 3), (1, 1), pads) is None

  def forward(band_rows, padding=pads):
    monkeypatch.setattr(conv, "BAND_ROWS", band_rows)
    f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), padding, form="matmul",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.asarray(jax.jit(f)(x, w), np.float32)

  def looped(band_rows):
    monkeypatch.setattr(conv, "BAND_ROWS", band_rows)
    f = lambda x: conv._patch_matmul(x, w.reshape(-1, 6), (3, 3), (1, 1), pads, None, True)
    return "stablehlo.while" in jax.jit(f).lower(x).as_text()

  assert looped(15) and not looped(10 ** 9)
  whole = forward(10 ** 9)
  # Bands of 4 rows, of one row (2 x 10 pixels, more than 15), and uneven padding.
  for band_rows in (85, 15):
    np.testing.assert_allclose(forward(band_rows), whole, rtol=1e-2, atol=1e-2 * np.abs(whole).max())
  uneven = ((2, 0), (0, 1))
  np.testing.assert_allclose(forward(15, uneven), forward(10 ** 9, uneven), rtol=1e-2,
                             atol=1e-2 * np.abs(whole).max())


def test_patches_and_transpose_as_words(rng):
  """The 16-bit copies made as 32-bit words are exact: the same patches as
  float32's, and a transpose."""
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.bfloat16)
  for kernel, strides, padding in ((3, (1, 1), ((1, 1), (1, 1))), (2, (2, 1), ((0, 1), (2, 0)))):
    words = conv._patches(x, (kernel, kernel), strides, padding)
    plain = conv._patches(x.astype(jnp.float32), (kernel, kernel), strides, padding)
    np.testing.assert_array_equal(np.asarray(words, np.float32), plain)
  a = jnp.asarray(rng.normal(size=(6, 5)), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(jax.jit(conv._transposed)(a), np.float32),
                                np.asarray(a, np.float32).T)


def test_small_convs_larger_kernels_and_other_platforms_use_lax(monkeypatch):
  """Under MIN_MACS, kernels larger than 1x1, or lowered for GPU or TPU: the
  convolution and its gradients are lax's own. The platform decides at
  lowering, so one program lowered for several keeps each one's form."""
  x = jnp.ones((1, 4, 4, 2))
  call = lambda w: conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def ops(w, platforms=("cpu",)):
    grad = jax.jit(jax.grad(lambda v: jnp.sum(call(v))))  # traced anew: MIN_MACS changes
    text = grad.trace(w).lower(lowering_platforms=platforms).as_text()
    return {op for op in ("dot_general", "convolution") if f"stablehlo.{op}" in text}

  pointwise, wide = jnp.ones((1, 1, 2, 2)), jnp.ones((3, 3, 2, 2))
  assert ops(pointwise) == {"dot_general"}
  assert ops(wide) == {"convolution"}
  for platform in ("cuda", "rocm", "tpu"):
    assert ops(pointwise, (platform,)) == {"convolution"}, platform
  assert ops(pointwise, ("cpu", "cuda", "tpu")) == {"dot_general", "convolution"}
  exported = jax.export.export(jax.jit(call), platforms=("cuda", "cpu"))(pointwise)
  np.testing.assert_allclose(exported.call(pointwise), _lax(x, pointwise, (1, 1), ((0, 0), (0, 0))))
  monkeypatch.setattr(conv, "MIN_MACS", 1 + 16 * 2 * 2)
  assert ops(pointwise) == {"convolution"}


def test_conv_module_is_nn_conv_with_the_same_parameters(rng):
  """Same parameter tree as nn.Conv (checkpoints and converters are unaffected);
  dilated convolutions fall back to lax and still match."""
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  for kwargs in ({"strides": (2, 2)}, {"kernel_dilation": (2, 2)}):
    ours, theirs = conv.Conv(4, (3, 3), **kwargs), nn.Conv(4, (3, 3), **kwargs)
    params = theirs.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == \
        jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)
    g1 = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
    g2 = jax.grad(lambda p: jnp.sum(theirs.apply(p, x) ** 2))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                           g1, g2)


def test_conv_by_hand():
  """3x3 conv, zero padding, one channel: each output sums its 3x3 neighbourhood
  (a ones kernel); the input gradient of sum(y) counts the outputs reading each pixel."""
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  w = jnp.ones((3, 3, 1, 1))
  f = lambda x: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          form="matmul")
  np.testing.assert_allclose(f(x)[0, :, :, 0], [[8, 15, 12], [21, 36, 27], [20, 33, 24]])
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(f(v)))(x)[0, :, :, 0],
                             [[4, 6, 4], [6, 9, 6], [4, 6, 4]])


def test_forms_lowered(monkeypatch):
  """Which convolutions become matmuls on CPU: "auto" takes 1x1s; in bfloat16
  every plain convolution when differentiated, and forward alone those whose
  patch matrix is deep enough, at stride 1 or short enough; "matmul" every
  plain one; "xla" none.
  GPU and TPU keep their own convolutions whatever the form."""
  monkeypatch.setattr(conv, "MIN_MACS", 1)
  # The test's 3x3 over 2 channels on 6x6: depth 18, 36 rows.
  monkeypatch.setattr(conv, "BF16_MATMUL_MIN_DEPTH", 18)
  monkeypatch.setattr(conv, "BF16_MATMUL_MAX_ROWS", 36)

  def ops(w, form, platforms=("cpu",), strides=(1, 1), differentiated=True):
    x = jnp.ones((1, 6, 6, 2), w.dtype)
    f = lambda v: jnp.sum(conv.conv_general_dilated(
        x, v, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        form=form).astype(jnp.float32))
    text = (jax.jit(jax.value_and_grad(f) if differentiated else f).trace(w)
            .lower(lowering_platforms=platforms).as_text())
    return {op for op in ("dot_general", "convolution") if f"stablehlo.{op}" in text}

  wide, narrow = jnp.ones((3, 3, 2, 2)), jnp.ones((1, 1, 2, 2))
  assert ops(wide, "auto") == {"convolution"}
  assert ops(narrow, "auto") == ops(narrow, "auto", differentiated=False) == {"dot_general"}
  bf16 = wide.astype(jnp.bfloat16)
  assert ops(bf16, "auto") == ops(bf16, "auto", differentiated=False) == {"dot_general"}
  # Too shallow (at stride 1 and 2), too many rows at stride 2 (9 here; at
  # stride 1 bands of rows): XLA's forward alone.
  for name, value, strides, alone in (("BF16_MATMUL_MIN_DEPTH", 19, (1, 1), "convolution"),
                                      ("BF16_MATMUL_MIN_DEPTH", 19, (2, 2), "convolution"),
                                      ("BF16_MATMUL_MAX_ROWS", 8, (2, 2), "convolution"),
                                      ("BF16_MATMUL_MAX_ROWS", 8, (1, 1), "dot_general")):
    with monkeypatch.context() as m:
      m.setattr(conv, name, value)
      assert ops(bf16, "auto", strides=strides) == {"dot_general"}
      assert ops(bf16, "auto", strides=strides, differentiated=False) == {alone}
  assert ops(wide, "matmul") == {"dot_general"}
  assert ops(narrow, "xla") == {"convolution"}
  assert ops(wide, "matmul", ("tpu",)) == {"convolution"}
  assert ops(bf16, "auto", ("tpu",)) == {"convolution"}
  with pytest.raises(ValueError, match="conv form"):
    ops(wide, "im2col")


def test_matmul_form_inside_control_flow(rng):
  """The form the chunked heads use inside lax.cond: the same values and gradients."""
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
  conv3 = lambda x, w, form: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), form=form)
  inside = lambda w, run: jnp.sum(lax.cond(run, lambda: conv3(x, w, "matmul"),
                                           lambda: jnp.zeros_like(x)) ** 2)
  top = lambda w: jnp.sum(conv3(x, w, "xla") ** 2)
  np.testing.assert_allclose(jax.jit(jax.grad(inside))(w, True), jax.grad(top)(w),
                             rtol=1e-4, atol=1e-4)
  assert not np.any(jax.jit(jax.grad(inside))(w, False))


@pytest.mark.parametrize("rows", [6, 5])  # even: the weight gradient reads x^T as 32-bit words
def test_dense_matmul_bfloat16(rng, rows):
  """Dense's matmul (accumulating_dot_general -> matmul on CPU in 16 bits): bfloat16
  values and gradients against float32 on the same numbers, over [3, rows, K] inputs."""
  x = jnp.asarray(rng.normal(size=(3, rows, 12)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(12, 7)), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  cot = jnp.asarray(rng.normal(size=(3, rows, 7)), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cot)
  ours = lambda x, w: conv.accumulating_dot_general(x, w, dims)
  theirs = lambda x, w: lax.dot_general(x, w, dims)
  (value, grads) = jax.jit(jax.value_and_grad(loss(ours), (0, 1)))(x, w)
  assert ours(x, w).dtype == jnp.bfloat16
  f32 = x.astype(jnp.float32), w.astype(jnp.float32)
  want_value, want_grads = jax.value_and_grad(loss(theirs), (0, 1))(*f32)
  np.testing.assert_allclose(value, want_value, rtol=1e-2)
  for name, a, b in zip(("input", "weight"), grads, want_grads):
    assert a.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.asarray(a, np.float32), b,
                               atol=1e-2 * float(np.max(np.abs(b))), err_msg=name)
  lowered = lambda platform: jax.jit(jax.grad(loss(ours), (0, 1))).trace(x, w).lower(
      lowering_platforms=(platform,)).as_text()
  # The materialised x^T (a barrier) on CPU at even rows; plain dots elsewhere.
  assert ("optimization_barrier" in lowered("cpu")) == (rows % 2 == 0)
  assert "optimization_barrier" not in lowered("tpu")
