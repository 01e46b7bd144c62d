"""Losses: hand-computed values, normalisers, and GIoU against torchvision."""

import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import losses
from mrcnn_jax.ops import boxes as box_ops
from tests.conftest import random_boxes


def test_smooth_l1_hand_values():
  x = jnp.array([-3.0, -0.5, 0.0, 0.25, 2.0])
  np.testing.assert_allclose(losses.smooth_l1(x, 0.0), [3, 0.5, 0, 0.25, 2])
  # beta = 1: 0.5 x^2 inside |x| < 1, |x| - 0.5 outside.
  np.testing.assert_allclose(losses.smooth_l1(x, 1.0), [2.5, 0.125, 0, 0.03125, 1.5])


def test_generalized_iou_hand_and_torchvision(torchvision, torch, rng):
  a = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
  b = jnp.array([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
  # IoU 1/7, hull 9, union 7: 1/7 - 2/9. Disjoint: 0 - (3 - 2) / 3.
  np.testing.assert_allclose(losses.generalized_iou(a, b), [1 / 7 - 2 / 9, -1 / 3], rtol=1e-5)
  x, y = random_boxes(rng, 20), random_boxes(rng, 20)
  ref = torchvision.ops.generalized_box_iou(torch.tensor(x), torch.tensor(y)).numpy().diagonal()
  np.testing.assert_allclose(losses.generalized_iou(jnp.asarray(x), jnp.asarray(y)), ref,
                             atol=1e-6)


def test_box_regression_giou_is_zero_at_the_target(rng):
  anchors = jnp.asarray(random_boxes(rng, 6))
  deltas = jnp.asarray(rng.normal(scale=0.3, size=(6, 4)), jnp.float32)
  loss = losses.box_regression(deltas, deltas, anchors, box_ops.BOX_HEAD_WEIGHTS, "giou")
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="loss_type"):
    losses.box_regression(deltas, deltas, anchors, box_ops.BOX_HEAD_WEIGHTS, "l2")


def test_rpn_losses_normalise_by_batch_times_samples():
  """Only sampled anchors count; both losses divide by B * batch_size_per_image."""
  objectness = jnp.array([[0.0, 0.0, 5.0]])
  deltas = jnp.array([[[1.0, 0, 0, 0], [0, 0, 0, 0], [0.5, -0.5, 0, 0]]])
  targets = {"objectness": jnp.array([[0.0, 1.0, 1.0]]),
             "sampled": jnp.array([[True, True, False]]),
             "positive": jnp.array([[False, True, False]]),
             "box_deltas": jnp.array([[[0.0] * 4, [1.0, 0, 0, 0], [0.0] * 4]])}
  out = losses.rpn_losses(objectness, deltas, jnp.zeros((3, 4)), targets, 4)
  np.testing.assert_allclose(out["loss_rpn_cls"], 2 * np.log(2) / 4, rtol=1e-6)
  np.testing.assert_allclose(out["loss_rpn_loc"], 1.0 / 4, rtol=1e-6)


def test_box_head_losses_read_the_target_class_deltas():
  """CE over valid RoIs; L1 of the gt class's deltas over fg, divided by valid RoIs."""
  logits = jnp.zeros((1, 3, 3))  # K = 2, uniform: CE = log 3
  deltas = jnp.zeros((1, 3, 2, 4)).at[0, 0, 1].set(jnp.array([1.0, 2.0, 0.0, 0.0]))
  deltas = deltas.at[0, 0, 0].set(100.0)  # another class's deltas: must not count
  targets = {"valid": jnp.array([[True, True, False]]),
             "foreground": jnp.array([[True, False, False]]),
             "classes": jnp.array([[1, 2, 2]]),
             "box_deltas": jnp.zeros((1, 3, 4)), "boxes": jnp.zeros((1, 3, 4))}
  out = losses.box_head_losses(logits, deltas, targets)
  np.testing.assert_allclose(out["loss_cls"], np.log(3), rtol=1e-6)
  np.testing.assert_allclose(out["loss_box_reg"], 3.0 / 2, rtol=1e-6)


def test_mask_loss_averages_valid_rois_only():
  logits = jnp.stack([jnp.zeros((4, 4)), jnp.full((4, 4), 50.0)])[None]  # (1, 2, 4, 4)
  targets = jnp.ones((1, 2, 4, 4))
  out = losses.mask_loss(logits, targets, jnp.array([[True, False]]))
  np.testing.assert_allclose(out, np.log(2), rtol=1e-6)
  assert float(losses.mask_loss(logits, targets, jnp.zeros((1, 2), bool))) == 0.0


def test_keypoint_loss_uniform_heatmaps_cost_log_m_squared():
  heat = jnp.zeros((1, 2, 4, 4, 3))
  index = jnp.array([[[0, 5, 15], [1, 2, 3]]])
  valid = jnp.array([[[True, True, False], [False, False, False]]])
  np.testing.assert_allclose(losses.keypoint_loss(heat, index, valid), np.log(16), rtol=1e-6)
  # A confident correct logit makes that keypoint's loss ~0.
  sharp = heat.at[0, 0, 0, 0, 0].set(100.0).at[0, 0, 1, 1, 1].set(100.0)
  assert float(losses.keypoint_loss(sharp, index, valid)) < 1e-6


def test_keypoint_position_loss_hand_computed():
  """L1 in heatmap cells (m across each RoI), x and y summed, over the valid keypoints."""
  rois = jnp.array([[[0.0, 0.0, 8.0, 8.0], [10.0, 10.0, 14.0, 30.0]]])  # m=4: 2 px / cell; 1 x 5
  keypoints = jnp.array([[[[2.0, 2.0, 2], [7.0, 1.0, 1]], [[12.0, 20.0, 2], [0.0, 0.0, 0]]]])
  predicted = jnp.array([[[[3.0, 2.0], [7.0, 5.0]], [[13.0, 15.0], [99.0, 99.0]]]])
  valid = jnp.array([[[True, True], [True, False]]])
  # (1 px / 2) + (4 px / 2) + (1 px / 1 + 5 px / 5) over 3 keypoints
  want = (0.5 + 2.0 + 2.0) / 3
  np.testing.assert_allclose(losses.keypoint_position_loss(predicted, keypoints, rois, 4, valid),
                             want, rtol=1e-6)
  none = jnp.zeros_like(valid)
  assert float(losses.keypoint_position_loss(predicted, keypoints, rois, 4, none)) == 0.0
