"""Export: the serialized program for cpu, cuda and tpu, and prediction from it alone.

One tiny model (configs/shapes.py:tiny at 64x64, random weights saved as an
orbax checkpoint beside a meta.json) is exported once through the CLI for
the module; the exported model runs in a fresh process and must give the
live model's outputs and predictions.json.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import shapes
from mrcnn_jax import artifact, checkpointing, export, predict
from mrcnn_jax.data import coco, synthetic
from mrcnn_jax.modeling import build

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANVAS = (64, 64)
BATCH = 2


def small_config():
  config = shapes.get_config("tiny")
  config.data.canvas_size = CANVAS
  return config


def run(args, **kwargs):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A checkpoint of the tiny model's initial weights with the synthetic data's meta.json."""
  model = build.build_model(small_config())
  variables = jax.jit(functools.partial(model.init, method="initialize"))(
      jax.random.key(0), jnp.zeros((1, *CANVAS, 3)))
  root = tmp_path_factory.mktemp("workdir")
  saver = checkpointing.Checkpointer(str(root))
  saver.save(1, {"params": variables["params"]})
  saver.close()
  with open(root / "meta.json", "w") as f:
    json.dump({**coco.category_meta(synthetic.CATEGORIES), "has_masks": True}, f)
  return root


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  """The export directory written by the CLI (every platform, batch 2)."""
  out = tmp_path_factory.mktemp("export") / "model"
  proc = run(["-m", "mrcnn_jax.export", "--config=configs/shapes.py:tiny",
              f"--checkpoint={workdir}", f"--output={out}", f"--batch_size={BATCH}",
              "--config.data.canvas_size=64,64"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "exported for cpu, cuda, tpu, batch 2" in proc.stdout
  return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Three image files of other sizes and modes than the canvas."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (48, 80, 3), np.uint8)).save(root / "wide.png")
  Image.fromarray(rng.integers(0, 255, (90, 40), np.uint8)).save(root / "gray.png")
  Image.fromarray(rng.integers(0, 255, (64, 64, 4), np.uint8)).save(root / "rgba.png")
  return sorted(str(p) for p in root.iterdir())


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mrcnn_jax import Predictor, predict
    export_dir, inputs, paths, output = sys.argv[1:5]
    predictor = Predictor.from_exported(export_dir, score_threshold=0.0)
    batch = np.load(inputs)
    dets = predictor.detect(batch["images"], {"image_size": batch["image_size"]})
    np.savez(output + ".npz", **dets)
    predict.predict_files(predictor, json.loads(paths), output)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] == "flax"
                   or m.startswith("mrcnn_jax.modeling"))
    print("imported:", heavy)
