"""storage: local paths, file:// and TF's ram:// filesystem (standing in for a bucket)."""

import json
import uuid

import pytest
import tensorflow as tf

from configs import shapes
from mrcnn_jax import checkpointing, evaluate, storage, train


def _roots(tmp_path):
  return [str(tmp_path / "plain"), f"file://{tmp_path}/uri", f"ram://{uuid.uuid4().hex}/bucket"]


def test_files_round_trip_on_every_filesystem(tmp_path):
  for root in _roots(tmp_path):
    storage.makedirs(storage.join(root, "a", "b"))
    storage.write_json(storage.join(root, "a", "x.json"), {"k": [1, 2, 3]})
    storage.write_json(storage.join(root, "a", "x.json"), {"k": [1, 2]})  # replaced whole
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": [1, 2]}
    assert sorted(storage.listdir(storage.join(root, "a"))) == ["b", "x.json"], root
    assert storage.isdir(storage.join(root, "a", "b"))
    assert not storage.isdir(storage.join(root, "a", "x.json"))
    storage.rename(storage.join(root, "a", "x.json"), storage.join(root, "a", "y.json"))
    assert not storage.exists(storage.join(root, "a", "x.json"))
    assert storage.exists(storage.join(root, "a", "y.json"))
    assert storage.basename(storage.join(root, "a", "b") + "/") == "b"
  # file:// is the local file system
  assert (tmp_path / "uri" / "a" / "y.json").exists()
  assert storage.abspath(f"file://{tmp_path}/uri") == str(tmp_path / "uri")
  assert storage.abspath("ram://b/x") == "ram://b/x"


def test_a_missing_file_is_file_not_found_on_every_filesystem(tmp_path):
  """A bucket's tf.errors.NotFoundError reaches callers as FileNotFoundError naming the path."""
  for root in _roots(tmp_path):
    storage.makedirs(root)
    path = storage.join(root, "absent.json")
    for read in (storage.read_bytes, storage.read_json):
      with pytest.raises(FileNotFoundError) as e:
        read(path)
      assert e.value.filename == path, root
    storage.write_text(path, '{"a": 1}')
    assert storage.read_bytes(path) == b'{"a": 1}' and storage.read_json(path) == {"a": 1}


def test_append_file_keeps_what_was_there(tmp_path):
  for root in _roots(tmp_path):
    storage.makedirs(root)
    path = storage.join(root, "metrics.jsonl")
    for run in range(2):  # a resumed run appends to the first run's lines
      f = storage.AppendFile(path)
      f.write(f"run {run}\n")
      f.flush()
      if run == 0:  # flushed lines are in the file before it is closed
        with storage.open_file(path) as g:
          assert g.read() == "run 0\n", root
      f.close()
    with storage.open_file(path) as g:
      assert g.read() == "run 0\nrun 1\n", root


def test_range_reader_reads_by_offset(tmp_path):
  data = bytes(range(256)) * 4
  for root in _roots(tmp_path):
    storage.makedirs(root)
    with storage.open_file(storage.join(root, "f.bin"), "wb") as f:
      f.write(data)
    reader = storage.RangeReader(storage.join(root, "f.bin"))
    assert reader.read_once(300, 10) == data[300:310]
    assert reader.read_once(0, 3) == data[:3]
    assert reader.read_once(1020, 10) == data[1020:]  # short only at the end
    reader.close()
    with pytest.raises(ValueError, match="closed"):
      reader.read_once(0, 1)
  with pytest.raises(FileNotFoundError, match="nothing.bin"):
    storage.RangeReader(f"ram://{uuid.uuid4().hex}/nothing.bin")


def test_transient_errors_are_retried_then_named():
  calls = []

  def flaky(fails, error):
    def read():
      calls.append(1)
      if len(calls) <= fails:
        raise error
      return b"ok"
    return read

  assert storage.retried(flaky(2, tf.errors.UnavailableError(None, None, "503")), "f",
                         delay=0) == b"ok"
  assert len(calls) == 3
  calls.clear()
  with pytest.raises(storage.ReadError, match=r"gs://b/shard-3 at 99: read failed 4 times "
                                              r"\(ConnectionResetError"):
    storage.retried(flaky(10, ConnectionResetError("reset")), "gs://b/shard-3 at 99", delay=0)
  assert len(calls) == 4
  calls.clear()
  with pytest.raises(FileNotFoundError):  # not transient: at once
    storage.retried(flaky(10, FileNotFoundError("gone")), "f", delay=0)
  assert len(calls) == 1


def test_unreachable_filesystem_is_named(tmp_path):
  with pytest.raises(storage.UnreachableError,
                     match=r"--workdir nosuchfs://bucket/run: cannot be reached "
                           r"\(UnimplementedError"):
    storage.check_reachable("nosuchfs://bucket/run", "--workdir")
  storage.check_reachable(str(tmp_path / "not" / "yet"), "--workdir")  # missing is fine
  storage.check_reachable(f"ram://{uuid.uuid4().hex}/x", "--workdir")


def test_a_workdir_orbax_cannot_reach_fails_before_training(tmp_path):
  """Orbax opens paths through etils epath, which has no ram:// (TF's in-memory
  filesystem): the workdir check names it up front instead of a KeyError at the first
  save. Local paths and file:// pass."""
  workdir = f"ram://{uuid.uuid4().hex}/run"
  with pytest.raises(KeyError, match="ram://"):  # what orbax itself does with it
    checkpointing.Checkpointer(workdir)
  with pytest.raises(storage.UnreachableError,
                     match=r"--workdir ram://.*/run: checkpoints are written by orbax, which "
                           r"cannot reach ram://"):
    storage.check_checkpoint_reachable(workdir, "--workdir")
  with pytest.raises(train.SetupError, match="cannot reach ram://"):
    train._check_paths(shapes.get_config("tiny"), workdir)  # pylint: disable=protected-access
  for path in (str(tmp_path / "run"), f"file://{tmp_path}/run2"):
    storage.check_checkpoint_reachable(path, "--workdir")


def test_workdir_files_on_a_bucket_like_filesystem():
  """metrics.jsonl, TensorBoard and eval_metrics.json on ram://."""
  workdir = f"ram://{uuid.uuid4().hex}/run"
  storage.makedirs(workdir)
  logger = train.MetricLogger(workdir, enabled=True)
  logger.write(10, {"loss": 1.5})
  logger.event(10, {"event": "corrupt_checkpoint"})
  logger.write(20, {"eval/bbox/AP": float("nan")})
  logger.close()
  with storage.open_file(storage.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f.read().splitlines()]
  assert lines == [{"step": 10, "loss": 1.5}, {"step": 10, "event": "corrupt_checkpoint"},
                   {"step": 20, "eval/bbox/AP": None}]
  assert storage.listdir(storage.join(workdir, "tensorboard"))
  path = evaluate.write_metrics(workdir, {"bbox/AP": 0.25, "segm/APs": float("nan")}, 7)
  assert storage.read_json(path) == {"step": 7, "bbox/AP": 0.25, "segm/APs": None}
  evaluate.write_metrics(workdir, {"bbox/AP": 0.5}, 8)  # replaced whole
  assert storage.read_json(path) == {"step": 8, "bbox/AP": 0.5}
