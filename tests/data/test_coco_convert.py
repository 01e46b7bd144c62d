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
from mrcnn_jax.data.input_pipeline import RecordFile
from mrcnn_jax.data.transforms import parse


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
