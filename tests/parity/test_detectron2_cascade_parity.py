"""A converted detectron2 Cascade Mask R-CNN R50-FPN computes what the detectron2 model computes.

detectron2 is not installed here, so its cascade (Base-RCNN-FPN with
CascadeROIHeads, configs/Misc/cascade_mask_rcnn_R_50_FPN_*.yaml) is written
below in torch: torchvision's ResNet-50 with frozen BN and the stride in each
downsampling block's 1x1 conv (MSRA's layout) under torchvision's FPN (the
same lateral/output convs, nearest 2x top-down and P6 by a stride-2 max-pool
as detectron2's FPN with LastLevelMaxPool); ROIPooler as detectron2 has it
(level floor(4 + log2(sqrt(area) / canonical)) clamped to P2..P5, then
``torchvision.ops.roi_align`` with aligned=True and sampling ratio 0, the
kernel ROIAlignV2 calls); per stage FastRCNNConvFCHead (fc1, fc2 with ReLU
on the (C, y, x) flattening) and FastRCNNOutputLayers (cls_score with
background last, a class-agnostic bbox_pred); Box2BoxTransform with the
stage's weights and dw, dh clamped at log(1000/16); each stage's boxes
clipped to the image as the next stage's proposals; at inference the mean of
the stages' softmax scores and the last stage's decoded boxes; and
MaskRCNNConvUpsampleHead on the final boxes. Its random weights are saved
under detectron2's names (``roi_heads.box_head.{k}.fc1``,
``roi_heads.box_predictor.{k}.cls_score``, ...) in a model-zoo style
``.pkl``, converted with ``python -m mrcnn_jax.convert
--arch=cascade_mask_rcnn_R_50_FPN``, run with the config the converter names
(configs/cascade_mask_rcnn_r50_fpn_1x.py:detectron2), and compared stage by
stage on the same input and proposals to within 1e-4 of each output's magnitude.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import convert
from mrcnn_jax.ops import boxes as box_ops
from tests.parity import conftest as parity
from tests.parity.test_convert import detectron2_from_torchvision
from tests.parity.test_torchvision_parity import assert_close

pytestmark = pytest.mark.slow

H, W = 128, 192  # multiples of 32: no padding on either side
NUM_CLASSES = 5
# FPN eq. 1's canonical size, scaled down on both sides so that this small
# image's boxes (and their regressed versions) reach every level P2..P5.
CANONICAL = 56.0
STAGE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
SCALE_CLAMP = math.log(1000.0 / 16)  # detectron2's _DEFAULT_SCALE_CLAMP
# Per image: proposals of sizes that read P2 (sqrt(area) < 28) to P5 (>= 112),
# some touching the border so that clipping the regressed boxes matters.
PROPOSALS = np.array([
    [[4.0, 6.0, 180.0, 124.0], [20.5, 30.2, 60.7, 55.1], [100.0, 10.0, 111.0, 30.0],
     [0.0, 0.0, 70.0, 90.0], [150.3, 70.8, 192.0, 128.0], [60.0, 40.0, 130.0, 100.0]],
    [[0.0, 0.0, 64.0, 64.0], [90.3, 40.8, 190.6, 120.2], [50.0, 100.0, 58.0, 110.0],
     [10.0, 10.0, 182.0, 118.0], [120.0, 0.0, 160.0, 20.0], [30.0, 50.0, 75.0, 128.0]],
], np.float32)


def build_reference(torch, torchvision, seed=0):
  """detectron2's cascade R50-FPN as torch modules with random weights: (backbone, heads)."""
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.ops.misc import FrozenBatchNorm2d
  torch.manual_seed(seed)
  backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                 norm_layer=FrozenBatchNorm2d, trainable_layers=5)
  body = backbone.body
  for layer in (body.layer2, body.layer3, body.layer4):  # MSRA: stride in the 1x1
    layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
  nn = torch.nn
  stage = lambda: nn.ModuleDict({
      "fc1": nn.Linear(256 * 7 * 7, 1024), "fc2": nn.Linear(1024, 1024),
      "cls_score": nn.Linear(1024, NUM_CLASSES + 1), "bbox_pred": nn.Linear(1024, 4)})
  heads = nn.ModuleDict({
      "rpn_conv": nn.Conv2d(256, 256, 3, padding=1), "objectness": nn.Conv2d(256, 3, 1),
      "anchor_deltas": nn.Conv2d(256, 12, 1),
      "stages": nn.ModuleList([stage() for _ in STAGE_WEIGHTS]),
      **{f"mask_fcn{i}": nn.Conv2d(256, 256, 3, padding=1) for i in range(1, 5)},
      "deconv": nn.ConvTranspose2d(256, 256, 2, stride=2),
      "predictor": nn.Conv2d(256, NUM_CLASSES, 1),
  })
  generator = parity.randomise_detectron2_layout(torch, backbone, heads, seed)
  with torch.no_grad():
    for stage in heads["stages"]:  # boxes that move by a few pixels, some out of the image
      stage["bbox_pred"].bias.normal_(0.0, 1.0, generator=generator)
  return backbone, heads


