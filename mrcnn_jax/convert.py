"""Weight import: torchvision state_dicts and detectron2 model-zoo pickles -> orbax checkpoints.

    python -m mrcnn_jax.convert --from=torchvision --arch=maskrcnn_resnet50_fpn \\
        --input=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --output=weights/tv_maskrcnn_r50
    python -m mrcnn_jax.convert --from=detectron2 --arch=mask_rcnn_R_50_FPN \\
        --input=model_final_f10217.pkl --output=weights/d2_maskrcnn_r50
    python -m mrcnn_jax.convert --from=detectron2 --arch=mask_rcnn_R_50_C4 \\
        --input=model_final_9243eb.pkl --output=weights/d2_maskrcnn_r50_c4
    python -m mrcnn_jax.convert --from=detectron2 --arch=cascade_mask_rcnn_R_50_FPN \\
        --input=model_final_480dd8.pkl --output=weights/d2_cascade_mrcnn_r50

Architectures: torchvision ``maskrcnn_resnet50_fpn``, ``keypointrcnn_resnet50_fpn``,
``fasterrcnn_resnet50_fpn`` and the bare ImageNet backbones ``resnet50`` /
``resnet101`` (their ``fc`` classifier is dropped); detectron2
``{mask,keypoint,faster}_rcnn_R_{50,101}_FPN`` and ``{mask,faster}_rcnn_R_{50,101}_C4``
(the C4 design: ResNet's res5 stage, ``roi_heads.res5``, is the box head; see
modeling/res5_head.py) and ``cascade_mask_rcnn_R_{50,101}_FPN`` (Cascade R-CNN,
modeling/cascade.py: three class-agnostic box stages
``roi_heads.box_{head,predictor}.{0,1,2}``; stage 0 becomes ``box_head``,
stage k ``refine_box_heads_{k-1}``). The output directory is an
orbax checkpoint (step 0, ``params`` + ``model_state``) that evaluate and
predict take as ``--checkpoint`` and train takes as ``--config.init_checkpoint``
(with ``init_keep=backbone`` or ``no_predictors`` for another class count),
plus ``meta.json`` (class names, for predict) and ``convert.json`` (what was
converted and the config to run it with).

Every source tensor is used exactly once and every model variable is set: a
missing or unused tensor is an error that names it. Layouts:
- conv ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``; FC ``[O, I]`` -> ``[I, O]``;
- transposed conv ``[I, O, k, k]`` -> flipped in both spatial axes,
  ``[k, k, I, O]`` (see modeling/deconv.py);
- the first box FC reads a ``(C, y, x)`` flattening in both sources and ours
  reads ``(y, x, C)``: its input rows are reordered;
- frozen BN statistics are carried as they are (``batch_stats``:
  scale/bias/mean/var), so ``norm="frozen_bn"`` computes what the source does;
- RPN anchors: ours (and torchvision's) are ordered aspect ratio first, then
  size; detectron2's size first. With several sizes per level (C4: five) the
  RPN predictors' output channels are reordered to ours;
- classes: ours are K foreground logits then background, K boxes and K masks
  (detectron2's order). torchvision puts background first and has a box and a
  mask for it too: those are dropped. Its COCO models have 91 classes indexed
  by COCO category id (10 unused "N/A" ids); ``--classes=auto`` keeps the 80
  real ones in id order, which is the contiguous order the data pipeline uses.

detectron2 ``.pkl`` files are read with a restricted unpickler that builds
only plain containers and numpy arrays; anything else in the file is refused.
"""

import argparse
import dataclasses
import functools
import json
import os
import pickle
import re
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mrcnn_jax.data.coco_names import COCO_IDS, COCO_KEYPOINT_NAMES, COCO_NAMES, COCO_SKELETON
from mrcnn_jax.modeling import cascade


class ConversionError(ValueError):
  """A source file that does not match the architecture asked for."""


@dataclasses.dataclass(frozen=True)
class Arch:
  depth: int
  detector: bool = True  # False: a bare ImageNet backbone
  mask: bool = False
  keypoints: bool = False
  c4: bool = False  # the C4 design: no FPN, res5 as the box head
  cascade: bool = False  # Cascade R-CNN: CASCADE_STAGES class-agnostic box stages


