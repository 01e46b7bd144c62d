"""The converted split's format: schema (write and parse), framing, reader, batch spec."""

import hashlib
import os
import struct

import jax
import numpy as np
import pytest
import tensorflow as tf

from mrcnn_jax import storage
from mrcnn_jax.data import input_pipeline, records
from mrcnn_jax.data.records import RecordFile
from tests.data.conftest import data_config

# One image, two instances, two keypoints each, by hand.
RECORD = {
    "image": b"not decoded here", "height": 20, "width": 30,
    "boxes": np.asarray([[1.5, 2.0, 11.0, 9.25], [0.0, 0.0, 30.0, 20.0]], np.float32),
    "classes": np.asarray([4, 0]), "is_crowd": np.asarray([0, 1]),
    "areas": np.asarray([40.5, 600.0], np.float32), "ann_ids": np.asarray([7, 8]),
    "keypoints": np.asarray([[[3, 4, 2], [0, 0, 0]], [[5, 6, 1], [7, 8, 2]]], np.float32),
    "mask_png": [b"png-a", b"png-b"],
    "mask_window": np.asarray([[1, 2, 10, 8], [0, 0, 30, 20]]),
}
# sha256 of to_example(12, "a.jpg", RECORD): the bytes a converted split holds. A
# change here changes the format every converted split is written in.
GOLDEN_SHA256 = "dccc30004ecf13eac6087835e7c9831114fa6606035bbf88b4075ac8d097abaf"


def test_example_bytes_are_pinned_and_reproducible():
  serialized = records.to_example(12, "a.jpg", RECORD)
  assert serialized == records.to_example(12, "a.jpg", RECORD)
  assert hashlib.sha256(serialized).hexdigest() == GOLDEN_SHA256
  # Each stored field, read back with protobuf (independent of ``parse``).
  feature = tf.train.Example.FromString(serialized).features.feature
  assert feature["image/filename"].bytes_list.value == [b"a.jpg"]
  assert feature["objects/id"].int64_list.value == [7, 8]
  assert feature["objects/bbox"].float_list.value == [1.5, 2.0, 11.0, 9.25, 0, 0, 30, 20]


def test_parse_reads_what_to_example_writes():
  ex = records.parse(tf.constant(records.to_example(12, "a.jpg", RECORD)), num_keypoints=2)
  assert ex["encoded"].numpy() == b"not decoded here" and int(ex["image_id"]) == 12
  assert ex["original_size"].numpy().tolist() == [20, 30]
  np.testing.assert_array_equal(ex["boxes"], RECORD["boxes"])
  assert ex["classes"].numpy().tolist() == [4, 0]
  assert ex["is_crowd"].numpy().tolist() == [False, True]
  # Labelled keypoints move to pixel centres (+0.5); unlabelled ones stay 0.
  np.testing.assert_array_equal(ex["keypoints"], [[[3.5, 4.5, 2], [0, 0, 0]],
                                                  [[5.5, 6.5, 1], [7.5, 8.5, 2]]])
  assert ex["mask_png"].numpy().tolist() == [b"png-a", b"png-b"]
  np.testing.assert_array_equal(ex["mask_window"], RECORD["mask_window"])


def test_parse_of_an_image_without_instances():
  empty = dict(RECORD, boxes=np.zeros((0, 4)), classes=[], is_crowd=[], areas=[], ann_ids=[],
               keypoints=np.zeros((0, 2, 3)), mask_png=[], mask_window=np.zeros((0, 4)))
  ex = records.parse(tf.constant(records.to_example(1, "b.png", empty)), num_keypoints=2)
  assert ex["boxes"].shape == (0, 4) and ex["keypoints"].shape == (0, 2, 3)


def test_framing_and_masked_crc_agree_with_tensorflows_writer(tmp_path):
  """Our framing arithmetic reads what tf.io.TFRecordWriter wrote: the length, its masked
  CRC32C and the payload's, at the offsets the converter's index records."""
  payloads = [b"x" * 5, records.to_example(3, "c.jpg", RECORD)]
  path = str(tmp_path / "shard.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for p in payloads:
      writer.write(p)
  data, offset = open(path, "rb").read(), 0
  for p in payloads:
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    assert length == len(p)
    assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == records.masked_crc(
        data[offset:offset + 8])
    assert data[offset + 12:offset + 12 + length] == p
    assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == (
        records.masked_crc(p))
    offset += length + records.RECORD_OVERHEAD
  assert offset == len(data)


def test_record_files_close_their_shards(shapes_dataset):
  _, tf_dir = shapes_dataset
  open_fds = lambda: len(os.listdir("/proc/self/fd"))
  before = open_fds()
  for _ in range(5):  # the train and evaluate CLIs read a split's meta like this
    assert RecordFile(str(tf_dir / "train")).meta["coco_ids"]
  assert open_fds() == before
  split = RecordFile(str(tf_dir / "train"))
  assert split.read(0) and open_fds() > before
  split.close()
  assert open_fds() == before
  with pytest.raises(ValueError, match="closed"):
    split.read(0)


def test_ground_truth_is_read_once(shapes_dataset, monkeypatch):
  """Naming records, choosing canvases and evaluation share one read of ground_truth.json."""
  _, tf_dir = shapes_dataset
  split = RecordFile(str(tf_dir / "val"))
  reads = []
  real = storage.read_json
  monkeypatch.setattr(storage, "read_json", lambda path: reads.append(path) or real(path))
  gt = split.ground_truth()
  assert "image id" in split.describe(0, "a problem") and split.describe(1, "x")
  split.image_sizes = None  # an older conversion: canvases read the sizes from the ground truth
  config = data_config(tf_dir, canvas_size=(), canvas_sizes=((96, 128), (128, 96)))
  assert input_pipeline.num_eval_steps(config, records=split) >= 1
  assert split.ground_truth() is gt
  assert reads == [str(tf_dir / "val" / records.GROUND_TRUTH)]
  names = {im["id"]: im["file_name"] for im in gt["images"]}
  assert f"file {names[int(split.image_id[0])]}:" in split.describe(0, "a problem")


def test_a_missing_split_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"not a converted split \(.*index.json missing"):
    RecordFile(str(tmp_path / "nothing"))


@pytest.mark.parametrize("canvas,keypoints", [((128, 128), 3), ((96, 128), 0)])
def test_batch_spec_is_what_the_pipeline_yields(shapes_dataset, canvas, keypoints):
  _, tf_dir = shapes_dataset
  config = data_config(tf_dir, canvas_size=canvas)
  spec = records.batch_spec(3, canvas, config.data.max_instances, config.data.mask_size,
                            keypoints)
  as_tuples = lambda tree, f: jax.tree.map(f, tree)
  want = as_tuples(spec, lambda s: (s.shape, s.dtype))
  if keypoints:  # the shapes split has 3 keypoints per instance
    ds = input_pipeline.make_dataset(config, "eval", batch_size=3)
    got = as_tuples(ds.element_spec, lambda s: (tuple(s.shape.as_list()),
                                                np.dtype(s.dtype.as_numpy_dtype)))
    assert got == want
  batch = records.placeholder_batch(spec)
  assert as_tuples(batch, lambda x: (x.shape, x.dtype)) == want
  assert batch["image_info"]["image_size"].tolist() == [list(canvas)] * 3
  assert batch["image_info"]["valid"].all() and not batch["gt_valid"].any()
