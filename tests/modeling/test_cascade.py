"""Cascade R-CNN's stage 2 (modeling/cascade.py): stages, targets, gradients, inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import build, cascade
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import targets as target_ops
from tests import references
from tests.modeling.conftest import make_batch, tiny_config

KEY = jax.random.PRNGKey(0)
WEIGHTS = ((20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


def cascade_config(**overrides):
  cfg = tiny_config(keypoints=False, **overrides)
  cfg.box_head.class_agnostic = True
  cfg.cascade.update(iou_thresholds=(0.6, 0.7), box_weights=WEIGHTS)
  return cfg


@pytest.fixture(scope="module")
def setup():
  model = build.build_model(cascade_config())
  batch = make_batch(np.random.default_rng(1), [3, 4], classes=[0, 1, 2, 2])
  variables = jax.jit(lambda k: model.init(k, batch[0], method="initialize"))(KEY)
  return model, variables["params"], batch


def test_scale_gradient_keeps_values_and_scales_gradients():
  x = jnp.asarray([1.0, -2.0, 3.0])
  np.testing.assert_array_equal(cascade.scale_gradient(x, 0.25), x)
  grad = jax.grad(lambda v: jnp.sum(cascade.scale_gradient(v, 0.25) ** 2))(x)
  np.testing.assert_allclose(grad, 0.25 * 2 * x)


def test_label_boxes_hand_computed_and_against_numpy(rng):
  """IoU 0.6 with the 10x10 object: foreground at 0.55, background at 0.7; a box inside
  the crowd region is ignored; an invalid box stays invalid."""
  gt = np.array([[0, 0, 10, 10], [50, 50, 90, 90], [0, 0, 0, 0]], np.float32)
  boxes = np.array([[0, 0, 10, 12],      # IoU 100/120 = 0.83 with object 0
                    [0, 0, 10, 16],      # IoU 100/160 = 0.625
                    [0, 0, 10, 18],      # IoU 100/180 = 0.56
                    [60, 60, 70, 70],    # inside the crowd region
                    [0, 0, 10, 10]], np.float32)
  valid = np.array([True, True, True, True, False])
  out = target_ops.label_boxes(
      jnp.asarray(boxes), jnp.asarray(valid), jnp.asarray(gt), jnp.asarray([2, 0, 0]),
      jnp.asarray([True, True, False]), jnp.asarray([False, True, False]), 3, 0.6, 0.7,
      WEIGHTS[0])
  np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])
  np.testing.assert_array_equal(out["foreground"], [True, True, False, False, False])
  np.testing.assert_array_equal(out["classes"], [2, 2, 3, 3, 3])
  np.testing.assert_allclose(out["box_deltas"][:2],
                             references.encode(gt[[0, 0]], boxes[:2], WEIGHTS[0]), rtol=1e-5)
  np.testing.assert_allclose(out["matched_iou"][:3], [100 / 120, 100 / 160, 100 / 180],
                             rtol=1e-6)
  # Random boxes: foreground exactly where the NumPy IoU reaches the threshold.
  gt = np.asarray(jax.random.uniform(KEY, (6, 2)) * 60, np.float32)
  gt = np.concatenate([gt, gt + 20], axis=1)
  boxes = gt[rng.integers(0, 6, 200)] + rng.normal(0, 4, (200, 4)).astype(np.float32)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
  out = target_ops.label_boxes(jnp.asarray(boxes), jnp.ones(200, bool), jnp.asarray(gt),
                               jnp.arange(6), jnp.ones(6, bool), jnp.zeros(6, bool), 6, 0.7,
                               0.7, WEIGHTS[1])
  iou = references.iou(boxes, gt)
  np.testing.assert_array_equal(out["foreground"], iou.max(1) >= 0.7)
  fg = iou.max(1) >= 0.7
  np.testing.assert_array_equal(out["classes"][fg], iou.argmax(1)[fg])


def test_losses_per_stage_and_stage_one_is_the_standard_box_head(setup):
  """detectron2's loss names per stage; stage 0 (and every other head's loss) equals the
  plain model's with the same parameters: the cascade only adds stages."""
  model, params, batch = setup
  losses, _ = jax.jit(lambda p: model.apply({"params": p}, *batch, KEY, method="losses"))(params)
  assert {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)} <= set(losses)
  assert "loss_cls" not in losses
  plain_cfg = tiny_config(keypoints=False)
  plain_cfg.box_head.class_agnostic = True
  plain = build.build_model(plain_cfg)
  base = {k: v for k, v in params.items() if not k.startswith("refine_box_heads")}
  want, _ = jax.jit(lambda p: plain.apply({"params": p}, *batch, KEY, method="losses"))(base)
  for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_mask"):
    np.testing.assert_allclose(losses[name], want[name], rtol=1e-6)
  np.testing.assert_allclose(losses["loss_cls_stage0"], want["loss_cls"], rtol=1e-6)
  np.testing.assert_allclose(losses["loss_box_reg_stage0"], want["loss_box_reg"], rtol=1e-6)
  assert all(np.isfinite(float(v)) for v in losses.values())