TORCHVISION_ARCHS = {
    "maskrcnn_resnet50_fpn": Arch(50, mask=True),
    "keypointrcnn_resnet50_fpn": Arch(50, keypoints=True),
    "fasterrcnn_resnet50_fpn": Arch(50),
    "resnet50": Arch(50, detector=False),
    "resnet101": Arch(101, detector=False),
}
DETECTRON2_ARCHS = {
    f"{kind}_rcnn_R_{depth}_FPN": Arch(depth, mask=kind == "mask", keypoints=kind == "keypoint")
    for kind in ("mask", "keypoint", "faster") for depth in (50, 101)
} | {
    f"{kind}_rcnn_R_{depth}_C4": Arch(depth, mask=kind == "mask", c4=True)
    for kind in ("mask", "faster") for depth in (50, 101)
} | {
    f"cascade_mask_rcnn_R_{depth}_FPN": Arch(depth, mask=True, cascade=True) for depth in (50, 101)
}
# A weight file holds no settings, so a converted cascade gets detectron2's
# (cascade.DETECTRON2_*, the defaults every model-zoo cascade uses): the first
# box stage and those two refinement stages.
CASCADE_STAGES = 1 + len(cascade.DETECTRON2_IOU_THRESHOLDS)
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottleneck blocks in res2..res5


# ------------------------------------------------------------------ reading sources
class Tensors:
  """Named source arrays; each may be taken once, and all must be taken."""

  def __init__(self, arrays: Dict[str, np.ndarray], origin: str):
    self.arrays = arrays
    self.origin = origin
    self.taken = set()

  def has(self, name: str) -> bool:
    return name in self.arrays

  def take(self, name: str) -> np.ndarray:
    if name not in self.arrays:
      raise ConversionError(f"{self.origin}: missing tensor {name!r}")
    if name in self.taken:
      raise ConversionError(f"{self.origin}: tensor {name!r} used twice")
    self.taken.add(name)
    return np.asarray(self.arrays[name], np.float32)

  def check_all_used(self) -> None:
    unused = sorted(set(self.arrays) - self.taken)
    if unused:
      shown = ", ".join(unused[:10]) + (f" (+{len(unused) - 10} more)" if len(unused) > 10 else "")
      raise ConversionError(f"{self.origin}: {len(unused)} unused tensor(s): {shown}")


def read_torchvision(path: str) -> Dict[str, np.ndarray]:
  """A state_dict ``.pth`` as numpy arrays (torch.load with weights_only=True)."""
  import torch  # pylint: disable=g-import-not-at-top  (only this source needs torch)
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
    state = state["model"]  # a training checkpoint of torchvision's references
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: expected a state_dict, got {type(state).__name__}")
  out = {}
  for name, value in state.items():
    if not hasattr(value, "detach"):
      raise ConversionError(f"{path}: entry {name!r} is {type(value).__name__}, not a tensor")
    out[name] = value.detach().cpu().float().numpy() if value.is_floating_point() \
        else value.detach().cpu().numpy()
  return out


