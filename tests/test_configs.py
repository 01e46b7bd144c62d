"""Every experiment config loads, builds its model and optimiser, and has what train reads;
the C4 recipe's settings, and its model shrunk to test size trains with one compilation."""

import functools
import importlib
import json
import os

import jax
import numpy as np
import optax
import pytest

from mrcnn_jax import evaluate, optim, train
from mrcnn_jax.modeling import build

CONFIGS = ["shapes", "coco_mask_rcnn_r50_fpn_1x", "coco_keypoint_rcnn_r50_fpn_1x",
           "coco_mask_rcnn_r50_fpn_lsj_100ep",
           "coco_mask_rcnn_r50_c4_1x", "cascade_mask_rcnn_r50_fpn_1x", "torchvision_mask_rcnn",
           "detectron2_mask_rcnn"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  model = build.build_model(config)
  shapes = jax.eval_shape(functools.partial(train.create_state, model, optax.identity(), config),
                          jax.random.PRNGKey(0))
  tx = optim.make_optimizer(config, shapes.params, build.frozen_parameters(config))
  jax.eval_shape(tx.init, shapes.params)
  lr = optim.learning_rate(config)
  assert float(lr(0)) < float(lr(config.optim.warmup_steps)) or config.optim.warmup_steps == 0
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every",
              "max_nonfinite"):
    assert key in config.train, key
  assert isinstance(config.batch_size, int) and config.batch_size >= 1
  assert config.data.max_instances > 0
  assert set(evaluate.evaluator_options(config)) == {"oks_sigmas", "keypoint_score", "backend",
                                                     "workers"}


@pytest.mark.parametrize("key,value", [("keypoint_score", "oks"), ("backend", "detectron2"),
                                       ("workers", -1)])
def test_bad_eval_setting_is_named(key, value):
  config = importlib.import_module("configs.shapes").get_config()
  config.eval[key] = value
  with pytest.raises(ValueError, match=f"eval.{key}"):
    evaluate.evaluator_options(config)


def test_coco_schedule_is_detectron2s():
  config = importlib.import_module("configs.coco_mask_rcnn_r50_fpn_1x").get_config()
  lr = optim.learning_rate(config)
  assert abs(float(lr(0)) - 0.02 * 0.001) < 1e-9
  assert abs(float(lr(1000)) - 0.02) < 1e-9
  assert abs(float(lr(59999)) - 0.02) < 1e-9
  assert abs(float(lr(60000)) - 0.002) < 1e-9
  assert abs(float(lr(85000)) - 0.0002) < 1e-9


def test_c4_recipe_is_detectron2s():
  """configs/coco_mask_rcnn_r50_c4_1x.py: detectron2's Base-RCNN-C4 + mask_rcnn_R_50_C4_1x."""
  c4 = importlib.import_module("configs.coco_mask_rcnn_r50_c4_1x")
  c = c4.get_config()
  m = c.model
  assert m.design == "c4" and m.backbone.depth == "50" and m.backbone.stride_in_1x1
  assert [tuple(s) for s in m.anchor_sizes] == [(32, 64, 128, 256, 512)]
  assert (m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train, m.rpn.pre_nms_topk_test,
          m.rpn.post_nms_topk_test) == (12000, 2000, 6000, 1000)
  assert (m.roi.aligned, m.roi.sampling_ratio, m.box_head.pooler_resolution) == (True, 0, 14)
  assert (m.mask_head.enabled, m.mask_head.num_convs, m.mask_head.conv_dim) == (True, 0, 256)
  assert c.data.channel_order == "bgr" and tuple(c.data.std) == (1.0, 1.0, 1.0)
  assert (c.batch_size, c.total_steps, c.optim.lr, tuple(c.optim.decay_steps)) == (
      16, 90000, 0.02, (60000, 80000))
  faster, tv = c4.get_config("faster"), c4.get_config("torchvision_backbone")
  assert not faster.model.mask_head.enabled and faster.train.best_metric == "bbox/AP"
  assert not tv.model.backbone.stride_in_1x1 and tv.data.channel_order == "rgb"
  with pytest.raises(ValueError, match="config arg"):
    c4.get_config("keypoint")


@pytest.mark.slow
def test_tiny_c4_recipe_trains_with_one_compilation(tmp_path):
  """The C4 recipe at test size (tiny ResNet, 64 px) through the real training loop."""
  from tests.conftest import make_shapes_dataset  # pylint: disable=g-import-not-at-top
  _, shapes_dataset = make_shapes_dataset(tmp_path, train=8, val=2, size=64, seed=5, shards=1)
  config = importlib.import_module("configs.coco_mask_rcnn_r50_c4_1x").get_config()
  config.data.update(train_dir=str(shapes_dataset / "train"), eval_dir=str(shapes_dataset / "val"),
                     canvas_size=(64, 64), canvas_sizes=(), max_instances=8)
  config.update(batch_size=2, eval_batch_size=2, total_steps=3)
  m = config.model
  m.num_classes = 5
  m.backbone.update(depth="tiny", width=8)
  m.anchor_sizes = ((8, 16, 32, 64, 128),)
  m.rpn.update(pre_nms_topk_train=120, post_nms_topk_train=40, pre_nms_topk_test=60,
               post_nms_topk_test=20, batch_size_per_image=32)
  m.roi.update(batch_size_per_image=16, num_mask_rois=4)
  m.mask_head.conv_dim = 16
  m.test.update(detections_per_image=10, max_candidates=100)
  config.optim.warmup_steps = 2
  config.train.update(log_every=1, eval_every=0, checkpoint_every=3, progress=False)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  losses = [line for line in lines if "train/loss" in line]
  assert len(losses) == 3
  for key in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"):
    assert all(np.isfinite(line[f"train/{key}"]) for line in losses), key
  assert [line["train/step_compilations"] for line in lines
          if "train/step_compilations" in line] == [1]
  params = train.checkpointing.load_variables(os.path.join(workdir, "checkpoints"))["params"]
  assert params["box_head"]["res5"]["0"]["conv1"]["kernel"].shape[-1] == 8 * 8
  assert params["mask_head"]["deconv"]["kernel"].shape == (2, 2, 8 * 8, 16)
