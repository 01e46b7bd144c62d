"""Our Mask R-CNN / Keypoint R-CNN computes what torchvision computes from the same weights.

Models, weights and images: tests/parity/conftest.py. Stage tests feed both
sides the same normalised input and the same proposals/boxes and compare each
output to within 1e-4 of its magnitude; end-to-end tests run torchvision's
model and our ``Predictor`` on the same uint8 images, from the checkpoint
``python -m mrcnn_jax.convert`` wrote.
"""

import functools

import jax
import numpy as np
import pytest

from mrcnn_jax import checkpointing
from mrcnn_jax.modeling import build
from tests import references
from tests.parity import conftest as parity

pytestmark = pytest.mark.slow

REL_TOL = 1e-4


def assert_close(name, ours, theirs, rel=REL_TOL):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err = np.max(np.abs(ours - theirs))
  scale = np.max(np.abs(theirs))
  print(f"{name}: max abs diff {err:.3g}, magnitude {scale:.3g}, relative {err / scale:.3g}")
  assert err <= rel * scale, (name, err, scale)


def _stages(m, x, proposals, keypoint, image_size=None):
  """Our side of ``parity.stages_torchvision`` (a method for ``model.apply``).

  ``image_size`` None: the canvas is the image. Given, the image sits in a larger
  canvas, and our own proposals are returned too (``proposals``, ``proposals_valid``).
  """
  rpn_maps, strides, roi = m.features(x, image_size, train=False)
  objectness, deltas = m.rpn.rpn_head(rpn_maps)
  logits, box_deltas, _ = m.roi_heads.box_outputs(roi, proposals, False)
  out = {"fpn": rpn_maps, "objectness": objectness, "deltas": deltas, "logits": logits,
         "box_deltas": box_deltas}
  if image_size is not None:
    rpn_out = m.rpn(rpn_maps, strides, roi.image_extent, image_size, training_counts=False)
    out["proposals"], out["proposals_valid"] = rpn_out.proposals, rpn_out.proposals_valid
  boxes = proposals[:, :parity.NUM_HEAD_BOXES]
  heads = m.roi_heads
  if keypoint:
    out["heatmaps"] = heads.keypoint_head(heads.pooler(roi, boxes,
                                                       heads.keypoint_pooler_resolution))
  else:
    out["masks"] = heads.mask_head(heads.pooler(roi, boxes, heads.mask_pooler_resolution))
  return out


