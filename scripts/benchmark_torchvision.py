"""torchvision's side of scripts/benchmark.py: the same Mask R-CNN, and the ops alone.

``build`` makes torchvision's ``MaskRCNN`` from our config: the ResNet depth
with ``FrozenBatchNorm2d`` (what ``maskrcnn_resnet50_fpn`` uses only with
pretrained weights), the same stages frozen (``trainable_layers = 5 -
freeze_at``, the check ``_resnet_fpn_extractor`` applies), FPN channels,
anchors, RPN and RoI counts, head widths and a transform that does not
resize (``min_size = max_size = canvas``). Weights are random
(torchvision's own init). Only what torchvision's MaskRCNN can express is
accepted; ``unsupported`` names the rest.

``compare_roi_align`` and ``compare_nms`` time ``torchvision.ops`` and our ops
on the same inputs. Import torch before TensorFlow (the other order segfaults).
"""

import contextlib
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops import feature_pyramid_network as fpn_ops

RESNETS = {"18": resnet.resnet18, "34": resnet.resnet34, "50": resnet.resnet50,
           "101": resnet.resnet101}

# What differs between the two sides even with matched settings (goes into the JSON).
DIFFERENCES = [
    "inputs: torchvision takes 0..1 images and normalises them, and runs its "
    "GeneralizedRCNNTransform resize at scale 1.0 (an interpolate call), inside the step; "
    "ours takes images already normalised and padded by the input pipeline",
    "mask targets: torchvision RoIAligns full-image instance masks (H x W each); ours "
    "resamples box-cropped 28x28 masks with the same RoIAlign code (DESIGN.md)",
    "mask head: torchvision runs it on the sampled foreground RoIs only (a variable count, "
    "see torchvision.mask_rois_per_image); ours always runs num_mask_rois slots per image, "
    "foreground first, padding masked out of the loss",
    "inference: runs on each side's initial random weights (a few training steps on "
    "random weights with frozen BN can leave no valid box); with random weights every score "
    "is ~1/(K+1) < 0.05, so both sides get +10 on one foreground class's logit bias so that "
    "each fills its detections and runs the mask head on them",
    "ground truth: as many instances per image as the foreground quota (128), so that each "
    "side samples its full quota of foreground RoIs (random-weight proposals rarely overlap "
    "an object); torchvision's mask target cost grows with the instance count (it converts "
    "every full-image mask to float before RoIAlign), ours does not",
    "inference output: torchvision pastes the 100 masks into the image (transform.postprocess) "
    "inside the call; ours returns 28x28 masks per box (pasting is host-side, "
    "mrcnn_jax.evaluation)",
    "RoIAlign: torchvision aligned=False, ours aligned=True (same cost)",
    "losses: torchvision smooth L1 with beta 1/9 for RPN and box regression; ours the "
    "config's (L1 for R50-FPN); negligible cost",
    "proposals: torchvision one batched NMS over levels (level as class) and removes boxes "
    "under 1e-3; ours NMS per level with fixed counts (same result, different work split)",
    "FLOPs: ours from XLA's cost analysis (every HLO op, the NMS loop body counted once); "
    "torchvision's from torch.utils.flop_counter (matmuls and convolutions only)",
    "optimizer: both SGD momentum 0.9, weight decay 1e-4 on weights at the config's "
    "step-0 learning rate; torchvision also decays norm affine and bias parameters",
    "threads: XLA's CPU thread pool (one thread per core) vs torch.set_num_threads(cores)",
]


def unsupported(config) -> List[str]:
  """Settings of ``config`` torchvision's MaskRCNN cannot reproduce (empty: all is well)."""
  m = config.model
  bad = []
  if m.design != "fpn":
    bad.append("design must be 'fpn'")
  if m.backbone.depth not in RESNETS:
    bad.append(f"backbone.depth must be one of {sorted(RESNETS)}")
  if m.backbone.width != 64:
    bad.append("backbone.width must be 64")
  if m.backbone.norm != "frozen_bn":
    bad.append("backbone.norm must be frozen_bn")
  if m.keypoint_head.enabled or not m.mask_head.enabled:
    bad.append("mask head on, keypoint head off")
  if len(set(m.box_head.fc_dims)) != 1 or len(m.box_head.fc_dims) != 2:
    bad.append("box_head.fc_dims must be two equal sizes (TwoMLPHead)")
  if m.box_head.class_agnostic:
    bad.append("box_head.class_agnostic must be False")
  return bad