class _ArraysOnly(pickle.Unpickler):
  """Builds plain containers and numpy arrays, nothing else (no code runs)."""
  ALLOWED = {
      ("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
  }

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to load {module}.{name}: only containers and numpy arrays are allowed")
    return super().find_class(module, name)


def read_detectron2(path: str) -> Dict[str, np.ndarray]:
  """A model-zoo ``.pkl``: ``{"model": {name: array}, ...}`` (or the bare dict)."""
  with open(path, "rb") as f:
    try:
      data = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
      raise ConversionError(f"{path}: not a detectron2 weight pickle ({e})") from e
  if isinstance(data, dict) and isinstance(data.get("model"), dict):
    data = data["model"]
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected a dict of arrays, got {type(data).__name__}")
  out = {}
  for name, value in data.items():
    if not isinstance(value, np.ndarray):
      raise ConversionError(f"{path}: entry {name!r} is {type(value).__name__}, not an array")
    out[str(name)] = value
  return out


def upgrade_torchvision_names(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Old (version 1) torchvision names -> current ones, as torchvision's own load hooks do.

  The released COCO weights predate the Conv2dNormActivation wrappers:
  ``rpn.head.conv.weight``, ``fpn.inner_blocks.0.weight``, ``mask_head.mask_fcn1.weight``.
  """
  rules = [(r"^(rpn\.head\.conv)\.(weight|bias)$", r"\1.0.0.\2"),
           (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2")]
  out = {}
  for name, value in arrays.items():
    for pattern, repl in rules:
      name = re.sub(pattern, repl, name)
    m = re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", name)
    if m:
      name = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
    out[name] = value
  return out


# ------------------------------------------------------------------ layouts
def conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]


def deconv(w: np.ndarray) -> np.ndarray:
  return w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)  # [I, O, k, k] -> [k, k, I, O], flipped


def dense(w: np.ndarray) -> np.ndarray:
  return w.T


def dense_from_chw(w: np.ndarray, channels: int) -> np.ndarray:
  """An FC over a ``(C, y, x)`` flattening -> ours over ``(y, x, C)``, ``[S*S*C, O]``."""
  out_dim, in_dim = w.shape
  side = int(round((in_dim / channels) ** 0.5))
  if side * side * channels != in_dim:
    raise ConversionError(f"first box FC: input size {in_dim} is not {channels} x S x S")
  return w.reshape(out_dim, channels, side, side).transpose(2, 3, 1, 0).reshape(in_dim, out_dim)


# ------------------------------------------------------------------ name maps
@dataclasses.dataclass(frozen=True)
class Names:
  """Where each part of the model lives in one source's naming."""
  stem_conv: str
  stem_norm: str
  block: str  # format with stage (1..4) and index
  conv: str  # format with block prefix and i (1..3)
  norm: str
  shortcut_conv: str
  shortcut_norm: str
  bn: Tuple[str, str, str, str]  # scale, bias, mean, var
  lateral: str = ""  # format with level k (2..5)
  output: str = ""
  rpn: Tuple[str, str, str] = ("", "", "")  # conv, objectness, deltas
  box_fc: Tuple[str, str] = ("", "")
  cls_score: str = ""
  bbox_pred: str = ""
  mask_conv: str = ""  # format with i (1..4)
  mask_deconv: str = ""
  mask_predictor: str = ""
  kp_conv: str = ""  # format with i (1..8)
  kp_score: str = ""
  ignored: Tuple[str, ...] = ()  # regexes of tensors that have no counterpart
  res5: str = ""  # C4: format with index; the res5 stage in the RoI heads


BN_TV = ("weight", "bias", "running_mean", "running_var")
TV_BACKBONE = dict(
    stem_conv="conv1", stem_norm="bn1", block="layer{stage}.{index}", conv="{block}.conv{i}",
    norm="{block}.bn{i}", shortcut_conv="{block}.downsample.0",
    shortcut_norm="{block}.downsample.1", bn=BN_TV)
TORCHVISION_RESNET = Names(**TV_BACKBONE, ignored=(r"\.num_batches_tracked$", r"^fc\."))
TORCHVISION = Names(
    **{k: ("backbone.body." + v if k in ("stem_conv", "stem_norm", "block") else v)
       for k, v in TV_BACKBONE.items()},
    lateral="backbone.fpn.inner_blocks.{j}.0", output="backbone.fpn.layer_blocks.{j}.0",
    rpn=("rpn.head.conv.0.0", "rpn.head.cls_logits", "rpn.head.bbox_pred"),
    box_fc=("roi_heads.box_head.fc6", "roi_heads.box_head.fc7"),
    cls_score="roi_heads.box_predictor.cls_score", bbox_pred="roi_heads.box_predictor.bbox_pred",
    mask_conv="roi_heads.mask_head.{j}.0", mask_deconv="roi_heads.mask_predictor.conv5_mask",
    mask_predictor="roi_heads.mask_predictor.mask_fcn_logits",
    kp_conv="roi_heads.keypoint_head.{j2}", kp_score="roi_heads.keypoint_predictor.kps_score_lowres",
    ignored=(r"\.num_batches_tracked$",))
DETECTRON2 = Names(
    stem_conv="backbone.bottom_up.stem.conv1", stem_norm="backbone.bottom_up.stem.conv1.norm",
    block="backbone.bottom_up.res{stage1}.{index}", conv="{block}.conv{i}",
    norm="{block}.conv{i}.norm", shortcut_conv="{block}.shortcut",
    shortcut_norm="{block}.shortcut.norm", bn=BN_TV,
    lateral="backbone.fpn_lateral{k}", output="backbone.fpn_output{k}",
    rpn=("proposal_generator.rpn_head.conv", "proposal_generator.rpn_head.objectness_logits",
         "proposal_generator.rpn_head.anchor_deltas"),
    box_fc=("roi_heads.box_head.fc1", "roi_heads.box_head.fc2"),
    cls_score="roi_heads.box_predictor.cls_score", bbox_pred="roi_heads.box_predictor.bbox_pred",
    mask_conv="roi_heads.mask_head.mask_fcn{i}", mask_deconv="roi_heads.mask_head.deconv",
    mask_predictor="roi_heads.mask_head.predictor",
    kp_conv="roi_heads.keypoint_head.conv_fcn{i}", kp_score="roi_heads.keypoint_head.score_lowres",
    ignored=(r"\.num_batches_tracked$",))
# The C4 design's backbone is the bare ResNet (no ``bottom_up``), up to res4.
DETECTRON2_C4 = dataclasses.replace(
    DETECTRON2, stem_conv="backbone.stem.conv1", stem_norm="backbone.stem.conv1.norm",
    block="backbone.res{stage1}.{index}", res5="roi_heads.res5.{index}")


Path = Tuple[str, ...]


def _norm(src: Tensors, n: Names, name: str, path: Path) -> Iterator[Tuple[Path, np.ndarray]]:
  for ours, theirs in zip(("scale", "bias", "mean", "var"), n.bn):
    yield ("batch_stats", *path, ours), src.take(f"{name}.{theirs}")


def _stage(src: Tensors, n: Names, block_name: str, count: int,
           path: Path) -> Iterator[Tuple[Path, np.ndarray]]:
  """One ResNet stage of ``count`` bottlenecks (``block_name`` formats with index)."""
  for index in range(count):
    block, block_path = block_name.format(index=index), path + (str(index),)
    for i in (1, 2, 3):
      yield ("params", *block_path, f"conv{i}", "kernel"), conv(
          src.take(n.conv.format(block=block, i=i) + ".weight"))
      yield from _norm(src, n, n.norm.format(block=block, i=i), block_path + (f"norm{i}",))
    if index == 0:
      yield ("params", *block_path, "downsample_conv", "kernel"), conv(
          src.take(n.shortcut_conv.format(block=block) + ".weight"))
      yield from _norm(src, n, n.shortcut_norm.format(block=block),
                       block_path + ("downsample_norm",))


def _backbone(src: Tensors, n: Names, depth: int,
              num_stages: int = 4) -> Iterator[Tuple[Path, np.ndarray]]:
  root = ("backbone",)
  yield ("params", *root, "conv1", "kernel"), conv(src.take(f"{n.stem_conv}.weight"))
  yield from _norm(src, n, n.stem_norm, root + ("norm1",))
  for stage, count in enumerate(BLOCKS[depth][:num_stages], start=1):
    block = n.block.replace("{stage}", str(stage)).replace("{stage1}", str(stage + 1))
    yield from _stage(src, n, block, count, root + (f"layer{stage}",))


def _layer(src: Tensors, name: str, path: Path, layout) -> Iterator[Tuple[Path, np.ndarray]]:
  yield ("params", *path, "kernel"), layout(src.take(f"{name}.weight"))
  yield ("params", *path, "bias"), src.take(f"{name}.bias")


def class_rows(source: str, num_source_classes: int, classes: str) -> List[int]:
  """Source rows (of logits, boxes, masks) of our classes 0..K-1, in order."""
  if source == "detectron2":
    return list(range(num_source_classes - 1))  # background is the last logit
  if classes == "auto" and num_source_classes == 91:
    return list(COCO_IDS)  # torchvision COCO: row = COCO category id
  if classes not in ("auto", "all"):
    raise ConversionError(f"--classes: expected 'auto' or 'all', got {classes!r}")
  return list(range(1, num_source_classes))  # background is row 0


def anchor_order(num_anchors: int, num_ratios: int = 3) -> List[int]:
  """detectron2's RPN output channel of each of our anchors at one position.

  detectron2 orders a level's anchors size first (``s * R + r``), ours
  aspect ratio first (``r * S + s``); with one size per level (FPN) the two
  orders are the same.
  """
  if num_anchors % num_ratios:
    raise ConversionError(f"RPN objectness: {num_anchors} anchors per position is not a "
                          f"multiple of {num_ratios} aspect ratios")
  num_sizes = num_anchors // num_ratios
  return [s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)]


def _rpn(src: Tensors, n: Names, source: str) -> Iterator[Tuple[Path, np.ndarray]]:
  conv_name, objectness, deltas = n.rpn
  yield from _layer(src, conv_name, ("rpn_head", "conv"), conv)
  w, b = src.take(f"{objectness}.weight"), src.take(f"{objectness}.bias")
  order = anchor_order(len(b)) if source == "detectron2" else list(range(len(b)))
  yield ("params", "rpn_head", "objectness", "kernel"), conv(w[order])
  yield ("params", "rpn_head", "objectness", "bias"), b[order]
  w, b = src.take(f"{deltas}.weight"), src.take(f"{deltas}.bias")
  w = w.reshape(len(order), 4, *w.shape[1:])[order].reshape(w.shape)  # rows anchor * 4 + coord
  yield ("params", "rpn_head", "deltas", "kernel"), conv(w)
  yield ("params", "rpn_head", "deltas", "bias"), b.reshape(len(order), 4)[order].reshape(-1)


def cascade_name(name: str, k: int) -> str:
  """detectron2's name of stage ``k``'s layer (its box head and predictor are ModuleLists):
  ``roi_heads.box_head.fc1`` -> ``roi_heads.box_head.{k}.fc1``."""
  return re.sub(r"^roi_heads\.(box_head|box_predictor)\.", rf"roi_heads.\1.{k}.", name)


def _box_fcs(src: Tensors, names: Tuple[str, str], fpn_channels: int,
             path: str) -> Iterator[Tuple[Path, np.ndarray]]:
  """The FPN box head's two FCs (the first reads a ``(C, y, x)`` flattening)."""
  fc6, fc7 = names
  yield ("params", path, "fc6", "kernel"), dense_from_chw(src.take(f"{fc6}.weight"), fpn_channels)
  yield ("params", path, "fc6", "bias"), src.take(f"{fc6}.bias")
  yield from _layer(src, fc7, (path, "fc7"), dense)


def _box_predictor(src: Tensors, cls_score: str, bbox_pred: str, source: str, classes: str,
                   path: str, class_agnostic: bool = False):
  """Class logits (background last) and box deltas; returns the source rows of our classes."""
  logits_w, logits_b = src.take(f"{cls_score}.weight"), src.take(f"{cls_score}.bias")
  rows = class_rows(source, logits_w.shape[0], classes)
  background = logits_w.shape[0] - 1 if source == "detectron2" else 0
  order = rows + [background]
  yield ("params", path, "predictor", "cls_score", "kernel"), dense(logits_w[order])
  yield ("params", path, "predictor", "cls_score", "bias"), logits_b[order]
  box_w, box_b = src.take(f"{bbox_pred}.weight"), src.take(f"{bbox_pred}.bias")
  if class_agnostic:
    if box_w.shape[0] != 4:
      raise ConversionError(f"{src.origin}: {bbox_pred}.weight has {box_w.shape[0]} outputs; "
                            f"a cascade stage regresses one class-agnostic box (4)")
  else:
    box_w = box_w.reshape(-1, 4, box_w.shape[-1])[rows].reshape(-1, box_w.shape[-1])
    box_b = box_b.reshape(-1, 4)[rows].reshape(-1)
  yield ("params", path, "predictor", "bbox_pred", "kernel"), dense(box_w)
  yield ("params", path, "predictor", "bbox_pred", "bias"), box_b
  return rows


def _detector(src: Tensors, n: Names, arch: Arch, source: str,
              classes: str) -> Iterator[Tuple[Path, np.ndarray]]:
  yield from _rpn(src, n, source)
  if arch.c4:  # res5 is the box head: its pooled output feeds the predictor
    yield from _stage(src, n, n.res5, BLOCKS[arch.depth][3], ("box_head", "res5"))
  else:
    for k in (2, 3, 4, 5):
      yield from _layer(src, n.lateral.format(k=k, j=k - 2), ("fpn", f"lateral{k}"), conv)
      yield from _layer(src, n.output.format(k=k, j=k - 2), ("fpn", f"output{k}"), conv)
    fpn_channels = src.arrays[f"{n.output.format(k=2, j=0)}.weight"].shape[0]
  stages = [("box_head", lambda name: name)]  # (our path, the source name of a layer)
  if arch.cascade:
    stages = [("box_head" if k == 0 else f"refine_box_heads_{k - 1}",
               functools.partial(cascade_name, k=k)) for k in range(CASCADE_STAGES)]
  for path, name in stages:
    if not arch.c4:
      yield from _box_fcs(src, tuple(map(name, n.box_fc)), fpn_channels, path)
    rows = yield from _box_predictor(src, name(n.cls_score), name(n.bbox_pred), source, classes,
                                     path, class_agnostic=arch.cascade)

  if arch.mask:
    for i in range(1, 1 if arch.c4 else 5):  # the C4 mask head is the deconv alone
      yield from _layer(src, n.mask_conv.format(i=i, j=i - 1), ("mask_head", f"mask_fcn{i}"), conv)
    yield from _layer(src, n.mask_deconv, ("mask_head", "deconv"), deconv)
    # detectron2 has no background mask: its rows are ours as they are.
    mask_rows = rows if source == "torchvision" else list(range(len(rows)))
    w = src.take(f"{n.mask_predictor}.weight")[mask_rows]
    yield ("params", "mask_head", "predictor", "kernel"), conv(w)
    yield ("params", "mask_head", "predictor", "bias"), src.take(f"{n.mask_predictor}.bias")[mask_rows]
  if arch.keypoints:
    i = 1
    while src.has(n.kp_conv.format(i=i, j2=2 * (i - 1)) + ".weight"):
      yield from _layer(src, n.kp_conv.format(i=i, j2=2 * (i - 1)), ("keypoint_head", f"conv_fcn{i}"),
                        conv)
      i += 1
    yield from _layer(src, n.kp_score, ("keypoint_head", "score_lowres"), deconv)


def convert_arrays(arrays: Dict[str, np.ndarray], source: str, arch_name: str,
                   origin: str = "input", classes: str = "auto") -> Dict[str, dict]:
  """Source arrays -> ``{"params": ..., "batch_stats": ...}`` nested dicts of float32."""
  archs = TORCHVISION_ARCHS if source == "torchvision" else DETECTRON2_ARCHS
  if source not in ("torchvision", "detectron2"):
    raise ConversionError(f"--from: expected 'torchvision' or 'detectron2', got {source!r}")
  if arch_name not in archs:
    raise ConversionError(f"--arch: expected one of {sorted(archs)} for {source}, "
                          f"got {arch_name!r}")
  arch = archs[arch_name]
  if source == "torchvision":
    arrays = upgrade_torchvision_names(arrays)
    names = TORCHVISION if arch.detector else TORCHVISION_RESNET
  else:
    names = DETECTRON2_C4 if arch.c4 else DETECTRON2
  src = Tensors({k: v for k, v in arrays.items()
                 if not any(re.search(p, k) for p in names.ignored)}, origin)
  pieces = list(_backbone(src, names, arch.depth, num_stages=3 if arch.c4 else 4))
  if arch.detector:
    pieces += list(_detector(src, names, arch, source, classes))
  src.check_all_used()
  out: Dict[str, dict] = {}
  for path, value in pieces:
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value, np.float32)
  return out


