"""TFDS detection datasets as a source, against the converted split of the same images.

Each dataset is written here by a builder over the synthetic shapes images
(offline, a few seconds), in TFDS's COCO layout, prepared as ArrayRecord (and
TFRecord, TFDS's default).
"""

import contextlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax import storage
from mrcnn_jax.data import input_pipeline, records, synthetic
from mrcnn_jax.data.tfds_source import TfdsSplit, TfrecordShards
from mrcnn_jax.modeling import build
from tests.data.conftest import data_config

NAMES = [c["name"] for c in sorted(synthetic.CATEGORIES, key=lambda c: c["id"])]
HAND_HW = (20, 30)


class ShapesDetection(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The shapes splits in TFDS's COCO layout; configs: with masks, boxes only, a hand-made
  image, and one without labels."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n)
                     for n in ("masks", "boxes", "hand", "nolabels")]
  raw = None  # the synthetic COCO directory, set before preparing


  def _info(self):
    objects = {"bbox": tfds.features.BBoxFeature(), "is_crowd": np.bool_}
    if self.builder_config.name != "nolabels":
      objects["label"] = tfds.features.ClassLabel(names=NAMES)
    if self.builder_config.name in ("masks", "hand"):
      objects["segmentation"] = tfds.features.Image(shape=(None, None, 1))
    if self.builder_config.name in ("masks", "boxes"):  # as given in the COCO JSON
      objects["area"] = np.float32
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "image/id": np.int64,
        "image/filename": tfds.features.Text(), "objects": tfds.features.Sequence(objects)}))

  def _split_generators(self, dl_manager):
    if self.builder_config.name == "hand":
      return {"validation": self._hand()}
    return {"train": self._generate_examples("train"),
            "validation": self._generate_examples("val")}

  def _hand(self):
    """One 20 x 30 image: a box at x 6..18, y 2..10 filled by its mask, and a box of
    zero height (left out)."""
    mask = np.zeros(HAND_HW + (1,), np.uint8)
    mask[2:10, 6:18] = 1
    yield 0, {"image": np.full(HAND_HW + (3,), 7, np.uint8), "image/id": 5,
              "image/filename": "hand.png",
              "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
                                   tfds.features.BBox(0.3, 0.3, 0.3, 0.5)],
                          "label": [3, 1], "is_crowd": [False, False],
                          "segmentation": [mask, np.zeros_like(mask)]}}

  def _generate_examples(self, split):
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO(str(self.raw / "annotations" / f"instances_{split}.json"))
    label = {c["id"]: NAMES.index(c["name"]) for c in gt.dataset["categories"]}
    for image in gt.dataset["images"]:
      h, w = image["height"], image["width"]
      anns = gt.loadAnns(gt.getAnnIds(imgIds=image["id"], iscrowd=None))
      boxes = [tfds.features.BBox(max(y, 0) / h, max(x, 0) / w, min(y + bh, h) / h,
                                  min(x + bw, w) / w) for x, y, bw, bh in (a["bbox"] for a in anns)]
      objects = {"bbox": boxes, "is_crowd": [bool(a["iscrowd"]) for a in anns]}
      if self.builder_config.name != "nolabels":
        objects["label"] = [label[a["category_id"]] for a in anns]
      if self.builder_config.name == "masks":
        objects["segmentation"] = [gt.annToMask(a)[..., None] for a in anns]
      if self.builder_config.name != "nolabels":
        objects["area"] = [a["area"] for a in anns]
      # The JPEG's path: TFDS stores its bytes as they are, as the converter does.
      yield image["id"], {"image": self.raw / split / image["file_name"],
                          "image/id": image["id"], "image/filename": image["file_name"],
                          "objects": objects}


# TFDS looks for a builder's checksums beside its package's source through
# importlib_resources (not installed) unless the module is top-level.
ShapesDetection.__module__ = "shapes_detection"


@pytest.fixture(scope="module")
def tfds_dir(shapes_dataset, tmp_path_factory):
  """A TFDS data dir holding shapes_detection/{masks,boxes,hand} as ArrayRecord."""
  ShapesDetection.raw = shapes_dataset[0]
  root = tmp_path_factory.mktemp("tfds")
  for name in ("masks", "boxes", "hand"):
    ShapesDetection(config=name, data_dir=str(root),
                    file_format="array_record").download_and_prepare()
  return root


def tfds_config(tfds_dir, name="shapes_detection/masks", **overrides):
  return data_config(tfds_dir, source="tfds", tfds_name=name, tfds_data_dir=str(tfds_dir),
                     tfds_train_split="train", tfds_eval_split="validation",
                     train_dir="", eval_dir="", **overrides)


