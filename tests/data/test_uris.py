"""Converted splits on any filesystem: converted to and read from ram:// (standing in for
a bucket) and file:// URIs; record reads retried, then named."""

import uuid

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_jax import storage
from mrcnn_jax.data import coco, input_pipeline
from mrcnn_jax.data.input_pipeline import make_dataset
from mrcnn_jax.data.records import RecordFile, UnreadableRecordError
from tests.data.conftest import data_config


def _batches(config, split, steps=None, **kwargs):
  data = make_dataset(config, split, **kwargs).as_numpy_iterator()
  return [next(data) for _ in range(steps)] if steps else list(data)


def _assert_same(a, b):
  for x, y in zip(a, b):
    tf.nest.map_structure(np.testing.assert_array_equal, x, y)
  assert len(a) == len(b)


@pytest.fixture(scope="module")
def remote_split(shapes_dataset):
  """The val split converted straight into ram://, and the local conversion."""
  raw, tf_dir = shapes_dataset
  root = f"ram://{uuid.uuid4().hex}/bucket/tf"
  coco.convert(str(raw / "val"), str(raw / "annotations" / "instances_val.json"),
               storage.join(root, "val"), num_shards=3, workers=1)
  return root, tf_dir


def test_converter_writes_and_pipeline_reads_a_ram_split(remote_split):
  root, tf_dir = remote_split
  assert sorted(storage.listdir(storage.join(root, "val"))) == sorted(
      p.name for p in (tf_dir / "val").iterdir())
  local = RecordFile(str(tf_dir / "val"))
  remote = RecordFile(storage.join(root, "val"))
  assert len(remote) == len(local)
  for i in range(len(local)):
    assert remote.read(i) == local.read(i)
  config = data_config(tf_dir)
  ram = data_config(tf_dir, eval_dir=storage.join(root, "val"))
  _assert_same(_batches(ram, "eval"), _batches(config, "eval"))


def test_pipeline_reads_file_uris(shapes_dataset):
  _, tf_dir = shapes_dataset
  config = data_config(tf_dir)
  uri = data_config(tf_dir, train_dir=f"file://{tf_dir}/train", eval_dir=f"file://{tf_dir}/val")
  _assert_same(_batches(uri, "train", steps=2), _batches(config, "train", steps=2))
  _assert_same(_batches(uri, "eval"), _batches(config, "eval"))


def _failing_reads(monkeypatch, fails_per_offset, offsets=None):
  """RangeReader.read_once raising UnavailableError ``fails_per_offset`` times per offset
  (for ``offsets`` only, when given), as a bucket's transient 503s do."""
  real = storage.RangeReader.read_once
  seen = {}

  def read_once(self, offset, length):
    key = (self.path, offset)
    if offsets is None or offset in offsets:
      seen[key] = seen.get(key, 0) + 1
      if seen[key] <= fails_per_offset:
        raise tf.errors.UnavailableError(None, None, "503 Service Unavailable")
    return real(self, offset, length)

  monkeypatch.setattr(storage.RangeReader, "read_once", read_once)
  monkeypatch.setattr(storage, "RETRY_DELAY_S", 0.0)
  return seen


def test_transient_read_errors_are_retried(remote_split, monkeypatch):
  root, tf_dir = remote_split
  config = data_config(tf_dir, eval_dir=storage.join(root, "val"))
  expected = _batches(config, "eval")
  seen = _failing_reads(monkeypatch, storage.READ_TRIES - 1)
  faults = input_pipeline.RecordFaults()
  _assert_same(_batches(config, "eval", faults=faults), expected)
  # every record failed READ_TRIES - 1 times, then read (record 0 twice: the eval fill)
  assert faults.new() == [] and seen and min(seen.values()) == storage.READ_TRIES


@pytest.mark.parametrize("on_corrupt", ["fail", "skip"])
def test_a_record_that_cannot_be_read_is_named_never_skipped(remote_split, monkeypatch,
                                                             on_corrupt):
  root, tf_dir = remote_split
  split = storage.join(root, "val")
  records = RecordFile(split)
  bad = 4
  _failing_reads(monkeypatch, 10 ** 9, offsets={int(records.offset[bad])})
  with pytest.raises(UnreadableRecordError,
                     match=rf"{split}: shard \S+ record \d+ \(record {bad} of the split.*"
                           rf"image id {int(records.image_id[bad])}, .*unreadable: .*"
                           rf"read failed {storage.READ_TRIES} times \(UnavailableError"):
    records.read(bad)
  config = data_config(tf_dir, eval_dir=split, on_corrupt=on_corrupt)
  faults = input_pipeline.RecordFaults()
  with pytest.raises(UnreadableRecordError, match=f"record {bad} of the split"):
    for _ in make_dataset(config, "eval", faults=faults).as_numpy_iterator():
      faults.new()  # what train and evaluate do after each batch


def test_a_missing_or_unreachable_split_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a converted split"):
    RecordFile(f"ram://{uuid.uuid4().hex}/nothing")
  with pytest.raises(storage.UnreachableError, match="nosuchfs://bucket/val: cannot read"):
    RecordFile("nosuchfs://bucket/val")