def detectron2_state(backbone, heads) -> dict:
  """The reference's weights under detectron2's names."""
  out = detectron2_from_torchvision({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
  names = {"rpn_conv": "proposal_generator.rpn_head.conv",
           "objectness": "proposal_generator.rpn_head.objectness_logits",
           "anchor_deltas": "proposal_generator.rpn_head.anchor_deltas",
           "deconv": "roi_heads.mask_head.deconv", "predictor": "roi_heads.mask_head.predictor",
           **{f"mask_fcn{i}": f"roi_heads.mask_head.mask_fcn{i}" for i in range(1, 5)}}
  for k, stage in enumerate(heads["stages"]):
    names |= {f"stages.{k}.{fc}": f"roi_heads.box_head.{k}.{fc}" for fc in ("fc1", "fc2")}
    names |= {f"stages.{k}.{p}": f"roi_heads.box_predictor.{k}.{p}"
              for p in ("cls_score", "bbox_pred")}
  for key, value in heads.state_dict().items():
    module, param = key.rsplit(".", 1)
    out[f"{names[module]}.{param}"] = value.numpy()
  return out


def roi_pool(torch, maps, boxes, resolution):
  """detectron2's ROIPooler (ROIAlignV2, sampling ratio 0) over P2..P5: ``[B * R, C, S, S]``."""
  from torchvision.ops import roi_align
  flat = torch.from_numpy(boxes.reshape(-1, 4))
  index = torch.arange(boxes.shape[0], dtype=flat.dtype).repeat_interleave(boxes.shape[1])
  sizes = torch.sqrt((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1]))
  level = torch.clamp(torch.floor(4 + torch.log2(sizes / CANONICAL + 1e-8)), 2, 5).long() - 2
  out = torch.zeros(len(flat), maps[0].shape[1], resolution, resolution)
  for k in range(4):
    sel = torch.nonzero(level == k).flatten()
    if len(sel):
      rois = torch.cat([index[sel, None], flat[sel]], dim=1)
      out[sel] = roi_align(maps[k], rois, output_size=resolution, spatial_scale=1 / 2 ** (k + 2),
                           sampling_ratio=0, aligned=True)
  return out


def apply_deltas(torch, deltas, boxes, weights):
  """detectron2's Box2BoxTransform.apply_deltas for one box per row."""
  wx, wy, ww, wh = weights
  widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  cx, cy = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
  dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
  dw = torch.clamp(deltas[:, 2] / ww, max=SCALE_CLAMP)
  dh = torch.clamp(deltas[:, 3] / wh, max=SCALE_CLAMP)
  px, py = dx * widths + cx, dy * heights + cy
  pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
  return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=1)


