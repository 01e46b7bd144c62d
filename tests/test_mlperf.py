"""MLPerf mode (mrcnn_jax/mlperf.py): mllog events, targets, and the compliance checker."""

import json
import os
import subprocess
import sys

import pytest

from configs import shapes
from mrcnn_jax import mlperf, optim, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(path):
  """The ``:::MLLOG {json}`` lines of an mllog file, as dicts."""
  with open(path) as f:
    return [json.loads(line.split(":::MLLOG", 1)[1]) for line in f if ":::MLLOG" in line]


def config_for(dataset=None, **mlperf_overrides):
  config = shapes.get_config("tiny")
  config.mlperf.update(enabled=True, **mlperf_overrides)
  if dataset is not None:
    config.data.update(train_dir=str(dataset / "train"), eval_dir=str(dataset / "val"),
                       canvas_size=(64, 64))
    config.update(batch_size=8, eval_batch_size=8, total_steps=6)
    config.train.update(log_every=2, checkpoint_every=4, eval_every=0, progress=False)
    config.model.keypoint_head.enabled = False  # MLPerf scores boxes and masks: less to compile
  return config


def test_events_epochs_and_targets(tmp_path):
  """Epochs count images; the targets need both APs; an unreached run stops 'aborted'."""
  run = mlperf.MLPerfRun(config_for(target_bbox_ap=0.3, target_segm_ap=0.2), str(tmp_path),
                         enabled=True)
  run.hyperparameters(train_samples=16, eval_samples=4)
  assert run.eval_interval() == 2  # 16 images / batch 8
  assert run.epoch(2) == 1 and run.epoch(3) == 1.5
  run.run_start()
  run.eval_start(2)
  assert not run.eval_stop(2, {"bbox/AP": 0.35, "segm/AP": 0.1})
  assert run.eval_stop(2, {"bbox/AP": 0.3, "segm/AP": 0.2})
  assert run.run_stop(False, 2) >= 0
  run.close()
  events = read_log(tmp_path / "mlperf.log")
  keys = [e["key"] for e in events]
  assert keys[:2] == ["cache_clear", "init_start"]
  by_key = {e["key"]: e for e in events}
  assert by_key["opt_base_learning_rate"]["value"] == pytest.approx(2e-3)
  assert by_key["global_batch_size"]["value"] == 8
  assert by_key["eval_accuracy"]["value"] == {"BBOX": 0.3, "SEGM": 0.2}
  assert by_key["eval_accuracy"]["metadata"]["epoch_num"] == 1
  assert by_key["run_stop"]["metadata"]["status"] == "aborted"


def test_other_processes_write_nothing(tmp_path):
  run = mlperf.MLPerfRun(config_for(), str(tmp_path), enabled=False)
  run.run_start()
  run.close()
  assert not os.path.exists(tmp_path / "mlperf.log")


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="mlperf.division"):
    mlperf.check_config(config_for(division="closed-ish"))
  config = config_for()
  config.model.mask_head.enabled = False
  with pytest.raises(ValueError, match="model.mask_head.enabled"):
    mlperf.check_config(config)


def test_logged_schedule_is_the_optimisers(tmp_path):
  """opt_learning_rate_decay_steps are the decays the schedule makes within
  total_steps (the config's 60k/80k in a 70k run: only 60k), as optim applies them."""
  config = config_for()
  config.total_steps = 70000
  config.optim.update(schedule="step", decay_steps=(60000, 80000), decay_factor=0.1,
                      warmup_steps=1000)
  run = mlperf.MLPerfRun(config, str(tmp_path), enabled=True)
  run.hyperparameters(train_samples=16, eval_samples=4)
  run.close()
  by_key = {e["key"]: e["value"] for e in read_log(tmp_path / "mlperf.log")}
  assert by_key["opt_learning_rate_decay_steps"] == [60000]
  assert by_key["opt_learning_rate_warmup_steps"] == 1000
  lr = optim.learning_rate(config)
  base = by_key["opt_base_learning_rate"]
  assert float(lr(59999)) == pytest.approx(base) and float(lr(60000)) == pytest.approx(base * 0.1)
  assert float(lr(69999)) == pytest.approx(base * 0.1)


def test_eval_steps_is_refused():
  config = config_for()
  config.train.eval_steps = 2
  with pytest.raises(ValueError, match="train.eval_steps=2"):
    mlperf.check_config(config)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from tests.conftest import make_shapes_dataset  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("mlperf")
  make_shapes_dataset(root, train=16, val=4, size=64, seed=4, shards=1)
  return root / "tf"


@pytest.mark.slow
def test_tiny_run_stops_at_target_and_passes_the_compliance_checker(dataset, tmp_path):
  """Targets of 0 are reached at the first evaluation (epoch 1 = step 2 of 6): the run
  stops there with run_stop success, and the log passes MLPerf's checker (open division)."""
  workdir = tmp_path / "run"
  config = config_for(dataset, target_bbox_ap=0.0, target_segm_ap=0.0)
  train.train_and_evaluate(config, str(workdir))
  events = read_log(workdir / "mlperf.log")
  keys = [e["key"] for e in events]
  assert keys.index("init_stop") < keys.index("run_start") < keys.index("block_start")
  assert keys.count("eval_accuracy") == 1 and keys[-1] == "run_stop"
  assert events[-1]["metadata"]["status"] == "success"
  assert events[-1]["metadata"]["epoch_num"] == 1
  assert train.checkpointing.Checkpointer(str(workdir)).latest_step() == 2
  with open(workdir / "metrics.jsonl") as f:  # compiled once, inside init
    assert [r["train/step_compilations"] for r in map(json.loads, f)
            if "train/step_compilations" in r] == [1]
  proc = subprocess.run(
      [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
       "--ruleset", "3.1.0", "--log_output", str(tmp_path / "checker.log"),
       str(workdir / "mlperf.log")], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "SUCCESS" in proc.stdout + proc.stderr, (
      proc.stdout + proc.stderr)
