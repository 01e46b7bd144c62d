"""torchvision models with fixed random weights, converted, for the parity tests.

torchvision cannot download weights here, so each model is built with a
fixed seed and random weights; frozen-BN statistics are randomised too, so the
statistics' mapping is exercised. With random weights, class scores are
nearly uniform and mask and heatmap logits nearly zero, which would make
detections, thresholds and argmaxes hinge on rounding. So the predictors are
scaled before conversion (both sides see the scaled weights): class logits to
a spread of ~1.5 (scores spread over (0.05, 1) without saturating at 1),
mask logits to ~6 (a clear inside/outside), heatmap logits to ~3.
"""

import os

import numpy as np
import pytest

H, W = 256, 320  # multiples of 32: torchvision neither resizes nor pads them
NUM_CLASSES = 5  # foreground; torchvision's num_classes is this + 1
NUM_PROPOSALS = 200  # proposals fed to the box head in the stage tests
NUM_HEAD_BOXES = 48  # of those, boxes fed to the mask / keypoint heads (their convs are costly)
KEYPOINT_DETECTIONS = 50  # detections per image of the keypoint model (its head is 8 x 512 convs)


def _randomise_frozen_bn(torch, model, generator):
  from torchvision.ops.misc import FrozenBatchNorm2d
  for module in model.modules():
    if isinstance(module, FrozenBatchNorm2d):
      c = module.weight.shape[0]
      u = lambda lo, hi: lo + (hi - lo) * torch.rand(c, generator=generator)
      module.weight.copy_(u(0.4, 0.9))
      module.bias.copy_(0.1 * torch.randn(c, generator=generator))
      module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
      module.running_var.copy_(u(0.5, 1.5))


def _scale_to(torch, layer, outputs, target_std):
  """Multiplies ``layer``'s weight and bias so ``outputs`` (its current output) get std ``target_std``."""
  factor = target_std / float(outputs.std())
  layer.weight.mul_(factor)
  layer.bias.mul_(factor)