def reference_stages(torch, backbone, heads, x: np.ndarray, proposals: np.ndarray) -> dict:
  """CascadeROIHeads._forward_box at inference, and the mask head on its final boxes."""
  b, r = proposals.shape[:2]
  out = {}
  with torch.no_grad():
    feats = list(backbone(torch.from_numpy(x).permute(0, 3, 1, 2)).values())  # P2..P6
    out["fpn"] = [f.permute(0, 2, 3, 1).numpy() for f in feats]
    boxes, probs = proposals, []
    for k, (stage, weights) in enumerate(zip(heads["stages"], STAGE_WEIGHTS)):
      if k:  # _create_proposals_from_boxes: the previous stage's boxes, clipped (Boxes.clip)
        clipped = decoded.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, W)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, H)
        boxes = clipped.numpy().reshape(b, r, 4)
      pooled = roi_pool(torch, feats[:4], boxes, 7).flatten(1)
      h = torch.relu(stage["fc2"](torch.relu(stage["fc1"](pooled))))
      logits, deltas = stage["cls_score"](h), stage["bbox_pred"](h)
      decoded = apply_deltas(torch, deltas, torch.from_numpy(boxes.reshape(-1, 4)), weights)
      probs.append(torch.softmax(logits, dim=-1))
      out |= {f"boxes{k}": boxes, f"logits{k}": logits.numpy().reshape(b, r, -1),
              f"deltas{k}": deltas.numpy().reshape(b, r, 4),
              f"decoded{k}": decoded.numpy().reshape(b, r, 4)}
    out["scores"] = (sum(probs) / len(probs)).numpy().reshape(b, r, -1)
    out["final_boxes"] = decoded.numpy().reshape(b, r, 4)  # predict_boxes of the last stage
    final = out["final_boxes"].copy()
    final[..., 0::2], final[..., 1::2] = final[..., 0::2].clip(0, W), final[..., 1::2].clip(0, H)
    m = roi_pool(torch, feats[:4], final, 14)
    for i in range(1, 5):
      m = torch.relu(heads[f"mask_fcn{i}"](m))
    masks = heads["predictor"](torch.relu(heads["deconv"](m)))
    out["masks"] = masks.permute(0, 2, 3, 1).numpy().reshape(b, r, 28, 28, NUM_CLASSES)
  return out


def _stages(m, x, proposals):
  """Our side of ``reference_stages`` (a method for ``model.apply``)."""
  maps, _, roi = m.features(x, None, train=False)
  image_size = jnp.broadcast_to(jnp.asarray([H, W], jnp.int32), (x.shape[0], 2))
  heads, out, boxes = m.roi_heads, {"fpn": maps}, proposals
  for k, (head, _, weights) in enumerate(heads.stages):
    if k:
      boxes = heads._next_boxes(deltas, boxes, previous_weights, image_size)
    logits, deltas = heads._stage(head, roi, boxes, False)
    out |= {f"boxes{k}": boxes, f"logits{k}": logits, f"deltas{k}": deltas}
    previous_weights = weights
  log_scores, last_deltas, last_boxes = heads.box_predictions(roi, proposals, image_size)
  final = box_ops.decode(last_deltas.reshape(-1, 4), last_boxes.reshape(-1, 4),
                         heads.stages[-1][2]).reshape(last_boxes.shape)
  clipped = jax.vmap(lambda bx: box_ops.clip_to_image(bx, H, W))(final)
  masks = heads.mask_head(heads.pooler(roi, clipped, heads.mask_pooler_resolution))
  return out | {"scores": jnp.exp(log_scores), "final_boxes": final, "masks": masks}


@pytest.fixture(scope="module")
def reference():
  """(backbone, heads, their detectron2-named weights), built once for the module."""
  from tests.conftest import _import_torchvision
  torch, torchvision = _import_torchvision()
  backbone, heads = build_reference(torch, torchvision)
  return backbone, heads, detectron2_state(backbone, heads)


def test_cascade_stages_match_detectron2_layout_reference(torch, reference, tmp_path, capsys):
  backbone, heads, state = reference
  out = parity.convert_detectron2_state(state, "cascade_mask_rcnn_R_50_FPN", tmp_path)
  hint = "--config=configs/cascade_mask_rcnn_r50_fpn_1x.py:detectron2"
  assert hint in capsys.readouterr().out

  from configs import cascade_mask_rcnn_r50_fpn_1x
  config = cascade_mask_rcnn_r50_fpn_1x.get_config("detectron2")
  config.model.num_classes = NUM_CLASSES
  config.model.roi.canonical_box_size = CANONICAL
  x, ours = parity.our_stages(config, out, _stages, H, W, PROPOSALS)
  theirs = reference_stages(torch, backbone, heads, x, PROPOSALS)

  for level in range(5):
    assert_close(f"P{level + 2}", ours["fpn"][level], theirs["fpn"][level])
  for k in range(len(STAGE_WEIGHTS)):
    # Stage k > 0 reads stage k - 1's regressed, clipped boxes (its input: ``boxes{k}``).
    print(f"stage {k} input boxes: max abs diff "
          f"{np.abs(ours[f'boxes{k}'] - theirs[f'boxes{k}']).max():.3g} px")
    np.testing.assert_allclose(ours[f"boxes{k}"], theirs[f"boxes{k}"], atol=1e-3, rtol=1e-5)
    assert_close(f"stage {k} logits", ours[f"logits{k}"], theirs[f"logits{k}"])
    assert_close(f"stage {k} deltas", ours[f"deltas{k}"], theirs[f"deltas{k}"])
  # The regressed boxes moved, and some left the image (so clipping is exercised).
  assert np.abs(theirs["boxes2"] - PROPOSALS).max() > 1.0
  assert (theirs["decoded0"] != theirs["boxes1"]).any() and (
      theirs["decoded1"] != theirs["boxes2"]).any()
  assert_close("mean class probabilities", ours["scores"], theirs["scores"])
  np.testing.assert_allclose(ours["final_boxes"], theirs["final_boxes"], atol=1e-3, rtol=1e-5)
  assert_close("mask logits on the final boxes", ours["masks"], theirs["masks"])


