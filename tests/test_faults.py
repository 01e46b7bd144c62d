"""Faults through the real CLIs: corrupt checkpoints and records, a full disk, an
unwritable workdir. Each ends in one named error line (no traceback), a documented
exit code, and every earlier checkpoint still restores.

A full or read-only filesystem is a small tmpfs where this process may mount one
(root, as CI runs); elsewhere (or with MRCNN_TEST_NO_MOUNT=1) the fault is
injected into the same CLI code path.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from mrcnn_jax import checkpointing
from tests.test_train import ROOT, cli_flags, dataset, run_cli  # noqa: F401  pylint: disable=unused-import

pytestmark = pytest.mark.slow
TRAIN = ["-m", "mrcnn_jax.train", "--config=configs/shapes.py:tiny"]


def run(args, flags, timeout=600):
  """A CLI (``python <args> <flags>``) to the end: (exit code, stdout, stderr)."""
  proc = subprocess.run([sys.executable, *args, *flags], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  return proc.returncode, proc.stdout, proc.stderr


def assert_named_error(code, err, expected_code, *names):
  """The exit code, one error line holding every name, and no traceback."""
  assert code == expected_code, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if all(n in line for n in names)]
  assert len(lines) == 1, (names, err[-3000:])
  return lines[0]


def assert_restores(workdir, steps):
  """Each checkpoint step still restores (its parameters are finite)."""
  for step in steps:
    variables = checkpointing.load_variables(os.path.join(workdir, "checkpoints", str(step)))
    assert all(np.all(np.isfinite(x)) for x in _leaves(variables["params"])), step


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):  # noqa: F811
  """A workdir trained 6 steps, checkpoints at 2, 4, 6 (copy it before changing it)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  code, _, err = run(TRAIN, [f"--workdir={workdir}", *flags(dataset, total_steps=6)])
  assert code == 0, err[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  return workdir


def flags(dataset, **more):  # noqa: F811
  return cli_flags(dataset, **{"train.checkpoint_every": 2, "train.keep_checkpoints": 3,
                               **more})


def _big_files(step_dir, over=20_000):
  return [os.path.join(d, f) for d, _, files in os.walk(step_dir) for f in files
          if os.path.getsize(os.path.join(d, f)) > over]


def test_truncated_or_missing_checkpoint_files(dataset, trained, tmp_path):  # noqa: F811
  """Truncated latest: moved aside, named, resumed from the one before. Every one bad:
  exit 2 naming each, nothing moved. evaluate / predict on a bad one: exit 2, named."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  for path in _big_files(os.path.join(ckpt, "6")):  # a torn copy
    os.truncate(path, 1000)
  code, _, err = run(TRAIN, [f"--workdir={workdir}", *flags(dataset, total_steps=8)])
  assert code == 0, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  line = [x for x in err.splitlines() if "checkpoint at step 6 (" in x and "is unusable" in x]
  assert len(line) == 1 and os.path.join(ckpt, "6") in line[0] and "6.corrupt" in line[0], err
  assert "resuming from step 4" in line[0]
  # Nothing deleted but by the keep-3 policy (step 2 gave way to 8).
  assert sorted(os.listdir(ckpt)) == ["4", "6", "6.corrupt", "8"]
  events = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))
            if "corrupt_checkpoint" in x]
  assert [(e["step"], e["corrupt_step"]) for e in events] == [(4, 6)], events
  assert_restores(workdir, [4, 6, 8])

  # Missing files in every checkpoint: none restores; each is named, none moved.
  for step in (4, 6, 8):
    os.remove(os.path.join(ckpt, str(step), "default", "_METADATA"))
  code, _, err = run(TRAIN, [f"--workdir={workdir}", *flags(dataset, total_steps=10)])
  line = assert_named_error(code, err, 2, "no checkpoint can be restored")
  for step in (4, 6, 8):
    assert f"step {step} ({os.path.join(ckpt, str(step))})" in line
  assert sorted(os.listdir(ckpt)) == ["4", "6", "6.corrupt", "8"]

  config = ["--config=configs/shapes.py:tiny", *flags(dataset)]
  code, _, err = run(["-m", "mrcnn_jax.evaluate"], [f"--workdir={workdir}", *config])
  assert_named_error(code, err, 2, os.path.join(ckpt, "8"), "cannot be read")
  code, _, err = run(["-m", "mrcnn_jax.predict"],
                     [f"--checkpoint={os.path.join(ckpt, '4')}", f"--output={tmp_path / 'p'}",
                      f"--input={dataset / 'raw' / 'val'}", *config])
  assert_named_error(code, err, 2, os.path.join(ckpt, "4"), "cannot be read")


def _rewrite_split(src, dst, record, mutate):
  """A copy of split ``src`` at ``dst`` with record ``record``'s Example changed by
  ``mutate`` and written with valid framing (shards and index.json rebuilt)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.data.records import RecordFile  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  records = RecordFile(src)
  index = json.load(open(os.path.join(src, "index.json")))
  writers = [tf.io.TFRecordWriter(os.path.join(dst, s)) for s in index["shards"]]
  offsets = [0] * len(writers)
  for i, row in enumerate(index["records"]):
    data = records.read(i)
    if i == record:
      example = tf.train.Example.FromString(data)
      mutate(example.features.feature)
      data = example.SerializeToString()
    writers[row[0]].write(data)
    row[1], row[2] = offsets[row[0]], len(data)
    offsets[row[0]] += len(data) + 16
  for w in writers:
    w.close()
  json.dump(index, open(os.path.join(dst, "index.json"), "w"))


def test_corrupt_records_are_named_then_fail_or_skip(dataset, tmp_path):  # noqa: F811
  """A flipped byte (CRC) and a CRC-valid undecodable JPEG: --verify lists both; training
  stops with exit 2 naming the record; on_corrupt=skip logs, counts and trains on."""
  from mrcnn_jax.data.records import RecordFile  # pylint: disable=g-import-not-at-top
  split = tmp_path / "train"
  _rewrite_split(dataset / "tf" / "train", split, 3,
                 lambda f: f["image/encoded"].bytes_list.value.__setitem__(
                     0, b"\xff\xd8\xff\xe0" + bytes(200)))
  records = RecordFile(str(split))
  shard, offset, length = (int(records.shard[5]), int(records.offset[5]),
                           int(records.length[5]))
  path = os.path.join(split, records.shard_names[shard])
  with open(path, "r+b") as f:  # one byte in the middle of record 5's data
    f.seek(offset + 12 + length // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  names = {i: f"image id {int(records.image_id[i])}" for i in (3, 5)}

  code, out, err = run(["-m", "mrcnn_jax.data.coco"], ["--verify", f"--output={split}"])
  assert code == 2, out + err
  bad = [x for x in out.splitlines() if x.startswith("bad record:")]
  assert len(bad) == 2 and "24 records, 2 bad" in out, out
  assert names[3] in bad[0] and "record 1 (record 3 of the split" in bad[0]
  assert "undecodable image" in bad[0]
  assert names[5] in bad[1] and "data CRC mismatch" in bad[1]
  assert records.shard_names[shard] in bad[1] and ".jpg" in bad[1]

  workdir = str(tmp_path / "fail")
  base = [*flags(dataset, total_steps=3), f"--config.data.train_dir={split}"]
  code, _, err = run(TRAIN, [f"--workdir={workdir}", *base])
  line = assert_named_error(code, err, 2, "corrupt record in", str(split))
  assert names[3] in line or names[5] in line, line

  workdir = str(tmp_path / "skip")
  code, _, err = run(TRAIN, [f"--workdir={workdir}", *base, "--config.data.on_corrupt=skip"])
  assert code == 0 and "Traceback" not in err, err[-3000:]
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  skipped = {e["record"].split("image id ")[1].split(",")[0] for e in lines
             if e.get("event") == "corrupt_record_skipped"}
  assert skipped == {names[3][9:], names[5][9:]}, lines
  counts = [e["train/corrupt_records_skipped"] for e in lines
            if "train/corrupt_records_skipped" in e]
  # Skipped as the run met them (the pipeline had read ahead into the next epoch).
  events = sum(e.get("event") == "corrupt_record_skipped" for e in lines)
  assert counts[-1] == events >= 2, lines
  assert all(np.isfinite(e["train/loss"]) for e in lines if "train/loss" in e)


@contextlib.contextmanager
def _tmpfs(path, options):
  """A tmpfs mounted at ``path`` (yields True), or nothing (False) where not permitted
  or MRCNN_TEST_NO_MOUNT=1 (to run the injected faults where one can mount)."""
  os.makedirs(path, exist_ok=True)
  mounted = os.geteuid() == 0 and os.environ.get("MRCNN_TEST_NO_MOUNT") != "1" and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
      capture_output=True).returncode == 0
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(path)], check=True)


