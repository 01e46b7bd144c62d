"""ResNet and FPN: strides, channels, freezing, parameter counts, upsampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import fpn as fpn_lib
from mrcnn_jax.modeling import norm as norm_lib
from mrcnn_jax.modeling import resnet


@pytest.mark.parametrize("depth,channels", [
    ("tiny", (16, 32, 64, 128)), ("18", (16, 32, 64, 128)), ("50", (64, 128, 256, 512))])
def test_resnet_strides_and_channels(depth, channels):
  """C2..C5 have strides 4..32 (ceil for sizes not divisible) and the stage widths."""
  model = resnet.ResNet(depth=depth, width=16, norm="gn", freeze_at=0)
  x = jnp.zeros((1, 100, 72, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x)[0])
  for i, (name, s) in enumerate(sorted(shapes.items())):
    stride = 4 * 2 ** i
    assert s.shape == (1, -(-100 // stride), -(-72 // stride), channels[i]), name
  assert resnet.stage_channels(depth, 16) == channels


def test_resnet50_matches_torchvision_parameter_count(torchvision):
  """Every torchvision resnet50 conv weight has a same-sized kernel here (fc excepted)."""
  tv = torchvision.models.resnet50(weights=None)
  tv_conv = sum(p.numel() for n, p in tv.named_parameters()
                if p.ndim == 4)
  tv_bn = sum(p.numel() for n, p in tv.named_parameters() if p.ndim == 1 and "fc" not in n)
  model = resnet.ResNet(depth="50", norm="bn")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  sizes = [np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])]
  kernels = [np.prod(s.shape) for s in jax.tree.leaves(shapes["params"]) if s.ndim == 4]
  assert sum(kernels) == tv_conv
  assert sum(sizes) - sum(kernels) == tv_bn  # BN scale + bias


def test_frozen_bn_is_the_stored_affine_map():
  """FrozenBatchNorm computes (x - mean) / sqrt(var + eps) * scale + bias, no params."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
  layer = norm_lib.FrozenBatchNorm()
  variables = layer.init(jax.random.PRNGKey(0), x)
  assert "params" not in variables
  stats = {"scale": jnp.array([1., 2., 3., 4.]), "bias": jnp.array([0., 1., 0., -1.]),
           "mean": jnp.array([0.5, 0., -1., 2.]), "var": jnp.array([1., 4., 0.25, 9.])}
  y = layer.apply({"batch_stats": stats}, x)
  want = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_freeze_at_stops_gradients():
  """freeze_at=2: stem and res2 get zero gradient, res3 does not."""
  model = resnet.ResNet(depth="tiny", width=8, norm="gn", freeze_at=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  grads = jax.grad(lambda p: sum(jnp.sum(v ** 2) for v in model.apply({"params": p}, x).values()))(params)
  frozen = set(resnet.frozen_prefixes(2))
  assert frozen == {"conv1", "norm1", "layer1"}
  for name, g in grads.items():
    total = sum(float(jnp.abs(v).sum()) for v in jax.tree.leaves(g))
    assert (total == 0) == (name in frozen), name


def test_bad_depth_and_norm_raise():
  with pytest.raises(ValueError, match="depth"):
    resnet.arch(42)
  with pytest.raises(ValueError, match="norm"):
    norm_lib.make_norm("ln", 8, False, jnp.float32, "n")


def test_fpn_levels_and_p6():
  """P2..P5 keep their C sizes with 256 channels; P6 is P5 subsampled by 2."""
  feats = {f"c{k}": jnp.ones((1, 64 // 2 ** k, 48 // 2 ** k, 8 * k)) for k in range(2, 6)}
  model = fpn_lib.FPN(channels=16)
  out, _ = model.init_with_output(jax.random.PRNGKey(0), feats)
  assert sorted(out) == ["p2", "p3", "p4", "p5", "p6"]
  for k in range(2, 6):
    assert out[f"p{k}"].shape == (1, 64 // 2 ** k, 48 // 2 ** k, 16)
  np.testing.assert_array_equal(out["p6"], out["p5"][:, ::2, ::2])


def test_upsample_nearest_matches_hand_and_torch(torch):
  """Nearest upsampling picks floor(i * h / H), PyTorch's legacy 'nearest'."""
  x = jnp.arange(6.0).reshape(1, 2, 3, 1)
  y = fpn_lib.upsample_nearest(x, (4, 6))
  np.testing.assert_array_equal(y[0, :, :, 0], [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2)
  z = np.random.default_rng(0).normal(size=(1, 7, 5, 2)).astype(np.float32)
  for size in ((13, 9), (14, 10)):  # any size (a gather); exactly twice (a broadcast)
    ours = fpn_lib.upsample_nearest(jnp.asarray(z), size)
    ref = torch.nn.functional.interpolate(torch.tensor(z).permute(0, 3, 1, 2), size=size,
                                          mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, ref, err_msg=str(size))