# ------------------------------------------------------------------ the model it fits
def model_section(variables: Dict[str, dict], arch: Arch):
  """The ``config.model`` section whose variables have exactly these shapes."""
  from mrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
  params = variables["params"]
  model = build.model_config(design="c4" if arch.c4 else "fpn", num_classes=80)
  model.backbone.update(depth=str(arch.depth), norm="frozen_bn")
  if not arch.detector:
    return model
  model.num_classes = params["box_head"]["predictor"]["cls_score"]["bias"].shape[0] - 1
  if not arch.c4:
    model.fpn_channels = params["fpn"]["output2"]["bias"].shape[0]
    model.box_head.fc_dims = (params["box_head"]["fc6"]["bias"].shape[0],
                              params["box_head"]["fc7"]["bias"].shape[0])
  if arch.cascade:  # the settings are detectron2's (not in the file)
    model.box_head.class_agnostic = True
    model.cascade.update(iou_thresholds=cascade.DETECTRON2_IOU_THRESHOLDS,
                         box_weights=cascade.DETECTRON2_BOX_WEIGHTS)
  model.mask_head.enabled = arch.mask
  if arch.mask:
    model.mask_head.conv_dim = params["mask_head"]["deconv"]["bias"].shape[0]
  if arch.keypoints:
    kp = params["keypoint_head"]
    model.keypoint_head.update(enabled=True, num_keypoints=kp["score_lowres"]["bias"].shape[0],
                               num_convs=len(kp) - 1, conv_dim=kp["conv_fcn1"]["bias"].shape[0])
  return model