def images_uint8(seed=0, count=2, height=H, width=W):
  """Fixed test images ``[count, height, width, 3]`` uint8: smooth colour fields plus rectangles."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width] / 40.0
  out = []
  rects = max(6, 6 * height * width // (H * W))  # as dense at any size
  for _ in range(count):
    img = np.zeros((height, width, 3))
    for c in range(3):
      a, b, p = rng.uniform(0.3, 1.5, 3)
      img[..., c] = 127 + 90 * np.sin(a * xx + p) * np.cos(b * yy - p)
    for _ in range(rects):
      x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
      w, h = rng.integers(20, 120, 2)
      img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return np.stack(out)


def randomise_detectron2_layout(torch, backbone, heads, seed):
  """Random frozen-BN statistics in ``backbone`` and N(0, 0.02) weights, N(0, 0.1) biases in
  every linear and (transposed) convolution of ``heads``; returns the generator, to draw on."""
  nn = torch.nn
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    _randomise_frozen_bn(torch, backbone, generator)
    for module in heads.modules():
      if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        module.weight.normal_(0.0, 0.02, generator=generator)
        module.bias.normal_(0.0, 0.1, generator=generator)
  backbone.eval()
  return generator


def normalised_inputs(height, width, seed=0):
  """Two normalised test images ``[2, height, width, 3]`` float32 with a little noise: the
  model input past normalisation, fed to both sides of the detectron2-layout tests."""
  x = (images_uint8(count=2, height=height, width=width).astype(np.float32) - 120.0) / 60.0
  return x + np.random.default_rng(seed).normal(0.0, 0.1, x.shape).astype(np.float32)


def convert_detectron2_state(state: dict, arch: str, directory) -> str:
  """``state`` saved as a model-zoo ``.pkl`` and converted by the CLI; returns the checkpoint."""
  import pickle
  from mrcnn_jax import convert
  pkl = os.path.join(directory, "model_final.pkl")
  with open(pkl, "wb") as f:  # protocol 2 and a "model" dict, as the model zoo's files
    pickle.dump({"model": state, "__author__": "test"}, f, protocol=2)
  out = os.path.join(directory, arch)
  assert convert.main(["--from=detectron2", f"--arch={arch}", f"--input={pkl}",
                       f"--output={out}"]) == 0
  return out


def our_stages(config, checkpoint: str, stages, height: int, width: int, boxes):
  """Our side of a detectron2-layout test: ``config`` at one (height, width) canvas with
  ``checkpoint``'s weights, ``stages`` (a method for ``model.apply``) on
  ``normalised_inputs`` and ``boxes``. Returns (the inputs, our stages' outputs)."""
  import functools
  import jax
  from mrcnn_jax import checkpointing
  from mrcnn_jax.modeling import build
  config.data.update(canvas_size=(height, width), canvas_sizes=())
  model = build.build_model(config)
  x = normalised_inputs(height, width)
  return x, jax.device_get(jax.jit(functools.partial(model.apply, method=stages))(
      checkpointing.load_variables(checkpoint), x, boxes))


def build_torchvision(torch, torchvision, arch: str, seed: int = 0):
  """A torchvision detector in eval mode with random (scaled) weights, no resizing."""
  from torchvision.models import detection
  torch.manual_seed(seed)
  kwargs = dict(weights=None, weights_backbone=None, min_size=H, max_size=W)
  if arch == "keypointrcnn_resnet50_fpn":
    model = detection.keypointrcnn_resnet50_fpn(num_classes=2,
                                                box_detections_per_img=KEYPOINT_DETECTIONS, **kwargs)
  else:
    model = getattr(detection, arch)(num_classes=NUM_CLASSES + 1, **kwargs)
  model.eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    _randomise_frozen_bn(torch, model, generator)
    st = stages_torchvision(torch, model, images_uint8())
    heads = model.roi_heads
    _scale_to(torch, heads.box_predictor.cls_score, st["logits"], 1.5)
    if "masks" in st:
      _scale_to(torch, heads.mask_predictor.mask_fcn_logits, st["masks"], 6.0)
    if "heatmaps" in st:
      _scale_to(torch, heads.keypoint_predictor.kps_score_lowres, st["heatmaps"], 3.0)
  return model


def stages_torchvision(torch, model, images):
  """Every stage's output (torch tensors) on ``images`` [B, H, W, 3] uint8."""
  with torch.no_grad():
    batch = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
    inputs, _ = model.transform(batch)
    assert tuple(inputs.tensors.shape[-2:]) == (H, W)
    feats = model.backbone(inputs.tensors)
    objectness, deltas = model.rpn.head(list(feats.values()))
    proposals, _ = model.rpn(inputs, feats)
    proposals = [p[:NUM_PROPOSALS] for p in proposals]
    assert all(len(p) == NUM_PROPOSALS for p in proposals)
    heads = model.roi_heads
    pooled = heads.box_roi_pool(feats, proposals, inputs.image_sizes)
    logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
    out = {"inputs": inputs.tensors, "fpn": list(feats.values()), "objectness": objectness,
           "deltas": deltas, "proposals": proposals, "logits": logits,
           "box_deltas": box_deltas}
    boxes = [p[:NUM_HEAD_BOXES] for p in proposals]
    if heads.has_mask():
      pooled = heads.mask_roi_pool(feats, boxes, inputs.image_sizes)
      out["masks"] = heads.mask_predictor(heads.mask_head(pooled))
    if heads.has_keypoint():
      pooled = heads.keypoint_roi_pool(feats, boxes, inputs.image_sizes)
      out["heatmaps"] = heads.keypoint_predictor(heads.keypoint_head(pooled))
  return out


def our_config(keypoint: bool):
  """configs/torchvision_mask_rcnn.py at the test's image size and class count."""
  from configs import torchvision_mask_rcnn
  config = torchvision_mask_rcnn.get_config("keypoint" if keypoint else None)
  config.data.update(canvas_size=(H, W), canvas_sizes=(), min_size=H, max_size=W)
  if keypoint:
    config.model.test.detections_per_image = KEYPOINT_DETECTIONS
  else:
    config.model.num_classes = NUM_CLASSES
  return config


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  """``arch -> (torchvision model, checkpoint dir, .pth)``, built and converted once per session."""
  from tests.conftest import _import_torchvision
  torch, torchvision = _import_torchvision()
  from mrcnn_jax import convert
  root = tmp_path_factory.mktemp("parity")
  cache = {}

  def get(arch):
    if arch not in cache:
      model = build_torchvision(torch, torchvision, arch)
      pth = os.path.join(root, f"{arch}.pth")
      torch.save(model.state_dict(), pth)
      out = os.path.join(root, arch)
      assert convert.main(["--from=torchvision", f"--arch={arch}", f"--input={pth}",
                           f"--output={out}"]) == 0
      cache[arch] = (model, out, pth)
    return cache[arch]

  return get
