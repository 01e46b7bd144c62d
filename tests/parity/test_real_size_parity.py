"""torchvision parity at a real image size, in the torchvision config's own 832 x 1344 canvas.

At 256 x 320 (test_torchvision_parity.py) the image is its own canvas and
every anchor stride is nominal. At 800 x 1216 in configs/torchvision_mask_rcnn.py
(its landscape canvas, 832 x 1344) three things show that do not show there:
P6's anchor stride (torchvision's 800 // 13 = 61, not 64), the canvas's padding (0 after
normalisation, and masked at every convolution so features near the image's
edges and on deep levels are the ones torchvision computes on its 800 x 1216
tensor) and RoIAlign's clamping at the edge of the image's own maps.

Weights: the parity conftest's seeded random weights with scaled predictors
(class logits at a spread of ~1.5, so scores spread over (0.05, 1) without
saturating, and top-k and NMS decisions are not carried by rounding-level
differences), and here also the RPN's and the box head's regression layers
scaled to deltas of std ~0.2, what a trained model predicts: random weights
give deltas near 10, boxes 60x their anchors clipped into sub-pixel slivers at
the image's edges, whose IoU and keypoint argmax hinge on rounding. Images:
smooth colour fields with rectangles, as dense as the small tests' (one per
~14k pixels).
"""

import functools

import jax
import numpy as np
import pytest

from mrcnn_jax import checkpointing
from mrcnn_jax.data import canvases
from mrcnn_jax.modeling import build
from tests.parity import conftest as parity
from tests.parity.test_torchvision_parity import _stages, assert_close, match_detections

pytestmark = pytest.mark.slow

HEIGHT, WIDTH = 800, 1216  # torchvision keeps it as is: 800 / 800 and 1216 < 1333
MATCH_FRACTION = 0.99
DELTA_STD = 0.2  # RPN and box-head regression outputs, as a trained model's
OBJECTNESS_STD = 2.0  # RPN logits of the detectron2 reference (see _calibrate)


@pytest.fixture(scope="module")
def real_size_models(converted, tmp_path_factory):
  """``arch -> (torchvision model, checkpoint)``: the parity model with its regression
  layers scaled to deltas of std DELTA_STD (see the module docstring), converted."""
  import copy

  from tests.conftest import _import_torchvision
  from mrcnn_jax import convert
  torch, _ = _import_torchvision()
  root = tmp_path_factory.mktemp("real_size")
  cache = {}

  def get(arch):
    if arch not in cache:
      model = copy.deepcopy(converted(arch)[0])
      with torch.no_grad():
        st = parity.stages_torchvision(torch, model, parity.images_uint8())
        rpn_deltas = torch.cat([d.flatten() for d in st["deltas"]])
        parity._scale_to(torch, model.rpn.head.bbox_pred, rpn_deltas, DELTA_STD)
        parity._scale_to(torch, model.roi_heads.box_predictor.bbox_pred, st["box_deltas"],
                         DELTA_STD)
      pth = root / f"{arch}.pth"
      torch.save(model.state_dict(), pth)
      out = str(root / arch)
      assert convert.main(["--from=torchvision", f"--arch={arch}", f"--input={pth}",
                           f"--output={out}"]) == 0
      cache[arch] = (model, out)
    return cache[arch]

  return get


def _config(keypoint):
  from configs import torchvision_mask_rcnn
  config = torchvision_mask_rcnn.get_config("keypoint" if keypoint else None)
  if keypoint:
    config.model.test.detections_per_image = parity.KEYPOINT_DETECTIONS
  else:
    config.model.num_classes = parity.NUM_CLASSES
  return config


def _transform(mean, std):
  """torchvision's inference transform at 800 / 1333 (the images here need no resizing)."""
  from torchvision.models.detection.transform import GeneralizedRCNNTransform
  return GeneralizedRCNNTransform(800, 1333, mean, std)


def _torchvision_run(torch, model, transform, x, image):
  """The reference's stages and detections on ``x`` (CHW float, as ``transform`` wants it)."""
  with torch.no_grad():
    inputs, _ = transform([x])
    feats = model.backbone(inputs.tensors)
    objectness, deltas = model.rpn.head(list(feats.values()))
    proposals, _ = model.rpn(inputs, feats)
    detections, _ = model.roi_heads(feats, proposals, inputs.image_sizes)
    box_masks = detections[0]["masks"][:, 0].numpy().copy() if "masks" in detections[0] else None
    heads = model.roi_heads
    props = proposals[0][:parity.NUM_PROPOSALS]
    pooled = heads.box_roi_pool(feats, [props], inputs.image_sizes)
    logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
    boxes = props[:parity.NUM_HEAD_BOXES]
    out = {"inputs": inputs.tensors, "fpn": list(feats.values()), "objectness": objectness,
           "deltas": deltas, "proposals": proposals[0], "logits": logits,
           "box_deltas": box_deltas}
    if heads.has_mask():
      out["masks"] = heads.mask_predictor(heads.mask_head(
          heads.mask_roi_pool(feats, [boxes], inputs.image_sizes)))
    if heads.has_keypoint():
      out["heatmaps"] = heads.keypoint_predictor(heads.keypoint_head(
          heads.keypoint_roi_pool(feats, [boxes], inputs.image_sizes)))
    final = transform.postprocess(detections, inputs.image_sizes, [image.shape[:2]])[0]
  return out, final, box_masks