def check_against_model(variables: Dict[str, dict], arch: Arch, origin: str):
  """Raises unless ``variables`` are exactly the variables of the model they describe."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
  model_cfg = model_section(variables, arch)
  if arch.detector:
    model = build.build_model(model_cfg)
    init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                              method="initialize")
  else:
    from mrcnn_jax.modeling.resnet import ResNet  # pylint: disable=g-import-not-at-top
    net = ResNet(depth=arch.depth, norm="frozen_bn", name="backbone")
    init = lambda: {c: {"backbone": v} for c, v in
                    net.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))).items()}
  expected = jax.eval_shape(init)
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = flat(expected), flat(variables)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    raise ConversionError(
        f"{origin}: converted variables do not fit the model: missing {missing[:5]}, "
        f"unexpected {extra[:5]}, wrong shapes {[(k, got[k], want[k]) for k in wrong[:5]]}")
  return model_cfg


def class_meta(num_classes: int, num_keypoints: int, coco: bool) -> dict:
  """meta.json for predict: COCO names when the classes are COCO's, else class_<i>."""
  if coco and num_classes == len(COCO_IDS):
    ids, names = list(COCO_IDS), list(COCO_NAMES)
  elif coco and num_classes == 1 and num_keypoints == len(COCO_KEYPOINT_NAMES):
    ids, names = [1], ["person"]  # Keypoint R-CNN
  else:
    ids, names = list(range(1, num_classes + 1)), [f"class_{i}" for i in range(num_classes)]
  from mrcnn_jax.data.coco import flip_map  # pylint: disable=g-import-not-at-top
  kp_names = (COCO_KEYPOINT_NAMES if num_keypoints == len(COCO_KEYPOINT_NAMES)
              else [f"keypoint_{i}" for i in range(num_keypoints)])
  return {"coco_ids": ids, "names": names,
          "keypoint_names": kp_names if num_keypoints else [],
          "keypoint_flip_map": flip_map(kp_names) if num_keypoints else [],
          "skeleton": COCO_SKELETON if num_keypoints == len(COCO_KEYPOINT_NAMES) else [],
          "keypoint_category_ids": ids[:1] if num_keypoints else []}