# Where no tmpfs can be mounted: the same CLI, its second save failing as a full disk does.
ENOSPC = textwrap.dedent("""
    import errno, sys, orbax.checkpoint as ocp
    real = ocp.CheckpointManager.save
    def save(self, step, *args, **kwargs):
      if step > 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
      return real(self, step, *args, **kwargs)
    ocp.CheckpointManager.save = save
    sys.argv = ["train", *sys.argv[1:]]
    import runpy
    runpy.run_module("mrcnn_jax.train", run_name="__main__")
""")


def test_full_filesystem_stops_at_the_failed_save(dataset, tmp_path):  # noqa: F811
  """Space for one checkpoint: the second save fails; one line names its step, path and
  cause; exit 4; the first checkpoint restores."""
  disk = tmp_path / "disk"
  with _tmpfs(disk, "size=4m") as mounted:
    workdir = str(disk / "w")
    args = TRAIN if mounted else ["-c", ENOSPC, "--config=configs/shapes.py:tiny"]
    code, _, err = run(args, [f"--workdir={workdir}", *flags(dataset, total_steps=6)])
    line = assert_named_error(code, err, 4, "train: checkpoint save at step 4 failed",
                              os.path.join(workdir, "checkpoints", "4"))
    assert "No space left on device" in line or "RESOURCE_EXHAUSTED" in line, line
    assert checkpointing.Checkpointer(workdir).latest_step() == 2
    assert_restores(workdir, [2])


