"""A converted detectron2 R50-C4 Mask R-CNN computes what the detectron2 model computes.

detectron2 is not installed here, so its C4 model (Base-RCNN-C4: ResNet
res2..res4 as the backbone, StandardRPNHead on res4, Res5ROIHeads with
ROIAlignV2 14x14 at 1/16 and sampling ratio 0, res5, mean pool,
FastRCNNOutputLayers, and MaskRCNNConvUpsampleHead with no convs) is written
below in torch from torchvision's parts: torchvision's ResNet-50 with frozen
BN and the stride moved to each downsampling block's 1x1 conv (MSRA's layout,
which detectron2's model-zoo weights and configs/coco_mask_rcnn_r50_c4_1x.py
use), ``torchvision.ops.roi_align`` (the kernel detectron2's ROIAlign calls),
and detectron2's anchor order (size first). Its random weights are saved
under detectron2's names in a model-zoo style ``.pkl``, converted with
``python -m mrcnn_jax.convert --arch=mask_rcnn_R_50_C4``, and each stage is
compared on the same input and boxes to within 1e-4 of its magnitude.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax import convert
from tests.parity import conftest as parity
from tests.parity.test_torchvision_parity import assert_close

pytestmark = pytest.mark.slow

H, W = 192, 320  # multiples of 32: no padding on either side
NUM_CLASSES = 5
SIZES, RATIOS = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)  # detectron2's C4 anchors
# Per image: RoIs of several sizes; the 300-pixel-wide one takes 2 samples per
# bin along x (ceil(300 / 16 / 14)), the rest 1: adaptive sampling exercised.
BOXES = np.array([
    [[4.0, 6.0, 304.0, 180.0], [20.5, 30.2, 90.7, 75.1], [100.0, 10.0, 131.0, 170.0]],
    [[0.0, 0.0, 64.0, 64.0], [150.3, 40.8, 310.6, 150.2], [50.0, 120.0, 58.0, 126.0]],
], np.float32)


def _d2_name(name: str) -> str:
  """torchvision ResNet name -> detectron2's (res2..res4 in the backbone, res5 in the RoI heads)."""
  name = re.sub(r"^conv1\.", "backbone.stem.conv1.", name)
  name = re.sub(r"^bn1\.", "backbone.stem.conv1.norm.", name)
  name = re.sub(r"^layer(\d)\.", lambda m: "roi_heads.res5." if m[1] == "4"
                else f"backbone.res{int(m[1]) + 1}.", name)
  name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
  name = name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
  return name


def build_reference(torch, torchvision, seed=0):
  """detectron2's R50-C4 Mask R-CNN as torch modules, with random weights."""
  from torchvision.ops.misc import FrozenBatchNorm2d
  torch.manual_seed(seed)
  resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
  for layer in (resnet.layer2, resnet.layer3, resnet.layer4):  # MSRA: stride in the 1x1
    layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
  nn = torch.nn
  a = len(SIZES) * len(RATIOS)
  heads = nn.ModuleDict({
      "rpn_conv": nn.Conv2d(1024, 1024, 3, padding=1), "objectness": nn.Conv2d(1024, a, 1),
      "anchor_deltas": nn.Conv2d(1024, 4 * a, 1),
      "cls_score": nn.Linear(2048, NUM_CLASSES + 1), "bbox_pred": nn.Linear(2048, 4 * NUM_CLASSES),
      "deconv": nn.ConvTranspose2d(2048, 256, 2, stride=2),
      "predictor": nn.Conv2d(256, NUM_CLASSES, 1),
  })
  parity.randomise_detectron2_layout(torch, resnet, heads, seed)
  return resnet, heads