def build(config, canvas: int, lr: float):
  """(model, optimizer) matching ``config`` on a ``canvas x canvas`` input."""
  m, bb = config.model, config.model.backbone
  torch.manual_seed(0)
  body = RESNETS[bb.depth](weights=None, norm_layer=FrozenBatchNorm2d)
  trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:5 - bb.freeze_at]
  for name, p in body.named_parameters():
    if not any(name.startswith(t) for t in trainable):
      p.requires_grad_(False)
  stage2 = body.inplanes // 8
  backbone = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                             [stage2 * 2 ** i for i in range(4)], m.fpn_channels,
                             extra_blocks=fpn_ops.LastLevelMaxPool())
  c, k = m.fpn_channels, m.num_classes + 1
  box_res, mask_res = m.box_head.pooler_resolution, m.mask_head.pooler_resolution
  fc = m.box_head.fc_dims[0]
  pool = lambda res: MultiScaleRoIAlign(["0", "1", "2", "3"], res, m.roi.sampling_ratio,
                                        canonical_scale=int(m.roi.canonical_box_size))
  mask_dims = [m.mask_head.conv_dim] * m.mask_head.num_convs
  d = config.data
  model = MaskRCNN(
      backbone, num_classes=None, min_size=canvas, max_size=canvas,
      image_mean=[v / 255 for v in d.mean], image_std=[v / 255 for v in d.std],
      rpn_anchor_generator=AnchorGenerator(tuple(tuple(s) for s in m.anchor_sizes),
                                           (tuple(m.aspect_ratios),) * len(m.anchor_sizes)),
      rpn_pre_nms_top_n_train=m.rpn.pre_nms_topk_train,
      rpn_post_nms_top_n_train=m.rpn.post_nms_topk_train,
      rpn_pre_nms_top_n_test=m.rpn.pre_nms_topk_test,
      rpn_post_nms_top_n_test=m.rpn.post_nms_topk_test,
      rpn_nms_thresh=m.rpn.nms_threshold, rpn_fg_iou_thresh=m.rpn.iou_thresholds[1],
      rpn_bg_iou_thresh=m.rpn.iou_thresholds[0],
      rpn_batch_size_per_image=m.rpn.batch_size_per_image,
      rpn_positive_fraction=m.rpn.positive_fraction,
      box_roi_pool=pool(box_res), box_head=TwoMLPHead(c * box_res ** 2, fc),
      box_predictor=FastRCNNPredictor(fc, k),
      box_score_thresh=m.test.score_threshold, box_nms_thresh=m.test.nms_threshold,
      box_detections_per_img=m.test.detections_per_image,
      box_fg_iou_thresh=m.roi.iou_threshold, box_bg_iou_thresh=m.roi.iou_threshold,
      box_batch_size_per_image=m.roi.batch_size_per_image,
      box_positive_fraction=m.roi.positive_fraction,
      mask_roi_pool=pool(mask_res), mask_head=MaskRCNNHeads(c, mask_dims, 1),
      mask_predictor=MaskRCNNPredictor(mask_dims[-1] if mask_dims else c,
                                       m.mask_head.conv_dim, k))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=lr, momentum=config.optim.momentum,
                        weight_decay=config.optim.weight_decay)
  return model, opt


def inputs(batch: Dict[str, np.ndarray], config):
  """Our numpy batch -> torchvision's (images 0..1, targets with full-image masks).

  Masks are drawn again at image resolution with the ellipse ``benchmark.ellipse_masks``
  put in each box, so both sides see the same instances.
  """
  d = config.data
  mean, std = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)
  images, targets = [], []
  h, w = batch["images"].shape[1:3]
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  for i in range(batch["images"].shape[0]):
    pixels = (batch["images"][i] * std + mean) / 255.0
    images.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
    valid = batch["gt_valid"][i]
    boxes = batch["gt_boxes"][i][valid]
    masks = np.zeros((len(boxes), h, w), np.uint8)
    for j, (x1, y1, x2, y2) in enumerate(boxes):
      u = (xs - x1) / (x2 - x1) - 0.5
      v = (ys - y1) / (y2 - y1) - 0.5
      masks[j] = (u * u + v * v) <= 0.25
    targets.append({"boxes": torch.from_numpy(boxes),
                    "labels": torch.from_numpy(batch["gt_classes"][i][valid].astype(np.int64) + 1),
                    "masks": torch.from_numpy(masks)})
  return images, targets


def autocast(dtype: Optional[str]):
  """``torch.autocast`` on CPU in ``dtype`` ("bfloat16"), or no autocast for None:
  torchvision's own mixed-precision mode, its fastest on a CPU with AMX."""
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast("cpu", dtype=getattr(torch, dtype))