def test_a_hand_made_record(tfds_dir):
  split = TfdsSplit("shapes_detection/hand", "validation", str(tfds_dir))
  assert len(split) == 1 and split.num_instances.tolist() == [1]
  assert split.image_sizes.tolist() == [list(HAND_HW)] and split.image_id.tolist() == [5]
  ex = records.parse(tf.constant(split.read(0)), num_keypoints=0)
  assert int(ex["image_id"]) == 5 and ex["original_size"].numpy().tolist() == list(HAND_HW)
  # Normalised (ymin, xmin, ymax, xmax) = (0.1, 0.2, 0.5, 0.6) of 20 x 30 pixels.
  np.testing.assert_allclose(ex["boxes"], [[6, 2, 18, 10]], atol=1e-5)
  assert ex["classes"].numpy().tolist() == [3] and not ex["is_crowd"].numpy().any()
  assert ex["mask_window"].numpy().tolist() == [[6, 2, 12, 8]]
  crop = tf.io.decode_png(ex["mask_png"][0]).numpy()[..., 0]
  assert crop.shape == (8, 12) and (crop == 255).all()
  np.testing.assert_allclose(ex["areas"], [96])  # the mask's pixels (no area feature)
  image = tf.io.decode_image(ex["encoded"]).numpy()
  assert image.shape == HAND_HW + (3,) and (image == 7).all()

  gt = split.ground_truth()
  assert gt["images"] == [{"id": 5, "file_name": "hand.png", "height": 20, "width": 30}]
  (ann,) = gt["annotations"]
  assert ann["category_id"] == 4 and ann["iscrowd"] == 0 and ann["area"] == 96 and ann["id"] == 1
  np.testing.assert_allclose(ann["bbox"], [6, 2, 12, 8], atol=1e-5)
  assert mask_utils.area(dict(ann["segmentation"], counts=ann["segmentation"]["counts"]
                              .encode())) == 96
  assert [c["name"] for c in gt["categories"]] == NAMES
  assert split.meta["coco_ids"] == [1, 2, 3, 4, 5] and split.meta["has_masks"]


def _by_id(batches):
  out = {}
  for b in batches:
    for k in np.flatnonzero(b["image_info"]["valid"]):
      out[int(b["image_info"]["image_id"][k])] = {
          key: b[key][k] for key in ("images", "gt_boxes", "gt_classes", "gt_valid",
                                     "gt_is_crowd", "gt_masks")}
  return out


def test_eval_batches_and_ground_truth_match_the_converted_split(shapes_dataset, tfds_dir):
  """The same images through both sources: the same pixels, boxes, classes, crowds and
  masks in every eval batch, and the same COCO ground truth."""
  _, tf_dir = shapes_dataset
  converted = _by_id(input_pipeline.make_dataset(data_config(tf_dir), "eval")
                     .as_numpy_iterator())
  config = tfds_config(tfds_dir)
  split = input_pipeline.open_split(config, "eval")
  assert isinstance(split, TfdsSplit) and len(split) == len(converted) == 8
  ours = _by_id(input_pipeline.make_dataset(config, "eval", records=split).as_numpy_iterator())
  assert ours.keys() == converted.keys()
  for image_id, want in converted.items():
    got = ours[image_id]
    np.testing.assert_array_equal(got["images"], want["images"])
    for key in ("gt_classes", "gt_valid", "gt_is_crowd"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} of {image_id}")
    np.testing.assert_allclose(got["gt_boxes"], want["gt_boxes"], atol=2e-3)
    # A box a float's rounding apart may move its pixel window by one: the masks
    # are sampled at the same cell centres, so they differ by rounding only.
    np.testing.assert_allclose(got["gt_masks"], want["gt_masks"], atol=2e-3)

  gt, want = split.ground_truth(), json.loads((tf_dir / "val" / "ground_truth.json").read_text())
  assert sorted(gt["images"], key=lambda im: im["id"]) == sorted(
      ({k: im[k] for k in ("id", "file_name", "height", "width")} for im in want["images"]),
      key=lambda im: im["id"])
  name_of = {c["id"]: c["name"] for c in want["categories"]}
  ours_by_image = {}
  for ann in gt["annotations"]:
    ours_by_image.setdefault(ann["image_id"], []).append(ann)
  assert len(gt["annotations"]) == len(want["annotations"])
  for ann in want["annotations"]:  # in the order given, image by image
    got = ours_by_image[ann["image_id"]].pop(0)
    assert NAMES[got["category_id"] - 1] == name_of[ann["category_id"]]
    assert got["iscrowd"] == ann["iscrowd"] and got["area"] == pytest.approx(ann["area"])
    np.testing.assert_allclose(got["bbox"], ann["bbox"], atol=2e-3)
    h, w = got["segmentation"]["size"]
    mask = mask_utils.decode(dict(got["segmentation"],
                                  counts=got["segmentation"]["counts"].encode()))
    segm = ann["segmentation"]
    rle = (mask_utils.merge(mask_utils.frPyObjects(segm, h, w)) if isinstance(segm, list)
           else mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list)
           else segm)
    np.testing.assert_array_equal(mask, mask_utils.decode(rle))


def test_training_order_is_deterministic_and_resumes_exactly(tfds_dir):
  config = tfds_config(tfds_dir)
  split = input_pipeline.open_split(config, "train")
  take = lambda start, n: list(input_pipeline.make_dataset(
      config, "train", start_step=start, records=split).take(n).as_numpy_iterator())
  first = take(0, 6)  # 6 steps of 4: past the first epoch of 16 images
  again, resumed = take(0, 6), take(4, 2)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["images"], b["images"])
  for a, b in zip(first[4:], resumed):
    for key in ("images", "gt_boxes", "gt_masks"):
      np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["image_info"]["image_id"], b["image_info"]["image_id"])
  ids = np.concatenate([b["image_info"]["image_id"] for b in first[:4]])
  assert sorted(ids.tolist()) == sorted(split.image_id[split.num_instances > 0].tolist())


