"""Every experiment config loads, builds its model and optimiser, and has what train reads."""

import functools
import importlib

import jax
import optax
import pytest

from mrcnn_jax import evaluate, optim, train
from mrcnn_jax.modeling import build

CONFIGS = ["shapes", "coco_mask_rcnn_r50_fpn_1x", "coco_keypoint_rcnn_r50_fpn_1x",
           "coco_mask_rcnn_r50_fpn_lsj_100ep",
           "torchvision_mask_rcnn", "detectron2_mask_rcnn"]


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
  assert config.batch_size % 1 == 0 and config.data.max_instances > 0
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