class Trainer:
  """One training step of the torchvision model; counts the mask head's RoIs.

  ``autocast_dtype``: the forward pass under ``torch.autocast`` (the backward
  then runs in the dtypes autocast chose), as PyTorch's AMP recipe has it.
  """

  def __init__(self, model, opt, autocast_dtype: Optional[str] = None):
    self.model, self.opt = model, opt
    self.autocast_dtype = autocast_dtype
    self.mask_rois: List[int] = []
    model.roi_heads.mask_roi_pool.register_forward_hook(
        lambda mod, inp, out: self.mask_rois.append(int(out.shape[0])))

  def step(self, images, targets) -> Dict[str, float]:
    self.model.train()
    with autocast(self.autocast_dtype):
      losses = self.model(images, targets)
    loss = sum(v.float() for v in losses.values())
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}

  def flops(self, images, targets) -> float:
    """FLOPs of one step (forward + backward), matmuls and convolutions only."""
    with FlopCounterMode(display=False) as counter:
      self.step(images, targets)
    return float(counter.get_total_flops())


def prepare_inference(model, initial_state):
  """The initial weights, eval mode, +10 on class 1's logit bias (fills the detections)."""
  model.load_state_dict(initial_state)
  model.eval()
  with torch.no_grad():
    model.roi_heads.box_predictor.cls_score.bias[1] += 10.0


def infer(model, images, autocast_dtype: Optional[str] = None):
  with torch.inference_mode(), autocast(autocast_dtype):
    return model(images)


# ------------------------------------------------------------------ ops alone
def _median_s(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def compare_roi_align(batch: int, rois: int, size: int, channels: int, stride: int,
                      output: int, sampling_ratio: int, repeats: int) -> Dict:
  """RoIAlign forward + backward (into the features) on one FPN-level map, both sides."""
  import jax
  import jax.numpy as jnp
  from mrcnn_jax.ops import roi_align as roi_ops
  rng = np.random.default_rng(0)
  canvas = size * stride
  feats = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
  xy = rng.uniform(0, canvas * 0.8, size=(batch, rois, 2))
  wh = rng.uniform(canvas / 32, canvas / 4, size=(batch, rois, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, canvas)], -1).astype(np.float32)
  cot = rng.normal(size=(batch, rois, output, output, channels)).astype(np.float32)

  def ours(f, b, g):
    pool = jax.vmap(lambda fi, bi: roi_ops.roi_align(fi, bi, output, 1.0 / stride,
                                                     sampling_ratio, True))
    out, vjp = jax.vjp(lambda x: pool(x, b), f)
    return out, vjp(g)[0]
  ours = jax.jit(ours)
  args = [jnp.asarray(a) for a in (feats, boxes, cot)]
  ours_s = _median_s(lambda: jax.block_until_ready(ours(*args)), repeats)

  x = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  tb = [torch.from_numpy(b) for b in boxes]
  tg = torch.from_numpy(cot.transpose(0, 1, 4, 2, 3).reshape(-1, channels, output, output).copy())

  def theirs():
    x.grad = None
    out = torchvision.ops.roi_align(x, tb, output, 1.0 / stride, sampling_ratio, True)
    out.backward(tg)
  tv_s = _median_s(theirs, repeats)
  return {"setting": f"{batch}x{rois} RoIs, {output}x{output} from {size}x{size}x{channels} "
                     f"(stride {stride}), sampling_ratio {sampling_ratio}, aligned, fwd+bwd",
          "ours_ms": 1000 * ours_s, "torchvision_ms": 1000 * tv_s, "ratio": ours_s / tv_s}


def compare_nms(num_boxes: int, canvas: int, threshold: float, repeats: int) -> Dict:
  """Greedy NMS of ``num_boxes`` random boxes; ours keeps up to all of them (same work)."""
  import jax
  import jax.numpy as jnp
  from mrcnn_jax.ops import nms as nms_ops
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, canvas * 0.9, size=(num_boxes, 2))
  wh = rng.uniform(canvas / 32, canvas / 4, size=(num_boxes, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  scores = rng.uniform(size=num_boxes).astype(np.float32)
  ours = jax.jit(lambda b, s: nms_ops.nms(b, s, threshold, num_boxes))
  jb, js = jnp.asarray(boxes), jnp.asarray(scores)
  ours_s = _median_s(lambda: jax.block_until_ready(ours(jb, js)), repeats)
  kept_ours = int(np.sum(ours(jb, js)[1]))
  tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
  tv_s = _median_s(lambda: torchvision.ops.nms(tb, ts, threshold), repeats)
  kept_tv = int(torchvision.ops.nms(tb, ts, threshold).shape[0])
  return {"setting": f"{num_boxes} boxes, IoU {threshold}, max_output {num_boxes}",
          "kept": {"ours": kept_ours, "torchvision": kept_tv},
          "ours_ms": 1000 * ours_s, "torchvision_ms": 1000 * tv_s, "ratio": ours_s / tv_s}
