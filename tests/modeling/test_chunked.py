"""modeling/chunked.py: a head over only the real items of its slots."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import chunked

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fn(params, x):
  """A per-row head: row i of the output reads only row i of the input."""
  return {"y": jnp.tanh(x["a"] @ params["w"]) * x["b"][:, None] + params["c"]}


def _setup(rng, b=3, m=5, d=4):
  params = {"w": jnp.asarray(rng.normal(size=(d, 2)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  items = {"a": jnp.asarray(rng.normal(size=(b, m, d)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(b, m)), jnp.float32)}
  return params, items


def _direct(params, items, valid):
  """The unchunked reference: fn over every slot, zeros where not valid."""
  b, m = valid.shape
  y = _fn(params, jax.tree.map(lambda v: v.reshape(b * m, *v.shape[2:]), items))["y"]
  return jnp.where(valid[..., None], y.reshape(b, m, -1), 0.0)


@pytest.mark.parametrize("pattern", ["none", "few", "all", "scattered"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 32])
def test_values_and_gradients_equal_the_unchunked_head(rng, pattern, chunk_size):
  params, items = _setup(rng)
  valid = {"none": np.zeros((3, 5), bool), "all": np.ones((3, 5), bool),
           "few": np.arange(5)[None] < np.asarray([2, 0, 1])[:, None],  # real items first
           "scattered": rng.random((3, 5)) < 0.4}[pattern]
  valid = jnp.asarray(valid)
  run = jax.jit(lambda p, it, v: chunked.run(_fn, p, it, v, chunk_size)["y"])
  np.testing.assert_allclose(run(params, items, valid), _direct(params, items, valid),
                             rtol=1e-6, atol=1e-6)
  weights = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)
  loss = lambda f: lambda p, it: jnp.sum(f(p, it, valid) * weights)
  got = jax.jit(jax.grad(loss(lambda p, it, v: chunked.run(_fn, p, it, v, chunk_size)["y"]),
                         (0, 1)))(params, items)
  want = jax.grad(loss(_direct), (0, 1))(params, items)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_only_chunks_with_real_items_run(rng):
  """The cost follows the real count: with chunks of 4 over 15 slots (4 chunks),
  3 real items run one chunk, 6 run two, none run none; one compilation serves all."""
  params, items = _setup(rng)
  calls = []

  def counted(p, x):
    jax.debug.callback(lambda: calls.append(1))
    return _fn(p, x)

  run = jax.jit(lambda v: chunked.run(counted, params, items, v, 4)["y"])
  for real, chunks in ((3, 1), (6, 2), (0, 0), (15, 4)):
    calls.clear()
    flat = np.zeros(15, bool)
    flat[rng.permutation(15)[:real]] = True
    jax.block_until_ready(run(jnp.asarray(flat.reshape(3, 5))))
    assert len(calls) == chunks, (real, len(calls))
  assert run._cache_size() == 1


def test_chunk_size_must_be_positive(rng):
  params, items = _setup(rng)
  with pytest.raises(ValueError, match="chunk_size"):
    chunked.run(_fn, params, items, jnp.ones((3, 5), bool), 0)


MESH_CHECK = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r})
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mrcnn_jax import sharding
    from mrcnn_jax.modeling import chunked
    from tests.modeling.test_chunked import _fn, _setup, _direct
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    params, items = _setup(rng, b=8, m=6)
    valid = jnp.asarray(rng.random((8, 6)) < 0.3)
    mesh = sharding.make_mesh()
    batch = NamedSharding(mesh, P("data"))
    items, valid = jax.device_put((items, valid), batch)
    weights = jnp.asarray(rng.normal(size=(8, 6, 2)), jnp.float32)
    loss = lambda f: lambda p, it: jnp.sum(f(p, it, valid) * weights)
    f = jax.jit(jax.value_and_grad(loss(lambda p, it, v: chunked.run(_fn, p, it, v, 4)["y"]),
                                   (0, 1)))
    with jax.set_mesh(mesh):
      got = f(params, items)
      forward = jax.jit(lambda p, it, v: chunked.run(_fn, p, it, v, 4)["y"]).lower(
          params, items, valid).compile().as_text()
    want = jax.value_and_grad(loss(_direct), (0, 1))(params, items)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    # Each device sorts and chunks its own slice: no collective in the forward pass.
    for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
      assert op not in forward, op
    print("OK")
""")


def test_each_device_decides_for_its_own_slice():
  """Under an 8-device mesh (jax.set_mesh) the chunks run per device (shard_map): the
  same values and gradients, and the forward pass has no cross-device collective."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-c", MESH_CHECK.format(root=ROOT)], cwd=ROOT,
                        env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
