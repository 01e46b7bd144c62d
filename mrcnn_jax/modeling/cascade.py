"""Cascade R-CNN's stage 2 (Cai & Vasconcelos 2018), as detectron2's CascadeROIHeads.

The box head runs in stages: stage 1 is the standard box head on the sampled
RoIs (IoU 0.5, box coder weights (10, 10, 5, 5)); each later stage pools the
previous stage's regressed boxes (clipped to the image, without gradient),
labels them at a higher IoU (0.6, 0.7) with no resampling, and regresses
them again with finer weights ((20, 20, 10, 10), (30, 30, 15, 15)). The
stages' losses are summed (``loss_cls_stage{k}``, ``loss_box_reg_stage{k}``);
the gradient each stage sends into the features is scaled by 1/stages, as
detectron2 does (equal to averaging the losses, with the heads' own
gradients unscaled). At inference the class probabilities are averaged over
the stages, each computed on its own input boxes, and the last stage's
boxes are the detections'. Box regression is class-agnostic (each stage's
boxes feed the next). The mask and keypoint heads train on stage 1's
sampled RoIs and run on the final detections, as in detectron2.

Parameters: ``box_head`` is stage 1 (a standard model's box head fits it);
``refine_box_heads_{i}`` is stage i + 2.
"""

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax import losses as loss_lib
from mrcnn_jax.modeling.roi_heads import RoIFeatures, RoIHeads
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import targets as target_ops

Array = jnp.ndarray

# detectron2's cascade (ROI_BOX_CASCADE_HEAD): the refinement stages after the
# first, their foreground IoUs and box coder weights (model.cascade).
DETECTRON2_IOU_THRESHOLDS = (0.6, 0.7)
DETECTRON2_BOX_WEIGHTS = ((20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


@jax.custom_vjp
def scale_gradient(x: Array, scale: float) -> Array:
  """``x`` unchanged; its gradient times ``scale``."""
  return x


def _scale_forward(x, scale):
  return x, scale


def _scale_backward(scale, g):
  return g * scale, None


scale_gradient.defvjp(_scale_forward, _scale_backward)


class CascadeRoIHeads(RoIHeads):
  """RoIHeads whose box head is a cascade of ``1 + len(refine_box_heads)`` stages."""
  refine_box_heads: Sequence = ()  # BoxHead per later stage (class-agnostic)
  refine_iou_thresholds: Sequence[float] = ()  # foreground IoU per later stage
  refine_box_weights: Sequence[Tuple[float, float, float, float]] = ()

  @property
  def stages(self):
    """(box head, foreground IoU, box coder weights) of every stage, the first first."""
    return super().stages + list(zip(self.refine_box_heads, self.refine_iou_thresholds,
                                     self.refine_box_weights))

  def initialize(self, features: RoIFeatures, batch_size: int) -> None:
    super().initialize(features, batch_size)
    one_box = jnp.zeros((batch_size, 1, 4), jnp.float32)
    for head in self.refine_box_heads:
      head(self.pooler(features, one_box, self.box_pooler_resolution))

  def _stage(self, head, features: RoIFeatures, boxes: Array, train: bool):
    """One stage's (logits, class-agnostic deltas ``[B, R, 4]``) on ``boxes [B, R, 4]``."""
    pooled = self.pooler(features, boxes, self.box_pooler_resolution)
    logits, deltas = head(scale_gradient(pooled, 1.0 / len(self.stages)), train=train)
    return logits, deltas[:, :, 0]

  @staticmethod
  def _next_boxes(deltas: Array, boxes: Array, weights, image_size: Array) -> Array:
    """A stage's regressed boxes, clipped to each image, as the next stage's input."""
    decoded = box_ops.decode(deltas.reshape(-1, 4), boxes.reshape(-1, 4),
                             weights).reshape(boxes.shape)
    clip = lambda b, s: box_ops.clip_to_image(b, s[0], s[1])
    return jax.lax.stop_gradient(jax.vmap(clip)(decoded, image_size.astype(jnp.float32)))

  def box_losses(self, features: RoIFeatures, rois: Dict[str, Array], gt: Dict[str, Array],
                 image_size: Array, train: bool):
    """Every stage's ``loss_cls_stage{k}`` and ``loss_box_reg_stage{k}`` (no res5)."""
    gt_boxes = gt["gt_boxes"].astype(jnp.float32)
    out, targets, previous = {}, rois, None
    for k, (head, iou_threshold, weights) in enumerate(self.stages):
      if previous is not None:
        deltas, boxes, prev_weights = previous
        boxes = self._next_boxes(deltas, boxes, prev_weights, image_size)
        nonempty = jnp.all(boxes[..., 2:] > boxes[..., :2], axis=-1)
        targets = jax.vmap(lambda b, bv, gb, gcl, gv, gc: target_ops.label_boxes(
            b, bv, gb, gcl, gv, gc, self.num_classes, iou_threshold,
            self.crowd_ioa_threshold, weights))(
                boxes, targets["valid"] & nonempty, gt_boxes, gt["gt_classes"],
                gt["gt_valid"], gt["gt_is_crowd"])
      logits, deltas = self._stage(head, features, targets["boxes"], train)
      losses = loss_lib.box_head_losses(logits, deltas[:, :, None], targets,
                                        self.box_loss_type, self.box_smooth_l1_beta, weights)
      out |= {f"{name}_stage{k}": value for name, value in losses.items()}
      previous = (deltas, targets["boxes"], weights)
    return out, None

  def box_predictions(self, features: RoIFeatures, proposals: Array, image_size: Array):
    """log of the stages' mean class probabilities, the last stage's deltas and its input
    boxes: ``detections`` then scores the mean and decodes the last stage's boxes."""
    boxes, probabilities, previous = proposals, [], None
    for head, _, weights in self.stages:
      if previous is not None:
        boxes = self._next_boxes(*previous, image_size)
      logits, deltas = self._stage(head, features, boxes, False)
      probabilities.append(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
      previous = (deltas, boxes, weights)
    mean = sum(probabilities) / len(probabilities)
    return jnp.log(jnp.maximum(mean, 1e-30)), previous[0][:, :, None], boxes