@pytest.mark.parametrize("arch", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_real_size_matches_torchvision(torch, torchvision, real_size_models, arch):
  """Every stage within 1e-4 of its magnitude, >= 99% of proposals and detections matched."""
  keypoint = arch.startswith("keypoint")
  tv_model, checkpoint = real_size_models(arch)
  image = parity.images_uint8(seed=5, count=1, height=HEIGHT, width=WIDTH)[0]
  x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
  transform = _transform(tv_model.transform.image_mean, tv_model.transform.image_std)
  theirs, final, box_masks = _torchvision_run(torch, tv_model, transform, x, image)
  assert tuple(theirs["inputs"].shape[-2:]) == (HEIGHT, WIDTH)

  _compare(theirs, final, box_masks, image, _config(keypoint), checkpoint, keypoint, arch)


def _compare(theirs, final, box_masks, image, config, checkpoint, keypoint, name):
  """Stage by stage and end to end: ours (``config``, ``checkpoint``) against the reference's run."""
  from mrcnn_jax.predict import Predictor
  height, width = image.shape[:2]
  choices = canvases.canvas_sizes(config)
  canvas = choices[canvases.choose((height, width), choices, *canvases.resize_rule(config))]
  assert canvas == (832, 1344)
  x = np.zeros((1, *canvas, 3), np.float32)
  x[0, :height, :width] = theirs["inputs"][0].permute(1, 2, 0).numpy()
  size = np.asarray([[height, width]], np.int32)
  proposals = theirs["proposals"][:parity.NUM_PROPOSALS].numpy()[None]
  model = build.build_model(config)
  variables = checkpointing.load_variables(checkpoint)
  ours = jax.device_get(jax.jit(functools.partial(model.apply, method=functools.partial(
      _stages, keypoint=keypoint)))(variables, x, proposals, image_size=size))

  for level, (o, t) in enumerate(zip(ours["fpn"], theirs["fpn"])):
    t = t.permute(0, 2, 3, 1).numpy()
    assert_close(f"FPN P{level + 2}", o[:, :t.shape[1], :t.shape[2]], t)
    a = o.shape  # the canvas's grid; anchors are position-major
    for output in ("objectness", "deltas"):
      ref = theirs[output][level]
      _, c, h, w = ref.shape
      if output == "objectness":
        ref = ref.permute(0, 2, 3, 1).numpy()  # (1, h, w, A)
        got = ours[output][level].reshape(1, a[1], a[2], c)[:, :h, :w]
      else:
        ref = ref.view(1, c // 4, 4, h, w).permute(0, 3, 4, 1, 2).numpy()  # (1, h, w, A, 4)
        got = ours[output][level].reshape(1, a[1], a[2], c // 4, 4)[:, :h, :w]
      assert_close(f"RPN {output} P{level + 2}", got, ref)

  # Proposals: the reference's found among ours, every corner within 0.01 px plus
  # 1e-4 of the box's size (the stage tolerance: decoding a large delta in float32
  # moves the corners of a 1000-px box by a few hundredths of a pixel; an IoU
  # criterion would hinge on rounding for sub-pixel-thin boxes).
  ref = theirs["proposals"].numpy()
  got = ours["proposals"][0][ours["proposals_valid"][0]]
  distance = np.abs(ref[:, None, :] - got[None, :, :]).max(axis=-1)  # (P, P) px
  tolerance = 0.01 + 1e-4 * np.max(ref[:, 2:] - ref[:, :2], axis=1)
  found = np.mean(distance.min(axis=1) <= tolerance)
  print(f"{name}: proposals reference {len(ref)}, ours {len(got)}, found {found:.4f}")
  assert len(got) == len(ref) and found >= MATCH_FRACTION, (len(got), len(ref), found)

  k = ours["logits"].shape[-1] - 1
  logits = theirs["logits"].numpy().reshape(1, -1, k + 1)
  assert_close("box logits", ours["logits"], np.concatenate([logits[..., 1:], logits[..., :1]], -1))
  assert_close("box deltas", ours["box_deltas"],
               theirs["box_deltas"].numpy().reshape(1, -1, k + 1, 4)[:, :, 1:])
  if keypoint:
    heatmaps = theirs["heatmaps"].permute(0, 2, 3, 1).numpy()
    assert_close("keypoint heatmaps", ours["heatmaps"], heatmaps[None])
  else:
    masks = theirs["masks"][:, 1:].permute(0, 2, 3, 1).numpy()
    assert_close("mask logits", ours["masks"], masks[None])

  # End to end through the Predictor (resize, canvas, model, mapping back).
  predictor = Predictor(config, checkpoint, score_threshold=0.05)
  ref = {"boxes": final["boxes"].numpy(), "scores": final["scores"].numpy(),
         "labels": final["labels"].numpy()}
  if "keypoints" in final:
    ref["keypoints"] = final["keypoints"].numpy()
  if box_masks is not None:
    # torchvision's 28 x 28 probabilities with our paste: its own paste
    # truncates boxes to whole pixels first (see test_torchvision_parity.py).
    from mrcnn_jax.evaluation import coco as coco_eval
    ref["masks"] = coco_eval.paste_masks(box_masks, ref["boxes"], height, width)
  got = predictor(image)
  # Keypoints are compared one by one below: random heatmaps are rough, with
  # near-equal distant peaks, and the static-grid decoding picks the other one
  # for under 1% of keypoints (test_heads.py measures that on its own).
  keypoints = ref.pop("keypoints", None)
  matched, worst = match_detections(got, ref)
  print(f"{name}: reference {len(ref['boxes'])} detections, ours {len(got['boxes'])}, "
        f"matched {matched}; worst over matched pairs: {worst}")
  assert len(ref["boxes"]) >= 40, "too few reference detections to compare"
  assert matched >= MATCH_FRACTION * len(ref["boxes"]), (matched, len(ref["boxes"]))
  if keypoints is not None:
    # Each reference detection's counterpart: ours with the highest box IoU.
    lt = np.maximum(ref["boxes"][:, None, :2], got["boxes"][None, :, :2])
    rb = np.minimum(ref["boxes"][:, None, 2:], got["boxes"][None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda b: np.prod(b[:, 2:] - b[:, :2], axis=1)
    pair = np.argmax(inter / (area(ref["boxes"])[:, None] + area(got["boxes"])[None] - inter), 1)
    error = np.abs(got["keypoints"][pair, :, :2] - keypoints[:, :, :2]).max(-1)  # (N, Kp) px
    close = np.mean(error <= 1.0)
    print(f"{name}: keypoints within 1 px of the reference's: {close:.4f} of {error.size}")
    assert close >= MATCH_FRACTION, close


# ------------------------------------------------------------------ detectron2
D2_HEIGHT, D2_WIDTH = 800, 1088  # detectron2 keeps it as is (800 / 800, 1088 < 1333)


def detectron2_reference(torch, torchvision, tv_model):
  """torchvision's Mask R-CNN rewired to compute what detectron2's R50-FPN computes.

  detectron2 cannot be installed here, so its inference path is rebuilt from
  torchvision's modules where they agree (frozen-BN ResNet, FPN, heads, box
  coder, NMS) and replaced where they do not, following detectron2's code:
  - MSRA ResNet: the stride of each stage's first block in its 1x1 conv
    (ResNet ``stride_in_1x1``);
  - input: BGR, 0..255, minus PIXEL_MEAN, std 1;
  - DefaultAnchorGenerator: cell anchors not rounded, the nominal stride,
    offset 0;
  - ROIPooler: ROIAlignV2 (aligned=True) with sampling_ratio 0, levels by
    floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped to 2..5;
  - RPN: empty boxes dropped (width and height > 0), 1000 per level and 1000
    in all.
  The weights stay torchvision's; the .pkl holds them under detectron2's names.
  """
  import copy
  import math

  from configs import detectron2_mask_rcnn
  from torchvision.ops import roi_align

  model = copy.deepcopy(tv_model)
  body = model.backbone.body
  for layer in (body.layer2, body.layer3, body.layer4):
    layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)

  class Anchors(torch.nn.Module):
    def forward(self, image_list, feature_maps):
      per_level = []
      for level, fmap in enumerate(feature_maps):
        stride, size = 2 ** (level + 2), 32.0 * 2 ** level
        cells = []
        for ratio in (0.5, 1.0, 2.0):  # detectron2's generate_cell_anchors
          w = math.sqrt(size * size / ratio)
          h = ratio * w
          cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        cells = torch.tensor(cells, dtype=torch.float32)
        gh, gw = fmap.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(gh) * stride, torch.arange(gw) * stride,
                                indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).float()
        per_level.append((shifts + cells[None]).reshape(-1, 4))
      return [torch.cat(per_level)] * len(image_list.image_sizes)

  class Pooler(torch.nn.Module):
    def __init__(self, output_size):
      super().__init__()
      self.output_size = output_size

    def forward(self, features, proposals, image_shapes):
      maps = [features[k] for k in ("0", "1", "2", "3")]
      rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                        for i, b in enumerate(proposals)])
      area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
      level = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)).clamp(2, 5).long()
      out = torch.zeros(len(rois), maps[0].shape[1], self.output_size, self.output_size)
      for k, fmap in zip(range(2, 6), maps):
        idx = torch.nonzero(level == k).squeeze(1)
        out[idx] = roi_align(fmap, rois[idx], self.output_size, 1.0 / 2 ** k, 0, True)
      return out

  model.rpn.anchor_generator = Anchors()
  model.rpn.min_size = 1e-6  # torchvision keeps sides >= min_size; detectron2 those > 0
  model.roi_heads.box_roi_pool = Pooler(7)
  model.roi_heads.mask_roi_pool = Pooler(14)
  transform = _transform(list(detectron2_mask_rcnn.MSRA_MEAN_BGR), [1.0, 1.0, 1.0])
  return model, transform