def test_a_box_only_dataset_refuses_the_mask_head(tfds_dir):
  config = tfds_config(tfds_dir, name="shapes_detection/boxes")
  split = input_pipeline.open_split(config, "eval")
  assert split.meta["has_masks"] is False
  assert not any("segmentation" in a for a in split.ground_truth()["annotations"])
  (batch,) = list(input_pipeline.make_dataset(config, "eval", batch_size=8, records=split)
                  .as_numpy_iterator())
  assert batch["gt_valid"].any() and not batch["gt_masks"].any()
  model = build.model_config()  # the recipe: mask head on
  model.num_classes = len(NAMES)
  with pytest.raises(build.DataMismatchError, match="box-only"):
    build.check_dataset(model, split.meta, split.directory)


def test_a_missing_feature_is_named(tfds_dir, tmp_path):
  ShapesDetection(config="nolabels", data_dir=str(tmp_path),
                  file_format="array_record").download_and_prepare()
  with pytest.raises(records.SourceError, match="has no feature 'objects/label'"):
    TfdsSplit("shapes_detection/nolabels", "validation", str(tmp_path))
  with pytest.raises(records.SourceError, match="no such split"):
    TfdsSplit("shapes_detection/hand", "test", str(tfds_dir))
  with pytest.raises(records.SourceError, match="cannot be opened"):
    TfdsSplit("no_such_dataset", "train", str(tfds_dir))


def test_a_tfrecord_dataset_reads_as_the_array_record_one(tfds_dir, tmp_path, monkeypatch):
  """TFDS's default format, read by number through an index of its framing: the same
  records as the ArrayRecord copy; a flipped byte is named by its record; a read that
  keeps failing is an UnreadableRecordError (never skipped as bad data)."""
  ShapesDetection(config="masks", data_dir=str(tmp_path),
                  file_format="tfrecord").download_and_prepare()
  split = TfdsSplit("shapes_detection/masks", "validation", str(tmp_path))
  reference = TfdsSplit("shapes_detection/masks", "validation", str(tfds_dir))
  assert len(split) == len(reference) == 8
  by_id = lambda s: {int(s.image_id[i]): i for i in range(len(s))}
  ours, theirs = by_id(split), by_id(reference)
  assert ours.keys() == theirs.keys()
  for image_id, i in ours.items():
    a = records.parse(tf.constant(split.read(i)), 0)
    b = records.parse(tf.constant(reference.read(theirs[image_id])), 0)
    for key in ("encoded", "boxes", "classes", "is_crowd", "areas", "mask_png", "mask_window"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} of {image_id}")

  def failing(self, i):
    raise storage.ReadError(f"{self.paths[0]}: read failed 4 times (ConnectionResetError)")
  monkeypatch.setattr(TfrecordShards, "__getitem__", failing)
  with pytest.raises(records.UnreadableRecordError,
                     match=r"split validation: record 2, image id \d+: unreadable: .*failed 4"):
    split.read(2)
  monkeypatch.undo()

  (shard,) = [p for p in (tmp_path / "shapes_detection" / "masks" / "1.0.0").iterdir()
              if "validation.tfrecord" in p.name]
  offset, length = records.scan_framing(storage.RangeReader(str(shard)))[3]
  data = bytearray(shard.read_bytes())
  data[offset + 12 + length // 2] ^= 0xFF  # inside record 3's payload
  shard.write_bytes(bytes(data))
  with pytest.raises(records.CorruptRecordError,
                     match=r"split validation: record 3: unreadable .*data CRC mismatch"):
    TfdsSplit("shapes_detection/masks", "validation", str(tmp_path))


@pytest.mark.slow
def test_train_and_evaluate_from_tfds(tfds_dir, tmp_path):
  """Two steps and an evaluation through train's code path, data from the box-only TFDS
  dataset (the heads a box-only dataset trains: the smallest model to compile)."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from mrcnn_jax import train  # pylint: disable=g-import-not-at-top
  config = shapes.get_config("tiny")
  config.data.update(source="tfds", tfds_name="shapes_detection/boxes",
                     tfds_data_dir=str(tfds_dir), train_dir="", eval_dir="",
                     canvas_size=(64, 64))
  config.model.num_classes = len(NAMES)
  config.model.mask_head.enabled = False
  config.model.keypoint_head.enabled = False  # the TFDS layout has no keypoints
  config.update(batch_size=4, eval_batch_size=4, total_steps=2)
  config.train.update(log_every=1, checkpoint_every=2, eval_every=2, progress=False)
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert "bbox/AP" in metrics and "segm/AP" not in metrics
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in lines if "train/loss" in r)
  assert json.loads((tmp_path / "meta.json").read_text())["names"] == NAMES
  assert (tmp_path / "checkpoints" / "2").is_dir()
