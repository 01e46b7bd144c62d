"""The synthetic dataset is a real COCO dataset: pycocotools loads it and scores it perfectly."""

import contextlib
import copy
import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax.data import synthetic


def _coco(path):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(path))


def test_loads_in_pycocotools_with_every_feature(shapes_dataset):
  raw, _ = shapes_dataset
  gt = _coco(raw / "annotations" / "instances_train.json")
  assert len(gt.getImgIds()) == 16
  cats = gt.loadCats(gt.getCatIds())
  assert len(cats) == 5 and [c["id"] for c in cats] == [2, 5, 7, 9, 11]
  tri = gt.loadCats(7)[0]
  assert tri["keypoints"] == ["apex", "left_base", "right_base"] and tri["skeleton"]
  anns = gt.loadAnns(gt.getAnnIds())
  assert all(isinstance(a["segmentation"], list) for a in anns if not a["iscrowd"])
  for a in anns:
    x, y, w, h = a["bbox"]
    assert w > 0 and h > 0 and a["area"] > 0
    if "keypoints" in a:
      assert a["category_id"] == 7 and len(a["keypoints"]) == 9
      assert a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3])
  for img in gt.loadImgs(gt.getImgIds()):
    with Image.open(raw / "train" / img["file_name"]) as im:
      assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_crowd_regions_are_rle_and_masks_show_only_visible_parts(tmp_path):
  """Visible masks of one image never overlap (occluded parts are not annotated)."""
  synthetic.main(["--output", str(tmp_path), "--train", "40", "--val", "1", "--size", "64",
                  "--seed", "1", "--workers", "1"])
  gt = _coco(tmp_path / "annotations" / "instances_train.json")
  crowd = gt.loadAnns(gt.getAnnIds(iscrowd=True))
  assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)
  overlapping_boxes = 0
  for image_id in gt.getImgIds():
    anns = gt.loadAnns(gt.getAnnIds(imgIds=image_id, iscrowd=None))
    masks = [gt.annToMask(a) for a in anns]
    if masks:
      # Polygon rasterisation may share a pixel along a common edge.
      assert np.sum(np.sum(masks, axis=0) > 1) <= 2 * len(masks) * 64, image_id
    boxes = [a["bbox"] for a in anns]
    for i in range(len(boxes)):
      for j in range(i):
        (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
        overlapping_boxes += x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1
  assert overlapping_boxes > 0  # objects do overlap one another


def test_cocoeval_scores_its_own_ground_truth_perfectly(shapes_dataset):
  raw, _ = shapes_dataset
  path = raw / "annotations" / "instances_val.json"
  gt = _coco(path)
  dets = []
  for a in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
    d = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
         "bbox": a["bbox"], "segmentation": gt.annToRLE(a)}
    if "keypoints" in a:
      d["keypoints"] = a["keypoints"]
    dets.append(d)
  with contextlib.redirect_stdout(io.StringIO()):
    results = gt.loadRes(copy.deepcopy(dets))
  for iou_type in ("bbox", "segm", "keypoints"):
    with contextlib.redirect_stdout(io.StringIO()):
      e = COCOeval(gt, results, iou_type)
      if iou_type == "keypoints":
        e.params.catIds = [7]
        e.params.kpt_oks_sigmas = np.full(3, 0.05)
      e.evaluate()
      e.accumulate()
      e.summarize()
    assert e.stats[0] == 1.0, iou_type


def test_generation_is_deterministic(tmp_path):
  for name in ("a", "b"):
    synthetic.main(["--output", str(tmp_path / name), "--train", "3", "--val", "1", "--size",
                    "48", "--seed", "5", "--workers", "1"])
  for split in ("train", "val"):
    a = json.loads((tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text())
    b = json.loads((tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text())
    assert a == b
  names = sorted(os.listdir(tmp_path / "a" / "train"))
  for n in names:
    assert (tmp_path / "a" / "train" / n).read_bytes() == (tmp_path / "b" / "train" / n).read_bytes()


def test_min_object_size_grows_only_the_small_objects():
  """--min_object_size: same scenes (random stream unchanged), no object drawn smaller."""
  cats = {c["name"]: c for c in synthetic.CATEGORIES}
  sizes = {}
  for min_size in (0.0, 20.0):
    drawn = []
    real = synthetic._shape_polygon  # pylint: disable=protected-access
    def spy(name, cx, cy, size, angle, rng, drawn=drawn, real=real):
      drawn.append((name, size))
      return real(name, cx, cy, size, angle, rng)
    synthetic._shape_polygon = spy  # pylint: disable=protected-access
    try:
      images = [synthetic.make_image(np.random.default_rng([3, i]), 64, i, cats,
                                     min_object_size=min_size)[0] for i in range(30)]
    finally:
      synthetic._shape_polygon = real  # pylint: disable=protected-access
    sizes[min_size] = (drawn, [im.shape for im in images])
  (plain, plain_shapes), (grown, grown_shapes) = sizes[0.0], sizes[20.0]
  assert plain_shapes == grown_shapes
  assert [a[0] for a in plain] == [b[0] for b in grown]  # same shapes in the same order
  for (name, a), (_, b) in zip(plain, grown):
    # Objects reach 20 px; only a crowd's small blobs (ellipses <= 8% of 64 px) keep their size.
    assert b >= 20.0 - 1e-9 or (name == "ellipse" and b == a and a <= 0.08 * 64), (name, a, b)
  assert any(a < 20.0 <= b for (_, a), (_, b) in zip(plain, grown))


def test_min_object_size_is_checked(tmp_path, capsys):
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit):
    synthetic.main(["--output", str(tmp_path), "--size", "64", "--min_object_size", "65"])
  assert "--min_object_size" in capsys.readouterr().err
