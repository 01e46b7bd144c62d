"""Stage breakdown of the train step for scripts/benchmark.py: separately jitted pieces.

Each piece is one jitted program, timed alone on the inputs the previous
pieces produced for the benchmark batch. "fwd+bwd" pieces run ``jax.vjp`` with
a random cotangent (an argument, so XLA cannot fold it away) and return every
gradient the train step computes there: for the parameters, and for the
features the step differentiates through.

  backbone_fpn      ResNet + FPN forward; backward to their parameters (frozen
                    stages stop the gradient, as in the step). fwd+bwd.
  rpn_proposals     RPN head on every level, fwd+bwd (its parameters and the
                    features); then anchors, decoding, per-level top-k, NMS and
                    the top-k across levels (forward only: proposals carry no
                    gradient).
  targets_sampling  RPN anchor matching and sampling, RoI matching and
                    sampling (proposals + ground truth), mask targets
                    (RoIAlign of the ground-truth masks). Forward only.
  roi_align         multilevel RoIAlign of the R sampled RoIs (box head size)
                    and of the first M (mask head size), fwd+bwd into P2..P5.
  heads             box head (FCs + predictor) and mask head (convs, deconv,
                    predictor, the ground-truth class's channel), fwd+bwd
                    (parameters and pooled features).
  losses            RPN, box and mask losses, fwd+bwd to the predictions.

The whole step minus the sum of the pieces ("rest") is the optimiser update,
the gradient norm, diagnostics and glue, less whatever fusing the whole step
saves. Not covered: the keypoint head (its time falls in "rest") and the C4
design (no breakdown). The pieces call the model's parts (MaskRCNN.features,
RPN.anchors, RoIHeads.pooler) so that they run exactly the model's code.
"""

import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import losses as loss_lib
from mrcnn_jax.modeling import padding
from mrcnn_jax.modeling import rpn as rpn_lib
from mrcnn_jax.modeling.roi_heads import RoIFeatures
from mrcnn_jax.ops import targets as target_ops

COVERS = {
    "backbone_fpn": "ResNet + FPN, fwd+bwd to parameters",
    "rpn_proposals": "RPN head fwd+bwd; anchors, decode, top-k, NMS (fwd)",
    "targets_sampling": "anchor/RoI matching + sampling, mask targets (fwd)",
    "roi_align": "box + mask RoIAlign, fwd+bwd into P2..P5",
    "heads": "box + mask heads, fwd+bwd",
    "losses": "RPN, box, mask losses, fwd+bwd to predictions",
}


