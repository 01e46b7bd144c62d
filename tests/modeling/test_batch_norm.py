"""BatchNorm over the global batch and over groups of it (modeling/batch_norm.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import build
from mrcnn_jax.modeling.batch_norm import BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_bn(x, scale, bias, eps=1e-5, mask=None):
  """Plain NumPy BatchNorm over every axis but the last (float64), and its mean and var."""
  x = np.asarray(x, np.float64)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = (x * w).sum(axes) / w.sum(axes)
  var = (np.square(x - mean) * w).sum(axes) / w.sum(axes)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def _variables(module, x, rng):
  v = module.init(jax.random.PRNGKey(0), x)
  c = x.shape[-1]
  return {"params": {"scale": rng.uniform(0.5, 2.0, c).astype(np.float32),
                     "bias": rng.normal(size=c).astype(np.float32)},
          "batch_stats": v["batch_stats"]}


def test_two_values_by_hand():
  """Channel values 1 and 3: mean 2, variance 1, so the outputs are -+1/sqrt(1 + eps)."""
  x = np.array([1.0, 3.0], np.float32).reshape(2, 1, 1, 1)
  m = BatchNorm()
  y, st = m.apply(m.init(jax.random.PRNGKey(0), x), x, mutable=["batch_stats"])
  np.testing.assert_allclose(np.ravel(y), [-1 / np.sqrt(1 + 1e-5), 1 / np.sqrt(1 + 1e-5)],
                             rtol=1e-6)
  # Running averages from (0, 1) with momentum 0.9: 0.1 * 2 and 0.9 + 0.1 * 1.
  np.testing.assert_allclose(st["batch_stats"]["mean"], [0.2], rtol=1e-6)
  np.testing.assert_allclose(st["batch_stats"]["var"], [1.0], rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_groups_match_per_group_reference(rng, groups):
  """Each contiguous group of the batch is normalised with its own statistics; the
  running averages move toward the mean of the groups' statistics."""
  x = rng.normal(1.5, 2.0, (8, 5, 3, 4)).astype(np.float32)
  m = BatchNorm(num_groups=groups)
  v = _variables(m, x, rng)
  y, st = jax.jit(lambda v, x: m.apply(v, x, mutable=["batch_stats"]))(v, x)
  assert y.shape == x.shape
  want, means, vars_ = [], [], []
  for part in np.split(x, groups):
    out, mean, var = reference_bn(part, v["params"]["scale"], v["params"]["bias"])
    want.append(out), means.append(mean), vars_.append(var)
  np.testing.assert_allclose(y, np.concatenate(want), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(st["batch_stats"]["mean"], 0.1 * np.mean(means, 0), rtol=1e-4)
  np.testing.assert_allclose(st["batch_stats"]["var"], 0.9 + 0.1 * np.mean(vars_, 0),
                             rtol=1e-4)


def test_mask_restricts_the_statistics(rng):
  """With a mask, mean and variance come from the valid positions only."""
  x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
  mask = np.zeros((4, 6, 6, 1), bool)
  mask[:, :4, :5] = True
  m = BatchNorm()
  v = _variables(m, x, rng)
  y, _ = m.apply(v, x, mask=np.broadcast_to(mask, x.shape), mutable=["batch_stats"])
  want, _, _ = reference_bn(x, v["params"]["scale"], v["params"]["bias"], mask=mask)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_running_average_mode_and_bfloat16(rng):
  """Inference reads the stored statistics; bfloat16 compute keeps float32 statistics."""
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  m = BatchNorm(use_running_average=True, dtype=jnp.bfloat16)
  v = _variables(m, x, rng)
  v["batch_stats"] = {"mean": np.full(4, 0.5, np.float32), "var": np.full(4, 4.0, np.float32)}
  y = m.apply(v, x)
  assert y.dtype == jnp.bfloat16
  want = (x - 0.5) / np.sqrt(4.0 + 1e-5) * v["params"]["scale"] + v["params"]["bias"]
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


def test_a_batch_that_does_not_split_is_refused():
  with pytest.raises(ValueError, match="does not split into 4 groups"):
    m = BatchNorm(num_groups=4)
    m.init(jax.random.PRNGKey(0), np.zeros((6, 2, 2, 3), np.float32))


def test_group_count_from_the_config():
  """0 or a group as large as the mesh: one group; else devices / size, which must divide."""
  assert build.batch_norm_groups(0, 8) == 1
  assert build.batch_norm_groups(8, 8) == 1
  assert build.batch_norm_groups(16, 8) == 1
  assert build.batch_norm_groups(2, 8) == 4
  with pytest.raises(ValueError, match="batch_norm_group_size=3 does not divide the 8"):
    build.batch_norm_groups(3, 8)
  with pytest.raises(ValueError, match="batch_norm_group_size: expected >= 0"):
    build.batch_norm_groups(-1, 8)


EIGHT_DEVICES = r"""
import jax, numpy as np
from mrcnn_jax import sharding
from mrcnn_jax.modeling import build
from mrcnn_jax.modeling.batch_norm import BatchNorm
from tests.modeling.test_batch_norm import reference_bn
assert jax.device_count() == 8
mesh = sharding.make_mesh()
rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, (16, 4, 4, 3)).astype(np.float32)  # 2 images per device
scale, bias = rng.uniform(0.5, 2, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
for group_size in (0, 2):  # the global batch; groups of 2 devices (4 images)
  m = BatchNorm(num_groups=build.batch_norm_groups(group_size, 8))
  v = {"params": {"scale": scale, "bias": bias},
       "batch_stats": m.init(jax.random.PRNGKey(0), x[:4])["batch_stats"]}
  f = jax.jit(lambda v, x: m.apply(v, x, mutable=["batch_stats"]),
              in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  y, st = f(v, jax.device_put(x, sharding.batch_sharding(mesh)))
  assert len(y.sharding.device_set) == 8
  parts = [x] if group_size == 0 else np.split(x, 4)
  want = np.concatenate([reference_bn(p, scale, bias)[0] for p in parts])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  means = [reference_bn(p, scale, bias)[1] for p in parts]
  np.testing.assert_allclose(st["batch_stats"]["mean"], 0.1 * np.mean(means, 0), rtol=1e-4)
print("OK")
"""


def test_eight_devices_global_and_grouped():
  """On 8 simulated devices, batch-sharded: statistics of the whole batch equal BN over
  the concatenated batch, and groups of 2 devices equal BN over each group's images."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