""")


def test_exported_model_gives_the_live_models_results_in_a_fresh_process(
    workdir, exported, images, tmp_path):
  live = predict.Predictor(small_config(), str(workdir), score_threshold=0.0)
  batch = [live.preprocess(predict.read_image(p)) for p in images[:BATCH]]
  inputs = {"images": np.concatenate([b[0] for b in batch]),
            "image_size": np.concatenate([b[1]["image_size"] for b in batch])}
  np.savez(tmp_path / "inputs.npz", **inputs)
  expected = live.detect(inputs["images"], inputs)
  predict.predict_files(live, images, str(tmp_path / "live"))

  proc = run(["-c", FRESH_PROCESS, str(exported), str(tmp_path / "inputs.npz"),
              json.dumps(images), str(tmp_path / "exported")])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # Neither the model's code nor Flax was imported.
  assert "imported: []" in proc.stdout, proc.stdout

  got = np.load(tmp_path / "exported.npz")
  assert sorted(got) == sorted(expected) == ["boxes", "classes", "keypoints", "masks", "scores",
                                             "valid"]
  assert expected["valid"].sum() > 0
  for key in ("classes", "valid"):
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  for key in ("boxes", "scores", "masks", "keypoints"):
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)

  live_json = json.load(open(tmp_path / "live" / "predictions.json"))
  exported_json = json.load(open(tmp_path / "exported" / "predictions.json"))
  assert len(live_json) == len(exported_json) > 0
  assert {r["file_name"] for r in exported_json} == {os.path.basename(p) for p in images}
  for a, b in zip(live_json, exported_json):
    assert (a["file_name"], a["category_id"], a["segmentation"]) == (
        b["file_name"], b["category_id"], b["segmentation"])
    np.testing.assert_allclose(b["bbox"], a["bbox"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b["score"], a["score"], rtol=1e-5)
    np.testing.assert_allclose(b.get("keypoints", []), a.get("keypoints", []), atol=1e-4)
  for p in images:
    name = os.path.splitext(os.path.basename(p))[0] + ".png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "exported" / name)),
                                  np.asarray(Image.open(tmp_path / "live" / name)))


def test_manifest_lists_every_platform_and_each_program_deserializes(exported, workdir):
  manifest = json.load(open(exported / artifact.MANIFEST))
  assert manifest["format_version"] == artifact.FORMAT_VERSION
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["batch_size"] == BATCH and manifest["canvases"] == [list(CANVAS)]
  assert manifest["parameters"] == "embedded" and manifest["compute_dtype"] == "float32"
  assert [{k: v for k, v in i.items() if k != "meaning"}
          for i in manifest["signature"]["inputs"]] == [
      {"name": "images", "shape": [BATCH, *CANVAS, 3], "dtype": "float32"},
      {"name": "image_size", "shape": [BATCH, 2], "dtype": "int32"}]
  assert all(o["meaning"] for o in manifest["signature"]["outputs"])
  outputs = {o["name"]: o["shape"] for o in manifest["signature"]["outputs"]}
  assert outputs["masks"] == [BATCH, 20, 28, 28] and outputs["keypoints"] == [BATCH, 20, 3, 3]
  p = manifest["preprocessing"]
  assert p["mean"] == [123.675, 116.28, 103.53] and p["channel_order"] == "rgb"
  assert p["resize"]["rule"] == "fit_canvas" and p["resize"]["rounding"] == "round"
  assert p["pad_value"] == [0.0, 0.0, 0.0]  # padding is 0 in normalised space
  assert manifest["classes"] == {"names": ["rectangle", "ellipse", "triangle", "hexagon",
                                           "diamond"], "coco_ids": [2, 5, 7, 9, 11]}
  assert manifest["keypoints"]["names"] == synthetic.KEYPOINT_NAMES
  assert manifest["keypoints"]["flip_map"] == [0, 2, 1]
  assert manifest["keypoints"]["category_ids"] == [7]
  assert manifest["postprocess"]["detections_per_image"] == 20
  assert manifest["versions"]["jax"] == jax.__version__
  assert manifest["source"]["checkpoint"] == checkpointing.resolve(str(workdir))
  (entry,) = manifest["functions"]
  program = jax.export.deserialize(bytearray((exported / entry["file"]).read_bytes()))
  assert program.platforms == ("cpu", "cuda", "tpu")
  assert [tuple(a.shape) for a in program.in_avals] == [(BATCH, *CANVAS, 3), (BATCH, 2)]
  assert os.path.getsize(exported / entry["file"]) == entry["bytes"]


def test_bad_inputs_and_bad_artifacts_are_named_in_one_line(exported, tmp_path):
  model = artifact.load(str(exported))
  manifest_path = f"{exported}/{artifact.MANIFEST}"
  size = {"image_size": np.full((1, 2), 64, np.int32)}
  with pytest.raises(artifact.ArtifactError, match=f"{manifest_path}: images of canvas 32x32"):
    model.detect(np.zeros((1, 32, 32, 3), np.float32), size)
  with pytest.raises(artifact.ArtifactError, match="images float64 .1, 64, 64, 3.: expected"):
    model.detect(np.zeros((1, 64, 64, 3)), size)

  def broken(name, change):
    d = tmp_path / name
    d.mkdir()
    for f in exported.iterdir():
      (d / f.name).write_bytes(f.read_bytes())
    change(d)
    return d

  def edit_manifest(**changes):
    def change(d):
      m = json.load(open(d / artifact.MANIFEST))
      json.dump({**m, **changes}, open(d / artifact.MANIFEST, "w"))
    return change

  program = artifact.program_file(CANVAS)
  cases = {
      "missing": (lambda d: (d / program).unlink(), f"{program}: no such file"),
      "truncated": (lambda d: (d / program).write_bytes((d / program).read_bytes()[:1000]),
                    f"{program}: corrupted"),
      "newer_format": (edit_manifest(format_version=99), "format_version 99 is not one"),
      "other_project": (edit_manifest(project="elsewhere"), "not a manifest of mrcnn_jax"),
      "old_jax": (edit_manifest(calling_convention_version=1),
                  "calling convention 1.*reads conventions"),
      "not_json": (lambda d: (d / artifact.MANIFEST).write_text("{"), "not a valid manifest"),
      "cpu_less": (edit_manifest(platforms=["tpu"]), "exported for tpu; this process runs on cpu"),
  }
  for name, (change, message) in cases.items():
    d = broken(name, change)
    with pytest.raises(artifact.ArtifactError, match=message) as e:
      artifact.load(str(d))
    assert str(d) in str(e.value) and "\n" not in str(e.value), name
  # A sha256 that matches a corrupted program: deserialization fails, named.
  d = broken("garbage", lambda d: (d / program).write_bytes(b"garbage"))
  m = json.load(open(d / artifact.MANIFEST))
  m["functions"][0]["sha256"] = __import__("hashlib").sha256(b"garbage").hexdigest()
  json.dump(m, open(d / artifact.MANIFEST, "w"))
  with pytest.raises(artifact.ArtifactError, match=f"{program}: cannot be deserialized"):
    artifact.load(str(d))
  with pytest.raises(artifact.ArtifactError, match="no such file .is .* a directory written by"):
    artifact.load(str(tmp_path / "nowhere"))

  # Through the CLI: one line on stderr, exit 2.
  proc = run(["-m", "mrcnn_jax.predict", f"--exported={tmp_path / 'truncated'}",
              f"--input={exported / artifact.MANIFEST}", f"--output={tmp_path / 'out'}"])
  assert proc.returncode == 2, proc.stdout + proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: {tmp_path / 'truncated' / program}: corrupted (1000 bytes whose "
                    f"sha256 differs from the one manifest.json records)"], proc.stderr


def test_bfloat16_export_and_refused_arguments(workdir, tmp_path):
  manifest = export.export(small_config(), str(workdir), str(tmp_path / "bf16"),
                           platforms=("cpu",), dtype="bfloat16")
  assert manifest["compute_dtype"] == "bfloat16" and manifest["platforms"] == ["cpu"]
  program = jax.export.deserialize(
      bytearray((tmp_path / "bf16" / manifest["functions"][0]["file"]).read_bytes()))
  assert "bf16" in program.mlir_module()
  dtypes = {o["name"]: o["dtype"] for o in manifest["signature"]["outputs"]}
  assert [str(a.dtype) for a in program.out_avals] == list(dtypes.values())
  assert dtypes["boxes"] == dtypes["scores"] == "float32"  # decoding and NMS stay float32
  with pytest.raises(ValueError, match="platforms: expected distinct names"):
    export.export(small_config(), str(workdir), str(tmp_path / "x"), platforms=("gpu",))
  with pytest.raises(FileNotFoundError, match="no such directory"):
    export.export(small_config(), str(tmp_path / "no_checkpoint"), str(tmp_path / "y"))


def test_benchmark_script_times_both_predictors(workdir, exported, tmp_path):
  out = tmp_path / "bench.json"
  proc = run([os.path.join("scripts", "benchmark_export.py"), "--config=configs/shapes.py:tiny",
              "--config.data.canvas_size=64,64", f"--checkpoint={workdir}",
              f"--exported={exported}", "--runs=2", f"--output={out}"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.load(open(out))
  assert result["artifact"]["platforms"] == ["cpu", "cuda", "tpu"]
  assert result["artifact"]["program_bytes"] == os.path.getsize(
      exported / artifact.program_file(CANVAS))
  for name in ("live", "exported"):
    assert result[f"{name}_call"]["runs"] == 2 and result[f"{name}_call"]["median_s"] > 0
    assert result[f"{name}_first_call_s"] > 0
  assert result["detections"]["live"] == result["detections"]["exported"]
  assert result["max_score_difference"] < 1e-5


def test_each_canvas_is_exported_and_images_pick_theirs(workdir, tmp_path):
  """Two canvases: one program each; the exported predictor puts a landscape and a
  portrait image in its own canvas and agrees, in original pixels, with the live model
  in one square canvas (the same scale, 2.4, for these 2:1 images)."""
  pair = small_config()
  pair.data.update(canvas_size=(), canvas_sizes=((64, 96), (96, 64)))
  manifest = export.export(pair, str(workdir), str(tmp_path / "pair"), platforms=("cpu",))
  assert manifest["canvases"] == [[64, 96], [96, 64]]
  assert [f["file"] for f in manifest["functions"]] == ["detect_64x96.jax", "detect_96x64.jax"]
  exported = predict.Predictor.from_exported(str(tmp_path / "pair"), score_threshold=0.0)
  square = small_config()
  square.data.canvas_size = (96, 96)
  live = predict.Predictor(square, str(workdir), score_threshold=0.0)
  rng = np.random.default_rng(1)
  for shape, canvas in (((20, 40), (64, 96)), ((40, 20), (96, 64))):
    image = rng.integers(0, 255, (*shape, 3), np.uint8)
    assert exported.canvas_for(shape) == canvas and live.canvas_for(shape) == (96, 96)
    got, want = exported(image), live(image)
    assert len(want["results"]) > 0
    assert got["category_ids"].tolist() == want["category_ids"].tolist()
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
    assert (got["masks"] != want["masks"]).mean() < 1e-3