def test_later_stages_see_no_gradient_through_their_boxes(setup):
  """A later stage's losses reach its own head and the features, never the earlier
  heads (their boxes are inputs without gradient), and the features' gradient is scaled."""
  model, params, batch = setup

  def stage_loss(p, k):
    losses, _ = model.apply({"params": p}, *batch, KEY, method="losses")
    return losses[f"loss_cls_stage{k}"] + losses[f"loss_box_reg_stage{k}"]

  grads = jax.jit(jax.grad(stage_loss), static_argnums=1)(params, 2)
  norm = lambda tree: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))
  assert norm(grads["box_head"]) == 0 and norm(grads["refine_box_heads_0"]) == 0
  assert norm(grads["refine_box_heads_1"]) > 0 and norm(grads["fpn"]) > 0


def test_inference_averages_the_stages_scores_and_decodes_the_last_stages_boxes(setup):
  model, params, batch = setup
  images, info, _ = batch

  def parts(m):
    _, rpn_out = m.proposals(images, info["image_size"], train=False, training_counts=False)
    heads = m.roi_heads
    features = m.features(images, info["image_size"], train=False)[2]
    logits, deltas, boxes = heads.box_predictions(features, rpn_out.proposals,
                                                  info["image_size"])
    # By hand: each stage on the previous stage's decoded, clipped boxes.
    b, probs = rpn_out.proposals, []
    for k, (head, _, weights) in enumerate(heads.stages):
      lg, dl = heads._stage(head, features, b, False)
      probs.append(jax.nn.softmax(lg, axis=-1))
      if k < len(heads.stages) - 1:
        decoded = box_ops.decode(dl.reshape(-1, 4), b.reshape(-1, 4), weights).reshape(b.shape)
        b = jax.vmap(lambda x, s: box_ops.clip_to_image(x, s[0], s[1]))(decoded,
                                                                          info["image_size"])
    return logits, deltas, boxes, sum(probs) / 3, dl, b

  logits, deltas, boxes, mean, last_deltas, last_boxes = jax.jit(
      lambda p: model.apply({"params": p}, method=parts))(params)
  np.testing.assert_allclose(jax.nn.softmax(logits, axis=-1), mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(deltas[:, :, 0], last_deltas, rtol=1e-6)
  np.testing.assert_allclose(boxes, last_boxes, rtol=1e-6, atol=1e-4)
  out = jax.jit(lambda p: model.apply({"params": p}, images, info, method="detect"))(params)
  assert out["masks"].shape[:2] == out["boxes"].shape[:2]


def test_a_cascade_needs_class_agnostic_fpn_boxes():
  cfg = cascade_config()
  cfg.box_head.class_agnostic = False
  with pytest.raises(ValueError, match="class_agnostic=True"):
    build.build_model(cfg)
  cfg = cascade_config()
  cfg.cascade.box_weights = WEIGHTS[:1]
  with pytest.raises(ValueError, match="one box_weights entry per iou_thresholds entry"):
    build.build_model(cfg)