def _calibrate(torch, model, transform, x):
  """The predictors scaled as the parity conftest scales them (class logits ~1.5, mask
  logits ~6), the RPN's logits to OBJECTNESS_STD and the regression layers to DELTA_STD,
  on this model's own outputs for ``x``: moving the stride into the 1x1 convs changes
  every feature."""
  with torch.no_grad():
    inputs, _ = transform([x])
    feats = model.backbone(inputs.tensors)
    objectness, deltas = model.rpn.head(list(feats.values()))
    # Logits near 75 here: torchvision's RPN ranks its NMS by sigmoid(logit),
    # which saturates at 1 and leaves the order to ties (detectron2 ranks logits).
    parity._scale_to(torch, model.rpn.head.cls_logits,
                     torch.cat([o.flatten() for o in objectness]), OBJECTNESS_STD)
    parity._scale_to(torch, model.rpn.head.bbox_pred, torch.cat([d.flatten() for d in deltas]),
                     DELTA_STD)
    proposals, _ = model.rpn(inputs, feats)
    heads = model.roi_heads
    pooled = heads.box_roi_pool(feats, proposals, inputs.image_sizes)
    logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
    parity._scale_to(torch, heads.box_predictor.cls_score, logits, 1.5)
    parity._scale_to(torch, heads.box_predictor.bbox_pred, box_deltas, DELTA_STD)
    boxes = [p[:parity.NUM_HEAD_BOXES] for p in proposals]
    masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(feats, boxes,
                                                                     inputs.image_sizes)))
    parity._scale_to(torch, heads.mask_predictor.mask_fcn_logits, masks, 6.0)


