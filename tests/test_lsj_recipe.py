"""configs/coco_mask_rcnn_r50_fpn_lsj_100ep.py: the recipe's settings, and its model
shrunk to test size trains through the real loop with one compilation."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from mrcnn_jax import optim, train
from mrcnn_jax.modeling import build

pytestmark = pytest.mark.slow
RECIPE = "configs.coco_mask_rcnn_r50_fpn_lsj_100ep"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from tests.conftest import make_shapes_dataset  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("lsj")
  make_shapes_dataset(root, train=16, val=4, size=64, seed=3, shards=1)
  return root / "tf"


def tiny(config, data):
  """The recipe's structure (BN everywhere, 2-conv RPN, 4conv1fc, LSJ, bfloat16) at test size."""
  config.data.update(train_dir=str(data / "train"), eval_dir=str(data / "val"),
                     canvas_size=(64, 64), max_instances=16)
  config.update(batch_size=4, eval_batch_size=4, total_steps=3)
  m = config.model
  m.num_classes = 5
  m.backbone.update(depth="tiny", width=8)
  m.fpn_channels = 16
  m.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
  m.rpn.update(pre_nms_topk_train=100, post_nms_topk_train=50, pre_nms_topk_test=50,
               post_nms_topk_test=20, batch_size_per_image=32)
  m.roi.update(batch_size_per_image=16, num_mask_rois=4)
  m.box_head.update(conv_dim=16, fc_dims=(32,))
  m.mask_head.update(num_convs=1, conv_dim=16)
  m.test.update(detections_per_image=10, max_candidates=100)
  config.optim.warmup_steps = 2
  config.train.update(log_every=1, eval_every=0, checkpoint_every=3, progress=False)
  return config


def test_recipe_is_detectron2s_lsj():
  c = importlib.import_module(RECIPE).get_config()
  m = c.model
  assert c.data.canvas_size == (1024, 1024) and tuple(c.data.scale_range) == (0.1, 2.0)
  assert c.batch_size == 64 and c.total_steps == 184375 and m.dtype == "bfloat16"
  assert (m.backbone.norm, m.fpn_norm, m.box_head.norm, m.backbone.freeze_at) == (
      "bn", "bn", "bn", 0)
  assert (m.box_head.num_convs, tuple(m.box_head.fc_dims), m.rpn.num_convs) == (4, (1024,), 2)
  lr = optim.learning_rate(c)
  np.testing.assert_allclose([lr(0), lr(500), lr(163888), lr(163889), lr(177546)],
                             [0.1 * 0.067, 0.1, 0.1, 0.01, 0.001], rtol=1e-5)
  assert c.init_checkpoint == "" and not build.frozen_parameters(c)


def test_tiny_recipe_trains_with_one_compilation(dataset, tmp_path):
  config = tiny(importlib.import_module(RECIPE).get_config(), dataset)
  model = build.build_model(config)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32), method="initialize"))
  names = {"/".join(p.key for p in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
  for bn in ("backbone/norm1/mean", "fpn/lateral2_norm/var", "box_head/conv4_norm/mean"):
    assert bn in names, sorted(names)[:20]
  assert "conv2" in variables["params"]["rpn_head"]

  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  losses = [line["train/loss"] for line in lines if "train/loss" in line]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert [line["train/step_compilations"] for line in lines
          if "train/step_compilations" in line] == [1]
  # Batch statistics moved away from their initial values.
  stats = train.checkpointing.load_variables(os.path.join(workdir, "checkpoints"))
  assert not np.allclose(stats["batch_stats"]["backbone"]["norm1"]["mean"], 0.0)