def test_cascade_conversion_names_stages_and_settings(reference):
  """Stage k's tensors go to refine_box_heads_{k-1}, each used once; the settings that the
  file does not hold are detectron2's, and match the cascade config."""
  state = reference[2]
  variables = convert.convert_arrays(state, "detectron2", "cascade_mask_rcnn_R_50_FPN")
  params = variables["params"]
  fc1 = state["roi_heads.box_head.2.fc1.weight"]
  np.testing.assert_array_equal(params["refine_box_heads_1"]["fc6"]["kernel"],
                                convert.dense_from_chw(fc1, 256))
  np.testing.assert_array_equal(params["refine_box_heads_0"]["predictor"]["bbox_pred"]["bias"],
                                state["roi_heads.box_predictor.1.bbox_pred.bias"])
  cls = state["roi_heads.box_predictor.0.cls_score.weight"]  # background last, as ours
  np.testing.assert_array_equal(params["box_head"]["predictor"]["cls_score"]["kernel"], cls.T)
  model = convert.check_against_model(variables, convert.DETECTRON2_ARCHS[
      "cascade_mask_rcnn_R_50_FPN"], "test")
  from configs import cascade_mask_rcnn_r50_fpn_1x
  recipe = cascade_mask_rcnn_r50_fpn_1x.get_config().model
  assert model.box_head.class_agnostic and model.num_classes == NUM_CLASSES
  assert tuple(model.cascade.iou_thresholds) == tuple(recipe.cascade.iou_thresholds) == (0.6, 0.7)
  assert [tuple(w) for w in model.cascade.box_weights] == [
      tuple(w) for w in recipe.cascade.box_weights] == [w for w in STAGE_WEIGHTS[1:]]
  assert convert.cascade_name("roi_heads.box_predictor.cls_score", 2) == \
      "roi_heads.box_predictor.2.cls_score"
  with pytest.raises(ValueError, match="config arg"):
    cascade_mask_rcnn_r50_fpn_1x.get_config("keypoint")


def test_cascade_file_mismatches_are_named(reference):
  state = reference[2]
  with pytest.raises(convert.ConversionError, match=r"missing tensor 'roi_heads\.box_head\.fc1"):
    convert.convert_arrays(state, "detectron2", "mask_rcnn_R_50_FPN")
  missing = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_head.2.")}
  with pytest.raises(convert.ConversionError, match=r"missing tensor 'roi_heads\.box_head\.2\.fc1"):
    convert.convert_arrays(missing, "detectron2", "cascade_mask_rcnn_R_50_FPN")
  extra = dict(state, **{f"roi_heads.box_head.3.fc1.{p}": state[f"roi_heads.box_head.2.fc1.{p}"]
                         for p in ("weight", "bias")})
  with pytest.raises(convert.ConversionError, match=r"2 unused tensor.*roi_heads\.box_head\.3"):
    convert.convert_arrays(extra, "detectron2", "cascade_mask_rcnn_R_50_FPN")
  specific = dict(state)  # class-specific regression: K boxes, not one
  specific["roi_heads.box_predictor.1.bbox_pred.weight"] = np.tile(
      state["roi_heads.box_predictor.1.bbox_pred.weight"], (NUM_CLASSES, 1))
  with pytest.raises(convert.ConversionError,
                     match=r"roi_heads\.box_predictor\.1\.bbox_pred\.weight has 20 outputs"):
    convert.convert_arrays(specific, "detectron2", "cascade_mask_rcnn_R_50_FPN")