def test_real_size_matches_a_detectron2_reference(torch, torchvision, real_size_models, tmp_path):
  """configs/detectron2_mask_rcnn.py on a detectron2-format .pkl at 800 x 1088: every
  stage within 1e-4, >= 99% of the reference's proposals and detections matched."""
  import pickle

  from mrcnn_jax import convert
  from tests.parity.test_convert import detectron2_from_torchvision
  tv_model, _ = real_size_models("maskrcnn_resnet50_fpn")
  model, transform = detectron2_reference(torch, torchvision, tv_model)
  image = parity.images_uint8(seed=6, count=1, height=D2_HEIGHT, width=D2_WIDTH)[0]
  x = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1).float()  # BGR, 0..255
  _calibrate(torch, model, transform, x)
  pkl = tmp_path / "model_final.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"model": detectron2_from_torchvision(model.state_dict())}, f, protocol=2)
  checkpoint = str(tmp_path / "d2")
  assert convert.main(["--from=detectron2", "--arch=mask_rcnn_R_50_FPN", f"--input={pkl}",
                       f"--output={checkpoint}"]) == 0

  theirs, final, box_masks = _torchvision_run(torch, model, transform, x, image)
  assert tuple(theirs["inputs"].shape[-2:]) == (D2_HEIGHT, D2_WIDTH)

  from configs import detectron2_mask_rcnn
  config = detectron2_mask_rcnn.get_config()
  config.model.num_classes = parity.NUM_CLASSES
  _compare(theirs, final, box_masks, image, config, checkpoint, False, "detectron2")