def detectron2_state(resnet, heads) -> dict:
  """The reference's weights under detectron2's names (``fc`` dropped)."""
  out = {_d2_name(k): v.numpy() for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
  prefix = {"rpn_conv": "proposal_generator.rpn_head.conv",
            "objectness": "proposal_generator.rpn_head.objectness_logits",
            "anchor_deltas": "proposal_generator.rpn_head.anchor_deltas",
            "cls_score": "roi_heads.box_predictor.cls_score",
            "bbox_pred": "roi_heads.box_predictor.bbox_pred",
            "deconv": "roi_heads.mask_head.deconv", "predictor": "roi_heads.mask_head.predictor"}
  for key, module in heads.items():
    out[f"{prefix[key]}.weight"] = module.weight.detach().numpy()
    out[f"{prefix[key]}.bias"] = module.bias.detach().numpy()
  return out


def detectron2_anchors(hf: int, wf: int, stride: int = 16) -> np.ndarray:
  """DefaultAnchorGenerator (offset 0): ``[hf * wf * A, 4]``, sizes before ratios per cell."""
  cells = []
  for size in SIZES:
    for ratio in RATIOS:
      w = np.sqrt(size * size / ratio)
      h = ratio * w
      cells.append([-w / 2, -h / 2, w / 2, h / 2])
  ys, xs = np.meshgrid(np.arange(hf) * stride, np.arange(wf) * stride, indexing="ij")
  shifts = np.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
  return (shifts + np.asarray(cells)[None]).reshape(-1, 4)


def reference_stages(torch, resnet, heads, x: np.ndarray, boxes: np.ndarray) -> dict:
  """Every compared stage of the reference, NHWC / per-anchor numpy arrays."""
  from torchvision.ops import roi_align
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(t))))
    c4 = resnet.layer3(resnet.layer2(resnet.layer1(t)))
    b, _, hf, wf = c4.shape
    h = torch.relu(heads["rpn_conv"](c4))
    objectness = heads["objectness"](h).permute(0, 2, 3, 1).reshape(b, -1)
    deltas = heads["anchor_deltas"](h)
    deltas = deltas.view(b, -1, 4, hf, wf).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
    pooled = roi_align(c4, [torch.from_numpy(bx) for bx in boxes], output_size=14,
                       spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    res5 = resnet.layer4(pooled)
    feature = res5.mean(dim=(2, 3))
    logits, box_deltas = heads["cls_score"](feature), heads["bbox_pred"](feature)
    masks = heads["predictor"](torch.relu(heads["deconv"](res5)))
  r = boxes.shape[1]
  return {"c4": c4.permute(0, 2, 3, 1).numpy(), "objectness": objectness.numpy(),
          "deltas": deltas.numpy(), "anchors": detectron2_anchors(hf, wf),
          "logits": logits.numpy().reshape(b, r, -1),
          "box_deltas": box_deltas.numpy().reshape(b, r, NUM_CLASSES, 4),
          "masks": masks.permute(0, 2, 3, 1).numpy().reshape(b, r, 14, 14, NUM_CLASSES)}


def _stages(m, x, boxes):
  """Our side of ``reference_stages`` (a method for ``model.apply``)."""
  maps, strides, roi = m.features(x, None, train=False)
  objectness, deltas = m.rpn.rpn_head(maps)
  extent = jnp.broadcast_to(jnp.asarray(x.shape[1:3], jnp.int32), (x.shape[0], 2))
  anchors, _ = m.rpn.anchors(maps, strides, extent)
  logits, box_deltas, res5 = m.roi_heads.box_outputs(roi, boxes, False)
  return {"c4": maps[0], "objectness": objectness[0], "deltas": deltas[0], "anchors": anchors[0],
          "logits": logits, "box_deltas": box_deltas, "masks": m.roi_heads.mask_head(res5)}


def _by_anchor(anchors: np.ndarray) -> np.ndarray:
  """The order that sorts ``anchors [N, 4]`` by their corners (both sides' orders differ)."""
  a = np.round(anchors.astype(np.float64), 3)
  return np.lexsort((a[:, 3], a[:, 2], a[:, 1], a[:, 0]))


@pytest.fixture(scope="module")
def reference():
  """(resnet, heads, their detectron2-named weights), built once for the module."""
  from tests.conftest import _import_torchvision
  torch, torchvision = _import_torchvision()
  resnet, heads = build_reference(torch, torchvision)
  return resnet, heads, detectron2_state(resnet, heads)


def test_c4_stages_match_detectron2_layout_reference(torch, reference, tmp_path):
  resnet, heads, state = reference
  out = parity.convert_detectron2_state(state, "mask_rcnn_R_50_C4", tmp_path)

  from configs import coco_mask_rcnn_r50_c4_1x
  config = coco_mask_rcnn_r50_c4_1x.get_config()
  config.model.num_classes = NUM_CLASSES
  x, ours = parity.our_stages(config, out, _stages, H, W, BOXES)
  theirs = reference_stages(torch, resnet, heads, x, BOXES)

  assert_close("C4", ours["c4"], theirs["c4"])
  for i in range(x.shape[0]):
    mine, ref = _by_anchor(ours["anchors"][i]), _by_anchor(theirs["anchors"])
    np.testing.assert_allclose(ours["anchors"][i][mine], theirs["anchors"][ref], atol=1e-3)
    assert_close(f"RPN objectness, image {i}", ours["objectness"][i][mine],
                 theirs["objectness"][i][ref])
    assert_close(f"RPN deltas, image {i}", ours["deltas"][i][mine], theirs["deltas"][i][ref])
  # detectron2: K foreground logits then background, K class boxes, K masks (ours too).
  assert_close("box logits", ours["logits"], theirs["logits"])
  assert_close("box deltas", ours["box_deltas"], theirs["box_deltas"])
  assert_close("mask logits", ours["masks"], theirs["masks"])


def test_anchor_order_hand_computed():
  """Ours: ratio first (r * 5 + s); detectron2: size first (s * 3 + r)."""
  order = convert.anchor_order(15)
  assert order[:6] == [0, 3, 6, 9, 12, 1]  # ratio 0.5 at sizes 32..512, then ratio 1 at 32
  assert sorted(order) == list(range(15)) and convert.anchor_order(3) == [0, 1, 2]
  with pytest.raises(convert.ConversionError, match="14 anchors"):
    convert.anchor_order(14)


def test_c4_file_under_other_archs_is_named(reference):
  """Every C4 tensor is used exactly once: other archs name what is missing or left over."""
  state = reference[2]
  variables = convert.convert_arrays(state, "detectron2", "mask_rcnn_R_50_C4")
  assert variables["params"]["box_head"]["res5"]["2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
  with pytest.raises(convert.ConversionError, match=r"unused tensor.*roi_heads\.mask_head"):
    convert.convert_arrays(state, "detectron2", "faster_rcnn_R_50_C4")
  with pytest.raises(convert.ConversionError, match=r"missing tensor 'backbone\.bottom_up"):
    convert.convert_arrays(state, "detectron2", "mask_rcnn_R_50_FPN")
  extra = dict(state, **{"roi_heads.res5.3.conv1.weight": state["roi_heads.res5.2.conv1.weight"]})
  with pytest.raises(convert.ConversionError, match=r"unused tensor.*roi_heads\.res5\.3"):
    convert.convert_arrays(extra, "detectron2", "mask_rcnn_R_50_C4")
