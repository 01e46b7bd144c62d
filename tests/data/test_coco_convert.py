"""Conversion: exact masks, every kind of bad input reported and skipped, whole-input failures."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_jax.data import coco
from mrcnn_jax.data.records import RecordFile, parse


def _records(directory):
  rf = RecordFile(str(directory))
  return [parse(tf.constant(rf.read(i)), rf.num_keypoints) for i in range(len(rf))]


def test_stored_masks_equal_pycocotools_annToMask(shapes_dataset):
  """Each instance PNG pasted back at its window is exactly annToMask of its annotation."""
  raw, tf_dir = shapes_dataset
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(str(raw / "annotations" / "instances_train.json"))
  meta = json.loads((tf_dir / "train" / "meta.json").read_text())
  checked = 0
  for ex in _records(tf_dir / "train"):
    image_id = int(ex["image_id"])
    anns = {a["id"]: a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id, iscrowd=None))}
    h, w = ex["original_size"].numpy()
    for png, window, box, cls in zip(ex["mask_png"].numpy(), ex["mask_window"].numpy(),
                                     ex["boxes"].numpy(), ex["classes"].numpy()):
      x, y, ww, wh = window.astype(int)
      full = np.zeros((h, w), np.uint8)
      full[y:y + wh, x:x + ww] = tf.io.decode_png(png)[..., 0].numpy() > 127
      match = [a for a in anns.values() if np.array_equal(gt.annToMask(a), full)]
      assert match, (image_id, box)
      assert meta["coco_ids"][cls] == match[0]["category_id"]
      checked += 1
  assert checked == len(gt.getAnnIds())


def _write(path, array, **save):
  Image.fromarray(array).save(path, **save)


@pytest.fixture
def bad_dataset(tmp_path):
  """A COCO split with one of each documented problem (and valid data beside it)."""
  d = tmp_path / "images"
  d.mkdir()
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  _write(d / "good.jpg", rgb(40, 60))
  _write(d / "gray.png", rng.integers(0, 255, (40, 60), dtype=np.uint8))
  _write(d / "rgba.png", rng.integers(0, 255, (40, 60, 4), dtype=np.uint8))
  Image.fromarray(rgb(40, 60)).convert("P").save(d / "palette.png")
  Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16)).save(d / "deep.png")
  # Stored 60 wide x 40 tall, EXIF orientation 6 (rotate 90 CW to view): 40 x 60 upright.
  exif = Image.Exif()
  exif[0x0112] = 6
  stored = np.zeros((40, 60, 3), np.uint8)
  stored[:, :30] = 255  # left half white -> top half white when upright
  Image.fromarray(stored).save(d / "exif.jpg", exif=exif.tobytes(), quality=98)
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  _write(d / "wrong_size.jpg", rgb(30, 30))
  _write(d / "empty.jpg", rgb(40, 60))
  images = [("good.jpg", 60, 40), ("gray.png", 60, 40), ("rgba.png", 60, 40),
            ("palette.png", 60, 40), ("deep.png", 60, 40), ("exif.jpg", 40, 60),
            ("corrupt.jpg", 60, 40), ("missing.jpg", 60, 40), ("wrong_size.jpg", 60, 40),
            ("empty.jpg", 60, 40)]
  poly = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]
  anns = []
  def ann(image_id, **kw):
    base = {"id": 100 + len(anns), "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "bbox": [5, 5, 10, 10], "segmentation": poly(5, 5, 10), "area": 100}
    base.update(kw)
    anns.append(base)
  for i in range(1, 7):
    ann(i)  # one valid instance on each decodable image
  ann(7)
  ann(8)
  ann(9)
  ann(1, bbox=[5, 5, 0, 10])  # zero width
  ann(1, bbox=[5, 5, -3, 10])  # negative
  ann(1, bbox=[100, 100, 10, 10], segmentation=poly(100, 100, 10))  # outside
  ann(1, segmentation=[[5, 5, 15, 5]])  # 2-point polygon
  ann(1, category_id=42)  # unknown category
  ann(2, category_id=3, keypoints=[0, 0, 0, 50, 30, 2, 7, 7, 2])  # kp outside its box
  ann(3, bbox=[50, 30, 20, 20], segmentation=poly(50, 30, 20))  # partly outside: clipped
  ann(1, category_id=1, iscrowd=1, segmentation={"size": [40, 60], "counts": [100, 50, 2250]},
      bbox=[2, 20, 5, 5])
  data = {
      "images": [{"id": i + 1, "file_name": n, "width": w, "height": h}
                 for i, (n, w, h) in enumerate(images)],
      "annotations": anns,
      "categories": [{"id": 1, "name": "thing"},
                     {"id": 3, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"],
                      "skeleton": [[1, 2], [1, 3]]}],
  }
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(data))
  return d, path, tmp_path / "out"


def test_bad_input_is_reported_skipped_and_counted(bad_dataset, capsys):
  images, ann_path, out = bad_dataset
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out), "--shards", "2", "--workers", "1"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  s = meta["summary"]
  assert s["images in JSON"] == 10
  assert s["images written"] == 7 and s["images skipped"] == 3
  assert s["problems"] == {"image": 3, "bbox": 3, "segmentation": 1, "category": 1}
  log = (out / "problems.txt").read_text()
  for needle in ("corrupt.jpg: corrupt image", "missing.jpg: missing image file",
                 "wrong_size.jpg: image is 30x30 but the JSON says 60x40",
                 "good.jpg annotation 109: bbox has zero or negative size",
                 "good.jpg annotation 110: bbox has zero or negative size",
                 "good.jpg annotation 111: bbox [100, 100, 10, 10] lies outside",
                 "good.jpg annotation 112: no polygon with at least 3 points",
                 "good.jpg annotation 113: category_id 42 is not in categories",
                 "gray.png annotation 114: keypoints outside the box (kept)",
                 "rgba.png annotation 115: bbox [50, 30, 20, 20] clipped"):
    assert needle in log, needle
  printed = capsys.readouterr()
  assert "summary:" in printed.out and "Traceback" not in printed.err
  assert meta["coco_ids"] == [1, 3] and meta["keypoint_names"] == ["nose", "left_eye", "right_eye"]
  assert meta["keypoint_flip_map"] == [0, 2, 1]

  recs = {int(r["image_id"]): r for r in _records(out)}
  assert sorted(recs) == [1, 2, 3, 4, 5, 6, 10]
  # Nothing valid dropped: 6 instances + the clipped one + the crowd + the keypoint one.
  assert sum(len(r["classes"]) for r in recs.values()) == 9
  assert len(recs[10]["classes"]) == 0  # the image without annotations is kept
  np.testing.assert_allclose(recs[3]["boxes"].numpy()[1], [50, 30, 60, 40])
  assert recs[1]["is_crowd"].numpy().tolist() == [False, True]
  kp = recs[2]["keypoints"].numpy()[1]
  np.testing.assert_allclose(kp, [[0, 0, 0], [50.5, 30.5, 2], [7.5, 7.5, 2]])
  for image_id, rec in recs.items():
    image = tf.io.decode_image(rec["encoded"], channels=3, expand_animations=False).numpy()
    assert image.shape == tuple(rec["original_size"].numpy()) + (3,), image_id
  # EXIF orientation applied: 40 wide x 60 tall, the white half now on top.
  upright = tf.io.decode_image(recs[6]["encoded"], channels=3).numpy()
  assert upright.shape == (60, 40, 3)
  assert upright[:25].mean() > 200 and upright[35:].mean() < 50
  # 16-bit input scaled to 8 bits, not clipped.
  deep = tf.io.decode_image(recs[5]["encoded"], channels=3).numpy()
  assert 100 < deep.mean() < 155


def test_orphan_annotations_are_named(bad_dataset):
  """Annotations of image ids not in 'images' are skipped, counted, and each named."""
  images, ann_path, out = bad_dataset
  data = json.loads(ann_path.read_text())
  orphan = dict(data["annotations"][0], id=9001, image_id=12345)
  data["annotations"] += [orphan, dict(orphan, id=9002)]
  ann_path.write_text(json.dumps(data))
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out), "--shards", "1", "--workers", "1"]) == 0
  assert json.loads((out / "meta.json").read_text())["summary"]["problems"][
      "orphan annotations"] == 2
  log = (out / "problems.txt").read_text()
  for ann_id in (9001, 9002):
    assert f"annotation id {ann_id}: image_id 12345 is not in images; skipped" in log


@pytest.mark.parametrize("content,message", [
    ("{not json", "malformed JSON at line 1"),
    ("[]", "expected a JSON object"),
    ('{"images": [], "categories": [{"id": 1}]}', "'images' is missing or empty"),
    ('{"images": [{"id": 1}], "categories": []}', "'categories' is missing or empty"),
])
def test_unusable_input_fails_with_a_message(tmp_path, capsys, content, message):
  path = tmp_path / "bad.json"
  path.write_text(content)
  assert coco.main(["--images", str(tmp_path), "--annotations", str(path),
                    "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert message in err and str(path) in err and "Traceback" not in err


def test_missing_annotation_file_fails_with_a_message(tmp_path, capsys):
  assert coco.main(["--images", str(tmp_path), "--annotations", str(tmp_path / "nope.json"),
                    "--output", str(tmp_path / "out")]) == 2
  assert "no such file" in capsys.readouterr().err


def test_flip_map_pairs_left_and_right():
  names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "tail"]
  assert coco.flip_map(names) == [0, 2, 1, 4, 3, 5]


@pytest.fixture
def malformed_dataset(tmp_path):
  """Valid images whose JSON records are malformed in many ways, no keypoint category."""
  d = tmp_path / "images"
  d.mkdir()
  rng = np.random.default_rng(1)
  for i in range(1, 5):
    _write(d / f"{i}.png", rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
  square = [[5, 5, 15, 5, 15, 15, 5, 15]]
  images = [{"id": i, "file_name": f"{i}.png", "width": 60, "height": 40} for i in range(1, 5)]
  images += [
      {"id": "5", "file_name": "1.png", "width": 60, "height": 40},  # string id
      {"id": 6.0, "file_name": "1.png", "width": 60, "height": 40},  # float id
      {"id": 2 ** 31, "file_name": "1.png", "width": 60, "height": 40},  # beyond int32
      {"id": 7, "file_name": None, "width": 60, "height": 40},
      {"id": 8, "file_name": "1.png", "width": None, "height": 40},
      {"id": 1, "file_name": "2.png", "width": 60, "height": 40},  # repeated id
  ]
  anns = []
  def ann(image_id=1, **kw):
    base = {"id": 500 + len(anns), "image_id": image_id, "category_id": 3, "iscrowd": 0,
            "bbox": [5, 5, 10, 10], "segmentation": square, "area": 100}
    base.update(kw)
    base = {k: v for k, v in base.items() if v != "DROP"}
    anns.append(base)
  ann()  # 500: valid
  ann(area=None)  # 501: area from the mask, noted
  ann(area="big")  # 502: the same
  ann(iscrowd="DROP", area="DROP")  # 503: defaults filled for evaluation
  ann(category_id=[3])  # 504: skipped
  ann(segmentation={"size": 48, "counts": "abc"})  # 505: skipped
  ann(keypoints=[1, 2, "x"])  # 506: no keypoints here: ignored, kept
  ann(id=2 ** 70)  # 507: kept; id replaced in ground_truth.json
  ann(id="DROP")  # 508: kept; id given in ground_truth.json
  ann(segmentation=[[1, 2, 30, 4, 5, float("nan")]])  # 509: skipped (non-finite)
  ann(segmentation=[[1, 2, 1e30, 4, 5, 9]])  # 510: skipped (far off)
  ann(segmentation=[[5, 5, 10, 5, 15, 5]])  # 511: collinear, empty mask: skipped
  ann(iscrowd=7)  # 512: skipped
  ann(image_id="1")  # 513: not an integer image id: skipped
  ann(image_id=2, bbox="DROP")  # 514: skipped (malformed bbox)
  ann(image_id=2)  # 515: valid, image 2
  data = {"images": images, "annotations": anns,
          "categories": [{"id": 3, "name": "thing"}, {"id": 17, "name": "other"}]}
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(data))
  return d, path, tmp_path / "out"


def test_malformed_records_are_skipped_and_the_ground_truth_is_what_was_kept(malformed_dataset,
                                                                               capsys):
  images, ann_path, out = malformed_dataset
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out), "--shards", "2", "--workers", "1"]) == 0
  err = capsys.readouterr().err
  assert "Traceback" not in err
  meta = json.loads((out / "meta.json").read_text())
  s = meta["summary"]
  assert s["images written"] == 4 and s["instances written"] == 8
  assert s["problems"] == {"image": 6, "annotation": 2, "area": 1, "category": 1,
                           "segmentation": 4, "bbox": 1}
  log = (out / "problems.txt").read_text()
  for needle in ("'id': '5'", "fits in int32", "file_name None is not a file name",
                 "width None is not a positive integer", "id 1 repeats an earlier image's",
                 "1.png annotation 502: area 'big' is not a non-negative number",
                 "1.png annotation 504: category_id [3] is not in categories",
                 "1.png annotation 505: RLE size 48 is not [height, width]",
                 "1.png annotation 509: polygon coordinates are not all finite",
                 "1.png annotation 510: polygon coordinates lie more than 4 image sides away",
                 "1.png annotation 511: the mask is empty",
                 "1.png annotation 512: iscrowd 7 is not 0 or 1",
                 "1 annotations are not objects with an integer image_id",
                 "2.png annotation 514: malformed bbox None"):
    assert needle in log, needle
  recs = {int(r["image_id"]): r for r in _records(out)}
  assert sorted(recs) == [1, 2, 3, 4]
  assert recs[1]["keypoints"].numpy().shape == (7, 0, 3)  # no keypoint category
  np.testing.assert_allclose(recs[1]["areas"].numpy(), [100] * 7)  # given, or the 10x10 mask's

  # Evaluation's ground truth: the written images and kept annotations, completed.
  gt = json.loads((out / meta["ground_truth"]).read_text())
  assert sorted(i["id"] for i in gt["images"]) == [1, 2, 3, 4]
  anns = gt["annotations"]
  assert [a["id"] for a in anns] == [500, 501, 502, 503, 506, 516, 517, 515]
  assert all(a["iscrowd"] == 0 and a["area"] == 100 for a in anns)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO(str(out / meta["ground_truth"]))
  for a in anns:  # what COCOeval's segm evaluation does with each
    assert coco_gt.annToMask(a).sum() == 100


@pytest.mark.parametrize("categories,message", [
    ([{"id": "3", "name": "a"}], "id '3' of"),
    ([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}], "id 3 appears more than once"),
])
def test_bad_categories_fail_with_a_message(malformed_dataset, capsys, categories, message):
  images, ann_path, out = malformed_dataset
  data = json.loads(ann_path.read_text())
  data["categories"] = categories
  ann_path.write_text(json.dumps(data))
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out)]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


def test_a_dead_worker_fails_with_a_message(malformed_dataset, monkeypatch, capsys):
  """A worker killed mid-run (e.g. for memory) ends the conversion with a message, not a hang."""
  import concurrent.futures

  class DyingPool(concurrent.futures.ThreadPoolExecutor):
    def __init__(self, workers, mp_context=None):
      super().__init__(workers)

    def map(self, fn, *iterables, chunksize=1):
      def results():
        yield fn(next(iter(iterables[0])))
        raise concurrent.futures.process.BrokenProcessPool("a child process terminated")
      return results()

  monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", DyingPool)
  images, ann_path, out = malformed_dataset
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out), "--workers", "1"]) == 2
  err = capsys.readouterr().err
  assert "a conversion worker died (out of memory?) after 1 of 4 images" in err
  assert not (out / "index.json").exists()


def test_a_split_without_any_segmentation_is_box_only(malformed_dataset):
  """A detection dataset (boxes, no segmentation anywhere): instances kept with empty masks,
  meta.json says has_masks false; a split with masks skips the odd box-only annotation."""
  images, ann_path, out = malformed_dataset
  data = json.loads(ann_path.read_text())
  anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 20]},
          {"id": 2, "image_id": 2, "category_id": 17, "bbox": [1, 2, 3, 4], "segmentation": [],
           "iscrowd": 1, "area": 7}]
  ann_path.write_text(json.dumps(dict(data, annotations=anns)))
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out), "--workers", "1"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["has_masks"] is False and meta["summary"]["instances written"] == 2
  assert "box-only split" in (out / "problems.txt").read_text()
  recs = {int(r["image_id"]): r for r in _records(out)}
  np.testing.assert_allclose(recs[1]["boxes"].numpy(), [[5, 5, 15, 25]])
  assert recs[2]["is_crowd"].numpy().tolist() == [True]
  for r in (recs[1], recs[2]):
    png = tf.io.decode_png(r["mask_png"][0]).numpy()
    assert png.size > 0 and png.max() == 0
  gt = json.loads((out / meta["ground_truth"]).read_text())["annotations"]
  assert [(a["iscrowd"], a["area"]) for a in gt] == [(0, 200.0), (1, 7)]

  anns.append({"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10],
               "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]})
  ann_path.write_text(json.dumps(dict(data, annotations=anns)))
  assert coco.main(["--images", str(images), "--annotations", str(ann_path),
                    "--output", str(out), "--workers", "1"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["has_masks"] is True and meta["summary"]["instances written"] == 1
  assert meta["summary"]["problems"] == {"image": 6, "segmentation": 2}  # 6: the fixture's