def test_checkpoint_failures_warn_trains_on(dataset, tmp_path, monkeypatch):  # noqa: F811
  """train.checkpoint_failures=warn: the failed save (step 2) is logged and recorded
  in metrics.jsonl; the run goes on and its later saves land."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mrcnn_jax import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import make_config  # pylint: disable=g-import-not-at-top
  real = ocp.StandardCheckpointHandler.async_save

  async def failing(self, directory, *args, **kwargs):
    if "/2." in str(directory):  # step 2's temporary directory
      raise OSError(28, "No space left on device", str(directory))
    return await real(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
  workdir = str(tmp_path / "w")
  config = make_config(dataset, total_steps=6, **{"train.checkpoint_every": 2,
                                                  "train.checkpoint_failures": "warn"})
  train.train_and_evaluate(config, workdir)
  events = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))
            if "checkpoint_save_failed" in x]
  assert len(events) == 1, events
  assert "checkpoint save at step 2 failed" in events[0]["reason"], events
  assert "No space left on device" in events[0]["reason"], events
  # The failed save's partial directory stays until the next start cleans it up.
  names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert names == ["2.orbax-checkpoint-tmp", "4", "6"], names
  assert_restores(workdir, [4, 6])


def test_unwritable_workdir_is_named(dataset, trained, tmp_path):  # noqa: F811
  """A read-only workdir holding checkpoints: exit 2 naming it; they still restore."""
  workdir = tmp_path / "ro"
  with _tmpfs(workdir, "size=16m") as mounted:
    shutil.copytree(trained, workdir, dirs_exist_ok=True)
    if mounted:
      subprocess.run(["mount", "-o", "remount,ro", str(workdir)], check=True)
      args = TRAIN
    else:  # the same refusal as a read-only filesystem gives
      args = ["-c", textwrap.dedent("""
          import builtins, errno, sys, runpy
          real = builtins.open
          def refuse(path, mode="r", *a, **k):
            if "w" in mode and str(path).startswith(sys.argv[2].split("=", 1)[1]):
              raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, mode, *a, **k)
          builtins.open = refuse
          sys.argv = ["train", *sys.argv[1:]]
          runpy.run_module("mrcnn_jax.train", run_name="__main__")
      """), "--config=configs/shapes.py:tiny"]
    code, _, err = run(args, [f"--workdir={workdir}", *flags(dataset, total_steps=8)])
    assert_named_error(code, err, 2, f"--workdir {workdir}", "Read-only file system")
    assert_restores(str(workdir), [2, 4, 6])