@pytest.mark.parametrize("arch", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_stages_match_torchvision(torch, converted, arch):
  keypoint = arch.startswith("keypoint")
  tv_model, checkpoint, _ = converted(arch)
  theirs = parity.stages_torchvision(torch, tv_model, parity.images_uint8())
  config = parity.our_config(keypoint)
  model = build.build_model(config)
  variables = checkpointing.load_variables(checkpoint)
  x = theirs["inputs"].permute(0, 2, 3, 1).numpy()
  proposals = np.stack([p.numpy() for p in theirs["proposals"]])
  ours = jax.jit(functools.partial(model.apply, method=functools.partial(
      _stages, keypoint=keypoint)))(variables, x, proposals)
  ours = jax.device_get(ours)

  b = x.shape[0]
  for level, (o, t) in enumerate(zip(ours["fpn"], theirs["fpn"])):
    assert_close(f"FPN P{level + 2}", o, t.permute(0, 2, 3, 1).numpy())
  for level, (o, t) in enumerate(zip(ours["objectness"], theirs["objectness"])):
    assert_close(f"RPN objectness P{level + 2}", o, t.permute(0, 2, 3, 1).reshape(b, -1).numpy())
  for level, (o, t) in enumerate(zip(ours["deltas"], theirs["deltas"])):
    _, a4, h, w = t.shape
    t = t.view(b, a4 // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
    assert_close(f"RPN deltas P{level + 2}", o, t.numpy())

  k = ours["logits"].shape[-1] - 1
  logits = theirs["logits"].numpy().reshape(b, -1, k + 1)
  assert_close("box logits", ours["logits"], np.concatenate([logits[..., 1:], logits[..., :1]], -1))
  box_deltas = theirs["box_deltas"].numpy().reshape(b, -1, k + 1, 4)[:, :, 1:]
  assert_close("box deltas", ours["box_deltas"], box_deltas)
  if keypoint:
    heatmaps = theirs["heatmaps"].permute(0, 2, 3, 1).numpy()
    assert_close("keypoint heatmaps", ours["heatmaps"], heatmaps.reshape(b, -1, *heatmaps.shape[1:]))
  else:
    masks = theirs["masks"][:, 1:].permute(0, 2, 3, 1).numpy()
    assert_close("mask logits", ours["masks"], masks.reshape(b, -1, *masks.shape[1:]))


def match_detections(ours, theirs, mask_iou=0.95):
  """Greedy one-to-one matching of torchvision's detections (in score order) to ours.

  A pair matches with the same class, box IoU >= 0.99, score within 1e-3, and
  (where present) mask IoU >= 0.95 and every keypoint within 1 pixel.
  Returns (number matched, per-criterion worst values over matched pairs).
  """
  iou = references.iou(theirs["boxes"], ours["boxes"]) if len(ours["boxes"]) else None
  used = np.zeros(len(ours["boxes"]), bool)
  matched, worst = 0, {"box_iou": 1.0, "score": 0.0, "mask_iou": 1.0, "keypoint_px": 0.0}
  for i in range(len(theirs["boxes"])):
    if iou is None:
      break
    ok = ~used & (ours["category_ids"] == theirs["labels"][i]) & (iou[i] >= 0.99) & (
        np.abs(ours["scores"] - theirs["scores"][i]) <= 1e-3)
    for j in np.flatnonzero(ok)[np.argsort(-iou[i][ok])]:
      checks = {"box_iou": iou[i, j], "score": abs(ours["scores"][j] - theirs["scores"][i])}
      if "masks" in theirs:
        a, b = ours["masks"][j], theirs["masks"][i]
        checks["mask_iou"] = (a & b).sum() / max((a | b).sum(), 1)
        if checks["mask_iou"] < mask_iou:
          continue
      if "keypoints" in theirs:
        checks["keypoint_px"] = np.max(np.abs(ours["keypoints"][j, :, :2] -
                                              theirs["keypoints"][i, :, :2]))
        if checks["keypoint_px"] > 1.0:
          continue
      used[j] = True
      matched += 1
      for key, value in checks.items():
        worst[key] = max(worst[key], value) if key in ("score", "keypoint_px") else min(worst[key], value)
      break
  return matched, worst


def torchvision_detect(torch, model, images):
  """``model(images)`` step by step, also keeping each detection's 28 x 28 mask probabilities."""
  with torch.no_grad():
    batch = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
    inputs, _ = model.transform(batch)
    feats = model.backbone(inputs.tensors)
    proposals, _ = model.rpn(inputs, feats)
    detections, _ = model.roi_heads(feats, proposals, inputs.image_sizes)
    box_masks = [d["masks"][:, 0].numpy().copy() for d in detections if "masks" in d]
    pasted = model.transform.postprocess(detections, inputs.image_sizes,
                                         [im.shape[:2] for im in images])
  return pasted, box_masks


@pytest.mark.parametrize("arch", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_end_to_end_detections_match_torchvision(torch, converted, arch):
  """>= 95% of torchvision's detections have a one-to-one match among ours.

  Masks: torchvision pastes its 28 x 28 probabilities after truncating each
  (padded) box to whole pixels, so its masks sit up to a pixel off ours,
  which paste as detectron2 does (no quantisation). Random weights give many
  thin boxes (5 px wide), where that pixel alone costs 0.2 of IoU; so the
  criterion pastes torchvision's probabilities with our paste (the model's
  outputs compared, same paste), and the IoU against torchvision's own
  pasted masks is printed beside it.
  """
  from mrcnn_jax.evaluation import coco as coco_eval
  from mrcnn_jax.predict import Predictor
  keypoint = arch.startswith("keypoint")
  tv_model, checkpoint, _ = converted(arch)
  images = parity.images_uint8()
  outputs, box_masks = torchvision_detect(torch, tv_model, images)
  predictor = Predictor(parity.our_config(keypoint), checkpoint, score_threshold=0.05)
  total = matched_total = 0
  for n, (image, out) in enumerate(zip(images, outputs)):
    theirs = {"boxes": out["boxes"].numpy(), "scores": out["scores"].numpy(),
              "labels": out["labels"].numpy()}
    if "keypoints" in out:
      theirs["keypoints"] = out["keypoints"].numpy()
    ours = predictor(image)
    assert len(theirs["boxes"]) >= 40, "too few torchvision detections to compare"
    if box_masks:
      theirs["masks"] = coco_eval.paste_masks(box_masks[n], theirs["boxes"], *image.shape[:2])
      own_paste = out["masks"][:, 0].numpy() > 0.5
      _, vs_own_paste = match_detections(ours, dict(theirs, masks=own_paste), mask_iou=0.0)
      print(f"{arch}: mask IoU vs torchvision's own paste, worst {vs_own_paste['mask_iou']:.3f}")
    matched, worst = match_detections(ours, theirs)
    print(f"{arch}: torchvision {len(theirs['boxes'])} detections, ours {len(ours['boxes'])}, "
          f"matched {matched}; worst over matched pairs: {worst}")
    total += len(theirs["boxes"])
    matched_total += matched
  assert matched_total >= 0.95 * total, (matched_total, total)