def _timed(fn, args, repeats):
  """(output, {compile_s, ms, gflop}) of ``jax.jit(fn)(*args)``."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ms = 1000 * float(np.median(times))
  gflop = float(cost.get("flops", 0.0)) / 1e9
  return out, {"ms": ms, "gflop": gflop, "gflops": gflop / ms * 1000,
               "compile_s": compile_s}


def _cotangent(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-3, x.dtype), tree)


def breakdown(model, state, batch, key, repeats: int = 3) -> Dict[str, Dict]:
  """{stage: {ms, gflop, gflops, compile_s, covers}} of one train step (FPN design only)."""
  params, model_state = state.params, state.model_state

  def apply(method, p, *args):
    variables = {"params": p, **model_state}
    if model_state:
      return model.apply(variables, *args, method=method, mutable=list(model_state))[0]
    return model.apply(variables, *args, method=method)

  rpn, roi_heads = model.rpn, model.roi_heads
  images = batch["images"]
  image_size = batch["image_info"]["image_size"]
  gt_boxes = batch["gt_boxes"].astype(jnp.float32)
  b = images.shape[0]
  out = {}

  # backbone + FPN
  def backbone_fpn(p, images, cot):
    f = lambda sub: apply(lambda m, x, s: m.features(x, s, True)[0], {**p, **sub}, images,
                          image_size)
    maps, vjp = jax.vjp(f, {k: p[k] for k in ("backbone", "fpn")})
    return maps, vjp(cot)
  maps_shape = jax.eval_shape(
      lambda p, x: apply(lambda m, y, s: m.features(y, s, True)[0], p, x, image_size),
      params, images)
  (maps, _), out["backbone_fpn"] = _timed(
      backbone_fpn, (params, images, _cotangent(maps_shape, 1)), repeats)
  strides = [images.shape[1] // m.shape[1] for m in maps]
  image_extent = (padding.extent(image_size, model.size_divisibility) if model.size_divisibility
                  else jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (b, 2)))

  # RPN head and proposals
  def rpn_proposals(p, maps, image_size, cot):
    f = lambda sub, x: apply(lambda m, y: m.parts()[0].rpn_head(y), {**p, "rpn_head": sub}, x)
    (objectness, deltas), vjp = jax.vjp(f, p["rpn_head"], maps)
    anchors, valid = apply(lambda m, x: m.rpn.anchors(x, strides, image_extent), p, maps)
    objectness = [jnp.where(v, o, -jnp.inf) for o, v in zip(objectness, valid)]
    proposals = rpn_lib.propose(objectness, deltas, anchors, image_size,
                                rpn.pre_nms_topk_train, rpn.post_nms_topk_train,
                                rpn.nms_threshold, rpn.min_size)
    return (objectness, deltas), proposals, vjp(cot)
  head_shape = jax.eval_shape(lambda p, x: apply(lambda m, y: m.parts()[0].rpn_head(y), p, x),
                              params, maps)
  ((objectness, deltas), (proposals, _, proposals_valid), _), out["rpn_proposals"] = _timed(
      rpn_proposals, (params, maps, image_size, _cotangent(head_shape, 2)), repeats)
  all_anchors, all_valid = (jnp.concatenate(x, axis=1) for x in apply(
      lambda m, x: m.rpn.anchors(x, strides, image_extent), params, maps))

  # Targets and sampling (the same calls as MaskRCNN.losses)
  m_rois = min(roi_heads.num_mask_rois, roi_heads.batch_size_per_image)
  mask_size = 2 * roi_heads.mask_pooler_resolution

  def targets_sampling(proposals, proposals_valid, gt, anchors, anchors_valid, key):
    rpn_key, roi_key = jax.random.split(key)
    boxes, valid, crowd = gt["gt_boxes"].astype(jnp.float32), gt["gt_valid"], gt["gt_is_crowd"]
    rpn_t = jax.vmap(lambda a, av, gb, gv, gc, k: target_ops.rpn_targets(
        a, gb, gv, gc, k, rpn.iou_thresholds, rpn.batch_size_per_image,
        rpn.positive_fraction, rpn.crowd_ioa_threshold, anchors_valid=av))(
            anchors, anchors_valid, boxes, valid, crowd, jax.random.split(rpn_key, b))
    rois = jax.vmap(lambda p, pv, gb, gcl, gv, gc, k: target_ops.roi_targets(
        p, pv, gb, gcl, gv, gc, k, roi_heads.num_classes, roi_heads.batch_size_per_image,
        roi_heads.positive_fraction, roi_heads.iou_threshold, roi_heads.crowd_ioa_threshold))(
            proposals, proposals_valid, boxes, gt["gt_classes"], valid, crowd,
            jax.random.split(roi_key, b))
    mask_t = jax.vmap(lambda r, i, gb, gm: target_ops.mask_targets(
        r, i, gb, gm, mask_size, roi_heads.pooler.sampling_ratio))(
            rois["boxes"][:, :m_rois], rois["matched_gt"][:, :m_rois], boxes, gt["gt_masks"])
    return rpn_t, rois, mask_t
  gt = {k: v for k, v in batch.items() if k.startswith("gt_")}
  (rpn_t, rois, mask_t), out["targets_sampling"] = _timed(
      targets_sampling, (proposals, proposals_valid, gt, all_anchors, all_valid, key), repeats)

  # RoIAlign
  roi_strides = strides[:-1]

  def pool(maps, box_rois, mask_rois):
    feats = RoIFeatures(maps, roi_strides, image_extent if model.size_divisibility else None)
    return (roi_heads.pooler(feats, box_rois, roi_heads.box_pooler_resolution),
            roi_heads.pooler(feats, mask_rois, roi_heads.mask_pooler_resolution))

  def roi_align(maps, box_rois, mask_rois, cot):
    pooled, vjp = jax.vjp(lambda x: pool(x, box_rois, mask_rois), maps)
    return pooled, vjp(cot)
  box_rois, mask_rois = rois["boxes"], rois["boxes"][:, :m_rois]
  pooled_shape = jax.eval_shape(pool, maps[:-1], box_rois, mask_rois)
  ((pooled_box, pooled_mask), _), out["roi_align"] = _timed(
      roi_align, (maps[:-1], box_rois, mask_rois, _cotangent(pooled_shape, 3)), repeats)

  # Heads
  classes = jnp.minimum(rois["classes"][:, :m_rois], roi_heads.num_classes - 1)

  def head_outputs(p, pooled_box, pooled_mask):
    logits, box_deltas = apply(lambda m, x: m.parts()[1].box_head(x), p, pooled_box)
    mask_logits = apply(lambda m, x: m.parts()[1].mask_head(x), p, pooled_mask)
    picked = jnp.take_along_axis(mask_logits, classes[:, :, None, None, None], axis=-1)[..., 0]
    return logits, box_deltas, picked

  def heads(p, pooled_box, pooled_mask, cot):
    f = lambda sub, x, y: head_outputs({**p, **sub}, x, y)
    outs, vjp = jax.vjp(f, {k: p[k] for k in ("box_head", "mask_head")}, pooled_box,
                        pooled_mask)
    return outs, vjp(cot)
  heads_shape = jax.eval_shape(head_outputs, params, pooled_box, pooled_mask)
  ((logits, box_deltas, picked), _), out["heads"] = _timed(
      heads, (params, pooled_box, pooled_mask, _cotangent(heads_shape, 4)), repeats)

  # Losses
  def losses(preds, rpn_t, rois, mask_t, anchors):
    def total(preds):
      objectness, deltas, logits, box_deltas, picked = preds
      out = loss_lib.rpn_losses(jnp.concatenate(objectness, 1), jnp.concatenate(deltas, 1),
                                anchors, rpn_t, rpn.batch_size_per_image,
                                rpn.loss_type, rpn.smooth_l1_beta)
      out |= loss_lib.box_head_losses(logits, box_deltas, rois, roi_heads.box_loss_type,
                                      roi_heads.box_smooth_l1_beta)
      out["loss_mask"] = loss_lib.mask_loss(picked, mask_t, rois["foreground"][:, :m_rois])
      return loss_lib.total(out)
    return jax.value_and_grad(total)(preds)
  _, out["losses"] = _timed(
      losses, ((objectness, deltas, logits, box_deltas, picked), rpn_t, rois, mask_t,
               all_anchors), repeats)
  for name, entry in out.items():
    entry["covers"] = COVERS[name]
  return out
