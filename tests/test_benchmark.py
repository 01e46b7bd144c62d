"""scripts/benchmark.py end to end on a tiny setting: every section, JSON keys, sane values.

One run of the CLI in a subprocess: configs/shapes.py:tiny at a 64-pixel
canvas, made torchvision-compatible (ResNet-18 layout, frozen BN, no keypoint
head) so that --vs-torchvision runs too, with a one-point sweep. Timings are
never asserted, only that they are finite and positive.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from mrcnn_jax import xla_flags

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    with_torch = True
  except ImportError:
    with_torch = False
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"),
         "--config=configs/shapes.py:tiny", "--canvas=64", "--batch_size=2", "--steps=2",
         "--warmup=1", "--infer_batch=2", "--infer_steps=2", "--stage_repeats=1",
         "--peak_n=512", "--data_images=4", "--data_steps=2",
         "--sweep", "--sweep_canvas=64", "--sweep_rois=128", "--sweep_batch=2",
         "--sweep_steps=1", "--op_profile=20", f"--output={out}",
         "--config.model.backbone.depth=18", "--config.model.backbone.width=64",
         "--config.model.backbone.norm=frozen_bn", "--config.model.keypoint_head.enabled=False"]
  if with_torch:
    cmd.append("--vs-torchvision")
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "train step median" in proc.stderr  # the readable table
  return json.loads(out.read_text()), with_torch


def test_train_and_inference(result):
  r, _ = result
  t = r["train"]
  assert t["compilations"] == 1
  assert t["backend_compiles_during_timed_steps"] == 0
  for key in ("compile_s", "trace_lower_s", "xla_compile_s", "images_per_s", "gflop_per_step",
              "achieved_gflops", "utilisation", "fg_rois_per_image"):
    assert _positive(t[key]), key
  assert t["step_s"]["n"] == 2 and _positive(t["step_s"]["median"])
  assert all(math.isfinite(v) for v in t["losses"].values())
  i = r["inference"]
  assert i["compilations"] == 2  # batch 1 and --infer_batch
  assert _positive(i["latency_s_batch_1"]["median"]) and _positive(i["images_per_s_batch_2"])
  assert i["detections_per_image"] > 0  # the biased classifier keeps some
  assert _positive(r["peak"]["used_gflops"])
  assert r["settings"]["cpu"]["model"] and isinstance(r["settings"]["cpu"]["flags"], list)
  assert _positive(r["memory"]["host_peak_mib_end"])
  assert _positive(r["memory"]["xla_train_buffers"]["temp_size_mib"])
  child_env = dict(os.environ)  # the benchmark's, once its `import mrcnn_jax` added its flag
  xla_flags.prefer_xla_convolutions(child_env)
  assert r["settings"]["xla_flags"] == child_env.get("XLA_FLAGS", "")


def test_op_profile(result):
  """The step's most expensive XLA ops, most expensive first, traced back to model code."""
  ops = result[0]["op_profile"]
  assert 1 <= len(ops) <= 20
  assert all(_positive(o["ms"]) and 0 < o["share"] <= 1 and o["instruction"] and o["op"]
             for o in ops)
  assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
  # Not every op carries the model's names (what XLA adds itself reads e.g.
  # "[reverse f32[3,3,512,512]]", the optimiser's updates "select_n"), and
  # in the top 5 the timing decided whether one did; among 20 the forward
  # convolutions always do.
  assert any("MaskRCNN" in o["op"] for o in ops), ops


def test_stages_dtype_data_sweep(result):
  r, _ = result
  pieces = r["stages"]["pieces"]
  assert set(pieces) == {"backbone_fpn", "rpn_proposals", "targets_sampling", "roi_align",
                         "heads", "losses"}
  assert all(_positive(p["ms"]) and p["covers"] for p in pieces.values())
  d = r["dtype_check"]
  assert set(d["float32"]) == set(d["bfloat16"]) and "loss" in d["float32"]
  assert math.isfinite(d["rel_diff"]["loss"])
  assert _positive(r["data_pipeline"]["images_per_s"])
  rows = r["sweep"]  # one row per axis; the run's own point comes from the main run
  assert [p["axis"] for p in rows] == ["canvas", "rois", "batch"]
  assert [p["measured_in"] for p in rows] == ["main run", "sweep", "main run"]
  assert rows[0]["step_s"] == r["train"]["step_s"]["median"]
  assert rows[1]["rois"] == 128 and rows[1]["gflop"] > rows[0]["gflop"]
  assert all(p["canvas"] == 64 and _positive(p["step_s"]) and _positive(p["gflop"])
             for p in rows)
  assert set(r["targets"]) >= {"utilisation", "train_step_compilations",
                               "train_step_compile_s", "bf16_loss_rel_diff"}


def test_torchvision_side(result):
  r, with_torch = result
  if not with_torch:
    pytest.skip("torchvision not installed")
  tv = r["torchvision"]
  for key in ("images_per_s", "gflop_per_step_matmul_conv", "mask_rois_per_image"):
    assert _positive(tv[key]), key
  assert all(_positive(v) for v in tv["ratios_ours_over_torchvision"].values())
  assert tv["differences"] and tv["detections_per_image"] > 0
  for op in ("roi_align", "nms"):
    assert _positive(r["ops"][op]["ours_ms"]) and _positive(r["ops"][op]["torchvision_ms"])
  assert r["ops"]["nms"]["kept"]["ours"] == r["ops"]["nms"]["kept"]["torchvision"]
  assert r["targets"]["train_step_vs_torchvision"]["met"] is not None


def test_cpu_description(tmp_path):
  """The CPU model and its matrix extensions, read from a cpuinfo file (the first
  processor's lines); a missing file gives the platform's name and no flags."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import machine  # pylint: disable=g-import-not-at-top
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nmodel name\t: Example Xeon\n"
                  "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 sse\n\n"
                  "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
  assert machine.cpu_description(str(info)) == {
      "model": "Example Xeon", "flags": ["amx_bf16", "amx_tile", "avx512f", "avx2"]}
  missing = machine.cpu_description(str(tmp_path / "absent"))
  assert missing["model"] and missing["flags"] == []