def save(variables: Dict[str, dict], output: str, overwrite: bool = False) -> str:
  """Writes the orbax checkpoint (step 0) under ``output``; returns its step directory."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mrcnn_jax import checkpointing  # pylint: disable=g-import-not-at-top
  output = os.path.abspath(output)
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise FileExistsError(f"{output}: exists and is not empty (pass --overwrite to replace it)")
  checkpointing.quiet_orbax_logs()
  state = {"params": variables["params"],
           "model_state": {k: v for k, v in variables.items() if k != "params"}}
  with ocp.CheckpointManager(output, options=ocp.CheckpointManagerOptions(create=True)) as mgr:
    mgr.save(0, args=ocp.args.StandardSave(state), force=True)
    mgr.wait_until_finished()
  return os.path.join(output, "0")


def config_file(source: str, arch: Arch) -> str:
  """The config (``file[:arg]``) that runs a converted model with its source's settings."""
  if arch.cascade:
    return "configs/cascade_mask_rcnn_r50_fpn_1x.py:detectron2"
  variant = ":keypoint" if arch.keypoints else "" if arch.mask else ":faster"
  if source == "torchvision":
    return "configs/torchvision_mask_rcnn.py" + variant
  return ("configs/coco_mask_rcnn_r50_c4_1x.py" if arch.c4
          else "configs/detectron2_mask_rcnn.py") + variant


