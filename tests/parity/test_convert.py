"""mrcnn_jax.convert: detectron2 round trip, initialisation for training, and bad input."""

import os
import pickle
import re

import jax
import numpy as np
import pytest

from mrcnn_jax import checkpointing, convert
from tests.parity import conftest as parity

pytestmark = pytest.mark.slow


def detectron2_from_torchvision(state: dict) -> dict:
  """A detectron2-format weight dict, written independently of convert.py's maps.

  detectron2 names (backbone.bottom_up.res2.0.conv1.norm, fpn_lateral2,
  proposal_generator.rpn_head.objectness_logits, box_head.fc1, ...) and
  layouts: background is the last class logit, and there is no background
  box or mask.
  """
  out = {}
  renames = [
      (r"^backbone\.body\.conv1\.", "backbone.bottom_up.stem.conv1."),
      (r"^backbone\.body\.bn1\.", "backbone.bottom_up.stem.conv1.norm."),
      (r"^backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.",
       lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
      (r"^backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.",
       lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
      (r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.",
       lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut."),
      (r"^backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.",
       lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
      (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}."),
      (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", lambda m: f"backbone.fpn_output{int(m[1]) + 2}."),
      (r"^rpn\.head\.conv\.0\.0\.", "proposal_generator.rpn_head.conv."),
      (r"^rpn\.head\.cls_logits\.", "proposal_generator.rpn_head.objectness_logits."),
      (r"^rpn\.head\.bbox_pred\.", "proposal_generator.rpn_head.anchor_deltas."),
      (r"^roi_heads\.box_head\.fc6\.", "roi_heads.box_head.fc1."),
      (r"^roi_heads\.box_head\.fc7\.", "roi_heads.box_head.fc2."),
      (r"^roi_heads\.mask_head\.(\d)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}."),
      (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
      (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.predictor."),
      (r"^roi_heads\.keypoint_head\.(\d+)\.",
       lambda m: f"roi_heads.keypoint_head.conv_fcn{int(m[1]) // 2 + 1}."),
      (r"^roi_heads\.keypoint_predictor\.kps_score_lowres\.", "roi_heads.keypoint_head.score_lowres."),
  ]
  for name, value in state.items():
    if name.endswith("num_batches_tracked"):
      continue
    value = value.numpy()
    if "cls_score" in name:
      value = np.concatenate([value[1:], value[:1]])  # background last
    elif "bbox_pred" in name and "roi_heads" in name:
      value = value[4:]  # no background box
    elif "mask_fcn_logits" in name:
      value = value[1:]  # no background mask
    for pattern, repl in renames:
      name = re.sub(pattern, repl, name)
    out[name] = value
  return out


@pytest.mark.parametrize("tv_arch,d2_arch", [("maskrcnn_resnet50_fpn", "mask_rcnn_R_50_FPN"),
                                              ("keypointrcnn_resnet50_fpn", "keypoint_rcnn_R_50_FPN")])
def test_detectron2_file_round_trips_to_the_same_model(torch, converted, tmp_path, tv_arch, d2_arch):
  """A .pkl with detectron2's names and layouts converts to exactly the torchvision conversion."""
  tv_model, tv_checkpoint, _ = converted(tv_arch)
  pkl = tmp_path / "model_final.pkl"
  with open(pkl, "wb") as f:  # protocol 2 and a "model" dict, as the model zoo's files
    pickle.dump({"model": detectron2_from_torchvision(tv_model.state_dict()),
                 "__author__": "test"}, f, protocol=2)
  out = str(tmp_path / "d2")
  assert convert.main(["--from=detectron2", f"--arch={d2_arch}", f"--input={pkl}",
                       f"--output={out}"]) == 0
  ours, theirs = checkpointing.load_variables(out), checkpointing.load_variables(tv_checkpoint)
  flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(t)}
  ours, theirs = flat(ours), flat(theirs)
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_missing_and_unused_tensors_are_named(torch, converted, tmp_path, capsys):
  tv_model, _, _ = converted("maskrcnn_resnet50_fpn")
  state = {k: v.numpy() for k, v in tv_model.state_dict().items()}
  missing = dict(state)
  del missing["roi_heads.box_head.fc7.bias"]
  with pytest.raises(convert.ConversionError, match=r"missing tensor 'roi_heads\.box_head\.fc7\.bias'"):
    convert.convert_arrays(missing, "torchvision", "maskrcnn_resnet50_fpn")
  extra = dict(state, **{"roi_heads.extra_head.weight": np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unused tensor.*roi_heads\.extra_head\.weight"):
    convert.convert_arrays(extra, "torchvision", "maskrcnn_resnet50_fpn")
  # A Mask R-CNN file named as Faster R-CNN leaves the mask head unused.
  with pytest.raises(convert.ConversionError, match=r"unused tensor.*mask_head"):
    convert.convert_arrays(state, "torchvision", "fasterrcnn_resnet50_fpn")
  # The CLI: a one-line error and exit 2.
  pth = tmp_path / "missing.pth"
  torch.save({k: torch.from_numpy(v) for k, v in missing.items()}, pth)
  assert convert.main(["--from=torchvision", "--arch=maskrcnn_resnet50_fpn", f"--input={pth}",
                       f"--output={tmp_path / 'out'}"]) == 2
  assert "fc7.bias" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")


def test_old_torchvision_names_and_coco_classes(torch, torchvision):
  """The released COCO .pth files use version-1 names and 91 classes (10 unused ids)."""
  from torchvision.models import detection
  torch.manual_seed(0)
  model = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  old = {}
  for name, value in state.items():
    name = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", name)
    name = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d)\.0\.", r"\1.", name)
    name = re.sub(r"^roi_heads\.mask_head\.(\d)\.0\.",
                  lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", name)
    old[name] = value
  variables = convert.convert_arrays(old, "torchvision", "maskrcnn_resnet50_fpn")
  logits = variables["params"]["box_head"]["predictor"]["cls_score"]["kernel"]
  assert logits.shape == (1024, 81)
  cls = state["roi_heads.box_predictor.cls_score.weight"]
  # Our class 0 is COCO id 1 (person), class 79 id 90 (toothbrush), background last.
  np.testing.assert_array_equal(logits[:, 0], cls[1])
  np.testing.assert_array_equal(logits[:, 79], cls[90])
  np.testing.assert_array_equal(logits[:, 80], cls[0])
  masks = variables["params"]["mask_head"]["predictor"]["kernel"]
  np.testing.assert_array_equal(masks[0, 0, :, 11], state["roi_heads.mask_predictor.mask_fcn_logits.weight"][13, :, 0, 0])
  meta = convert.class_meta(80, 0, coco=True)
  assert meta["coco_ids"][11] == 13 and meta["names"][11] == "stop sign"


def test_backbone_initialises_training_of_a_new_class_count(torch, torchvision, tmp_path):
  """A converted ImageNet ResNet-50 and a converted detector initialise another model."""
  import optax
  from mrcnn_jax import train
  from mrcnn_jax.modeling import build
  torch.manual_seed(0)
  resnet = torchvision.models.resnet50()
  pth = tmp_path / "resnet50.pth"
  torch.save(resnet.state_dict(), pth)
  assert convert.main(["--from=torchvision", "--arch=resnet50", f"--input={pth}",
                       f"--output={tmp_path / 'r50'}"]) == 0
  config = parity.our_config(keypoint=False)
  config.model.num_classes = 3
  config.data.update(canvas_size=(64, 64))
  config.init_checkpoint = str(tmp_path / "r50")
  config.init_keep = "backbone"
  model = build.build_model(config)
  state = train.create_state(model, optax.sgd(0.1), config, jax.random.PRNGKey(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = train._load_initialisation(state, config, device)
  conv1 = resnet.state_dict()["conv1.weight"].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(loaded.params["backbone"]["conv1"]["kernel"], conv1)
  np.testing.assert_array_equal(loaded.model_state["batch_stats"]["backbone"]["norm1"]["var"],
                                resnet.state_dict()["bn1.running_var"].numpy())
  np.testing.assert_array_equal(loaded.params["fpn"]["output2"]["kernel"],
                                state.params["fpn"]["output2"]["kernel"])  # not in the file: kept

  # "all" from a backbone-only file names what is missing.
  config.init_keep = "all"
  with pytest.raises(KeyError, match="no tensor params/"):
    train._load_initialisation(state, config, device)

  # C4: the box head's res5 stage starts from the file's layer4, as in detectron2.
  c4 = config.copy_and_resolve_references()
  c4.model = build.model_config("c4", num_classes=3)
  c4.init_keep = "backbone"
  model = build.build_model(c4)
  state = train.create_state(model, optax.sgd(0.1), c4, jax.random.PRNGKey(0))
  loaded = train._load_initialisation(state, c4, device)
  res5 = loaded.params["box_head"]["res5"]
  layer4 = resnet.state_dict()["layer4.2.conv3.weight"].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(res5["2"]["conv3"]["kernel"], layer4)
  np.testing.assert_array_equal(
      loaded.model_state["batch_stats"]["box_head"]["res5"]["0"]["norm1"]["mean"],
      resnet.state_dict()["layer4.0.bn1.running_mean"].numpy())
  assert "layer4" not in loaded.params["backbone"]


@pytest.mark.parametrize("source,archs", [("torchvision", convert.TORCHVISION_ARCHS),
                                          ("detectron2", convert.DETECTRON2_ARCHS)])
def test_each_arch_names_a_config_that_runs_it(source, archs):
  """The config the CLI names after conversion loads with its argument and has the arch's
  heads (the R_101 archs add a depth override to it)."""
  import importlib
  named = {"cascade_mask_rcnn_R_101_FPN": "configs/cascade_mask_rcnn_r50_fpn_1x.py:detectron2",
           "faster_rcnn_R_50_C4": "configs/coco_mask_rcnn_r50_c4_1x.py:faster",
           "keypointrcnn_resnet50_fpn": "configs/torchvision_mask_rcnn.py:keypoint",
           "maskrcnn_resnet50_fpn": "configs/torchvision_mask_rcnn.py"}
  for name in set(named) & set(archs):
    assert convert.config_file(source, archs[name]) == named[name]
  for name, arch in archs.items():
    if not arch.detector:
      continue
    path, _, arg = convert.config_file(source, arch).partition(":")
    m = importlib.import_module(path[:-len(".py")].replace("/", ".")).get_config(arg or None).model
    assert (m.mask_head.enabled, m.keypoint_head.enabled, m.design == "c4",
            bool(m.cascade.iou_thresholds)) == (arch.mask, arch.keypoints, arch.c4,
                                                arch.cascade), name
    assert m.backbone.stride_in_1x1 == (source == "detectron2"), name  # MSRA's ResNets
  summary = {"config": "configs/x.py:detectron2", "model": {"backbone": {"depth": "101"}}}
  assert convert.run_flags(summary, "w/d2") == (
      "--config=configs/x.py:detectron2 --checkpoint=w/d2 --config.model.backbone.depth=101")
  summary["model"]["backbone"]["depth"] = "50"
  assert convert.run_flags(summary, "w/d2") == "--config=configs/x.py:detectron2 --checkpoint=w/d2"


def test_pickle_with_code_is_refused(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": {"x": Exploit()}}, f)
  with pytest.raises(convert.ConversionError, match="refusing to load .*system"):
    convert.read_detectron2(str(path))


def test_bad_arguments(tmp_path, capsys):
  assert convert.main(["--from=torchvision", "--arch=resnet50", "--input=/nonexistent.pth",
                       f"--output={tmp_path / 'o'}"]) == 2
  assert "/nonexistent.pth: no such file" in capsys.readouterr().err
  with pytest.raises(convert.ConversionError, match="--arch"):
    convert.convert_arrays({}, "detectron2", "maskrcnn_resnet50_fpn")
  garbage = tmp_path / "garbage.pkl"
  garbage.write_bytes(b"not a pickle at all")
  with pytest.raises(convert.ConversionError, match="garbage.pkl"):
    convert.read_detectron2(str(garbage))
