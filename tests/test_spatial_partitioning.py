"""Spatial partitioning: each image's height split over a 'space' mesh axis.

On 8 simulated CPU devices as data=2 x space=4, at a 128 and a 256 canvas,
the losses and every parameter's gradient of a batch match one device's, and
the step compiles once for batches of different instance counts; evaluation
reads each image's rows once. Dataset: tests/test_train.py's.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mrcnn_jax import sharding, train
from tests.test_train import ROOT, dataset, make_config  # noqa: F401  pylint: disable=unused-import

SPATIAL_CHECK = textwrap.dedent("""
    import functools, pathlib, sys, jax, numpy as np
    sys.path.insert(0, {root!r})
    from mrcnn_jax import sharding, train
    from mrcnn_jax.data import input_pipeline
    from mrcnn_jax.modeling import build
    from tests.test_train import make_config
    assert jax.device_count() == 8

    def check(canvas, split_rows):
      config = make_config(pathlib.Path({dataset!r}), batch_size=2,
                           **{{"data.canvas_size": (canvas, canvas), "mesh.space": 4}})
      mesh = train.make_mesh(config)
      assert dict(mesh.shape) == {{"data": 2, "space": 4}}, mesh.shape
      model = build.build_model(config, num_devices=sharding.data_size(mesh))
      variables = jax.jit(functools.partial(model.init, method="initialize"))(
          jax.random.PRNGKey(0), np.zeros((1, canvas, canvas, 3), np.float32))
      data = input_pipeline.make_dataset(config, "train").as_numpy_iterator()
      batches = [next(data) for _ in range(2)]
      assert batches[0]["gt_valid"].sum() != batches[1]["gt_valid"].sum()

      def losses(params, batch, key):
        images, info, gt = train._split_batch(batch)
        (out, _), _ = model.apply({{**variables, "params": params}}, images, info, gt, key,
                                  method="losses", mutable=["batch_stats"])
        return out["loss"], out

      def jitted(mesh):
        rep = sharding.replicated(mesh)
        f = jax.jit(sharding.traced_in(mesh, jax.value_and_grad(losses, has_aux=True)),
                    in_shardings=(rep, sharding.batch_sharding(mesh), rep))
        args = lambda b: (jax.device_put(variables["params"], rep),
                          sharding.global_batch(b, mesh), jax.device_put(jax.random.PRNGKey(1), rep))
        return f, args

      one, one_args = jitted(sharding.make_mesh(jax.devices()[:1]))
      split, split_args = jitted(mesh)
      worst = 0.0
      for b in batches:
        (_, out1), g1 = one(*one_args(b))
        (_, out8), g8 = split(*split_args(b))
        assert out1["loss_mask"] > 0 and out1["loss_keypoint"] > 0, out1
        for k in out1:
          np.testing.assert_allclose(out8[k], out1[k], rtol=1e-5, atol=1e-6, err_msg=k)
        for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g8), jax.tree.leaves(g1)):
          a, c = np.asarray(a), np.asarray(c)
          err, norm = np.linalg.norm(a - c), np.linalg.norm(c)
          if norm < 1e-5:  # zero but for rounding: the keypoint logits' bias under a
            assert np.linalg.norm(a) < 1e-5, jax.tree_util.keystr(path)  # spatial softmax
            continue
          worst = max(worst, err / norm)
          assert err <= 1e-4 * norm, (canvas, jax.tree_util.keystr(path), err, norm)
      assert split._cache_size() == 1
      # The finest map is split: each device holds a quarter of P2's rows.
      hlo = split.lower(*split_args(batches[0])).compile().as_text()
      assert f"f32[1,{{split_rows}},{{canvas // 4}},32]" in hlo, "P2 is not split 4 ways"
      print(canvas, "worst relative gradient error", worst)

    # Evaluation reads each image's rows once, not once per device of its space group.
    from mrcnn_jax import evaluate
    rows = np.arange(6).reshape(2, 3)
    mesh = train.make_mesh(make_config(pathlib.Path({dataset!r}), batch_size=2,
                                       **{{"mesh.space": 4}}))
    assert (evaluate._local_rows(sharding.global_batch(rows, mesh)) == rows).all()

    check(128, 8)  # C2..C4, P2..P4 split; C5, P5 (4 rows) and P6 whole per space group
    check(256, 16)  # every map split, P6 (4 rows, one per device) as its source P5
    print("OK")
""")



@pytest.mark.slow
def test_space_axis_matches_one_device(dataset):  # noqa: F811
  """data=2 x space=4: the same losses and gradients as one device, one compilation."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-c", SPATIAL_CHECK.format(root=ROOT,
                                                                    dataset=str(dataset))],
                        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]


def test_make_mesh_space_axis_and_its_errors(dataset):  # noqa: F811
  """mesh.space=1 is the data-only mesh; a space that does not divide the devices,
  or a batch that does not split over the data axis, is refused by name."""
  mesh = train.make_mesh(make_config(dataset, batch_size=1))
  assert mesh.axis_names == ("data",) and sharding.space_size(mesh) == 1
  devices = np.asarray(jax.devices() * 8)  # eight stand-ins: make_mesh only reshapes them
  mesh = sharding.make_mesh(devices, space=4)
  assert dict(mesh.shape) == {"data": 2, "space": 4} and sharding.data_size(mesh) == 2
  with pytest.raises(ValueError, match="mesh.space=3: expected a positive divisor of the 8"):
    sharding.make_mesh(devices, space=3)
  with pytest.raises(ValueError, match="mesh.space=2: expected a positive divisor of the 1"):
    train.make_mesh(make_config(dataset, **{"mesh.space": 2}))
  with pytest.raises(ValueError, match="batch_size=3 is not divisible by the 2 devices"):
    sharding.check_batch_size(3, mesh)
