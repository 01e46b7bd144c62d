"""scripts/benchmark_eval.py and scripts/benchmark_convert.py on tiny settings: the JSON
layout and sane values (timings are never asserted beyond being positive)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_eval(tmp_path):
  out = tmp_path / "eval.json"
  assert _script("benchmark_eval").main(["--images=6", "--detections=12", "--workers=1",
                                         "--batch_size=4", f"--output={out}"]) == 0
  report = json.loads(out.read_text())
  assert report["images"] == 6 and report["detections"] == 12
  for side in ("ours", "baseline"):
    assert report[side]["total_s"] > 0 and report[side]["cocoeval_s"] > 0
  assert report["ours"]["total_s"] >= report["ours"]["cocoeval_s"]
  assert report["max_abs_metric_diff"] <= 1e-4
  assert 0 < report["metrics"]["segm/AP"] <= 1 and len(report["metrics"]) == 24


@pytest.mark.slow
def test_benchmark_convert(tmp_path):
  out = tmp_path / "convert.json"
  assert _script("benchmark_convert").main(["--images=4", "--workers=1", "--runs=1",
                                            f"--dataset={tmp_path / 'data'}",
                                            f"--output={out}"]) == 0
  report = json.loads(out.read_text())
  assert report["images"] == 4 and report["images_per_s"] > 0
  assert report["train2017_hours_here"] > report["train2017_hours_96_cores"] > 0