def run_flags(summary: dict, output: str) -> str:
  """The flags that run a converted detector (convert.json's ``summary``) from ``output``."""
  depth = summary["model"]["backbone"]["depth"]  # the configs named are R50s
  return (f"--config={summary['config']} --checkpoint={output}"
          + (f" --config.model.backbone.depth={depth}" if depth != "50" else ""))


def convert(source: str, arch_name: str, input_path: str, output: str,
            classes: str = "auto", overwrite: bool = False) -> dict:
  """The whole CLI: read, convert, check against the model, save. Returns convert.json's content."""
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"{input_path}: no such file")
  arrays = read_torchvision(input_path) if source == "torchvision" else read_detectron2(input_path)
  variables = convert_arrays(arrays, source, arch_name, origin=input_path, classes=classes)
  arch = (TORCHVISION_ARCHS if source == "torchvision" else DETECTRON2_ARCHS)[arch_name]
  model_cfg = check_against_model(variables, arch, input_path)
  step_dir = save(variables, output, overwrite)
  summary = {"from": source, "arch": arch_name, "input": os.path.abspath(input_path),
             "checkpoint": step_dir, "classes": classes,
             "config": config_file(source, arch),
             "model": json.loads(model_cfg.to_json())}
  if arch.detector:
    num_keypoints = model_cfg.keypoint_head.num_keypoints if arch.keypoints else 0
    coco = source == "detectron2" or len(arrays.get(TORCHVISION.cls_score + ".bias", ())) == 91 \
        or arch.keypoints
    with open(os.path.join(output, "meta.json"), "w") as f:
      json.dump(class_meta(model_cfg.num_classes, num_keypoints, coco), f, indent=1)
  with open(os.path.join(output, "convert.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--from", dest="source", required=True, choices=("torchvision", "detectron2"))
  parser.add_argument("--arch", required=True,
                      help=f"torchvision: {', '.join(TORCHVISION_ARCHS)}; "
                           f"detectron2: {', '.join(DETECTRON2_ARCHS)}")
  parser.add_argument("--input", required=True, help="a torchvision .pth or detectron2 .pkl")
  parser.add_argument("--output", required=True, help="checkpoint directory to create")
  parser.add_argument("--classes", default="auto",
                      help="torchvision: 'auto' keeps COCO's 80 real classes of a 91-class "
                           "model, 'all' keeps every foreground row")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.source, args.arch, args.input, args.output, args.classes,
                      args.overwrite)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"convert: {e}", file=sys.stderr)
    return 2
  archs = TORCHVISION_ARCHS if args.source == "torchvision" else DETECTRON2_ARCHS
  if not archs[args.arch].detector:
    print(f"wrote {summary['checkpoint']} (an ImageNet {args.arch}); start a detector from it "
          f"with --config.init_checkpoint={args.output} --config.init_keep=backbone")
    return 0
  print(f"wrote {summary['checkpoint']} ({args.source} {args.arch}: "
        f"{summary['model']['num_classes']} classes); use it with "
        f"{run_flags(summary, args.output)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
