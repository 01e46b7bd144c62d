"""The main job through its real code paths: train, resume, signals, guards, CLIs, sharding.

One tiny synthetic dataset and one uninterrupted reference run are shared by
the module. Runs that need a fresh process (signals, simulated devices,
multi-process) use the CLIs in subprocesses, as a user would.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs import shapes
from mrcnn_jax import checkpointing, train
from mrcnn_jax.modeling import build

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Root of a 24 / 6 image synthetic dataset: raw/ (COCO) and tf/{train,val} (converted)."""
  # Imported here: the 8-device subprocess imports this module after TensorFlow, and
  # tests.conftest imports torch, which must never come after TensorFlow.
  from tests.conftest import make_shapes_dataset  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("job")
  make_shapes_dataset(root, train=24, val=6, size=64, seed=5, shards=2)
  return root


def overrides(dataset):
  """Command-line overrides turning configs/shapes.py:tiny into a seconds-long run."""
  return {"data.train_dir": str(dataset / "tf" / "train"),
          "data.eval_dir": str(dataset / "tf" / "val"),
          "data.canvas_size": (64, 64), "batch_size": 8, "eval_batch_size": 8,
          "total_steps": STEPS, "train.log_every": 2, "train.checkpoint_every": 4,
          "train.eval_every": 0, "train.progress": False}


def make_config(dataset, **more):
  config = shapes.get_config("tiny")
  for key, value in {**overrides(dataset), **more}.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def cli_flags(dataset, **more):
  def fmt(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in {**overrides(dataset), **more}.items()]


def run_cli(module, args, timeout=600, env=None, **popen):
  cmd = [sys.executable, "-m", f"mrcnn_jax.{module}", *args]
  full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def final_params(workdir):
  return checkpointing.load_variables(os.path.join(workdir, "checkpoints"))


def assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
  """An uninterrupted in-process run of STEPS steps: (workdir, its metrics lines)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(make_config(dataset), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return workdir, lines


def test_run_logs_checkpoints_and_compiles_once(reference_run):
  workdir, lines = reference_run
  steps = [r["step"] for r in lines if "train/loss" in r]
  assert steps == list(range(2, STEPS + 1, 2))
  for r in lines:
    if "train/loss" in r:
      assert np.isfinite(r["train/loss"]) and r["train/images_per_s"] > 0
      assert {"train/loss_mask", "train/loss_keypoint", "train/lr", "train/grad_norm"} <= set(r)
  assert lines[-1]["train/step_compilations"] == 1
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == STEPS
  assert json.load(open(os.path.join(workdir, "meta.json")))["names"][0] == "rectangle"


def test_sigterm_saves_and_resume_is_bitwise_exact(dataset, reference_run, tmp_path):
  """SIGTERM mid-run: exit 0 with a checkpoint at the stop step; the resumed run ends
  with exactly the reference run's parameters."""
  workdir = str(tmp_path / "interrupted")
  args = ["--config=configs/shapes.py:tiny", f"--workdir={workdir}", *cli_flags(dataset)]
  proc = run_cli("train", args)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 400
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and proc.poll() is None:
    assert time.time() < deadline, "no metric line in time"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  stopped_at = checkpointing.Checkpointer(workdir).latest_step()
  assert 2 <= stopped_at < STEPS, out

  proc = run_cli("train", args)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert_trees_equal(final_params(workdir), final_params(reference_run[0]))


def test_nonfinite_steps_are_skipped_then_stop(dataset, tmp_path, monkeypatch):
  """NaN images: every update skipped (parameters stay at their initial values), and
  after max_nonfinite in a row the run stops with a clear error, keeping its checkpoint."""
  from mrcnn_jax.data import input_pipeline
  real = input_pipeline.make_dataset

  def poisoned(*args, **kwargs):
    return real(*args, **kwargs).map(lambda b: {**b, "images": b["images"] * float("nan")})
  monkeypatch.setattr(input_pipeline, "make_dataset", poisoned)
  config = make_config(dataset, **{"train.max_nonfinite": 3, "train.checkpoint_every": 1})
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteError, match="3 steps in a row"):
    train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir).latest_step() >= 1
  saved = checkpointing.load_variables(workdir)
  model = build.build_model(config)
  fresh = jax.jit(lambda k: model.init(k, np.zeros((1, 64, 64, 3), np.float32),
                                       method="initialize"))(jax.random.PRNGKey(config.seed))
  assert_trees_equal(saved["params"], fresh["params"])


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
  """A process that dies half-way through a save leaves the last complete checkpoint
  restorable, and the next run goes on from it.

  The crash is a real one: a subprocess saves step 1, then dies (os._exit) inside
  orbax's save of step 2 after writing part of it. (Raising inside the save
  instead leaves orbax's background threads of that save running in this
  process, where they race with the next manager's cleanup of the same
  directory.)
  """
  script = textwrap.dedent(f"""
      import os
      import numpy as np
      import orbax.checkpoint as ocp
      from mrcnn_jax import checkpointing
      ckpt = checkpointing.Checkpointer({str(tmp_path)!r})
      ckpt.save(1, {{"w": np.arange(6.0).reshape(2, 3), "step": np.int32(1)}}, force=True)
      ckpt.wait()

      def dying_save(self, directory, *args, **kwargs):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "partial"), "w") as f:
          f.write("half a checkpoint")
        os._exit(3)  # the machine goes down mid-save
      ocp.StandardCheckpointHandler.async_save = dying_save
      ckpt.save(2, {{"w": np.zeros((2, 3)), "step": np.int32(2)}}, force=True)
      ckpt.wait()
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 3, proc.stderr[-3000:]
  leftovers = os.listdir(os.path.join(tmp_path, "checkpoints"))
  assert any(name.startswith("2") and name != "2" for name in leftovers), leftovers

  again = checkpointing.Checkpointer(str(tmp_path))
  assert again.latest_step() == 1
  state = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(1)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          state)
  restored = again.restore(abstract)
  np.testing.assert_array_equal(restored["w"], state["w"])
  again.save(2, {"w": np.ones((2, 3)), "step": np.int32(2)}, force=True)  # and go on
  again.close()
  after = checkpointing.Checkpointer(str(tmp_path))
  assert after.latest_step() == 2
  np.testing.assert_array_equal(after.restore(abstract)["w"], np.ones((2, 3)))
  after.close()


def test_evaluate_and_predict_clis(dataset, reference_run, tmp_path):
  """evaluate writes eval_metrics.json; predict (with test-time augmentation) writes
  COCO-format JSON and pictures, for images of odd sizes and modes."""
  from PIL import Image
  workdir = reference_run[0]
  flags = cli_flags(dataset)
  proc = run_cli("evaluate", ["--config=configs/shapes.py:tiny", f"--workdir={workdir}", *flags])
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  metrics = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  assert metrics["step"] == STEPS
  for key in ("bbox/AP", "bbox/AP50", "segm/AP", "keypoints/AP"):
    assert key in metrics and (metrics[key] is None or 0 <= metrics[key] <= 1), key
  assert "Average Precision" in out

  images = tmp_path / "images"
  images.mkdir()
  val = sorted((dataset / "raw" / "val").iterdir())
  Image.open(val[0]).save(images / "rgb.jpg")
  Image.open(val[1]).convert("L").resize((50, 90)).save(images / "gray.png")
  Image.open(val[2]).convert("RGBA").resize((130, 40)).save(images / "rgba.png")
  (images / "broken.jpg").write_bytes(b"not an image")
  output = tmp_path / "predictions"
  # With the test-time views on: mirrored within each image's width, and 1.5x.
  proc = run_cli("predict", ["--config=configs/shapes.py:tiny", f"--checkpoint={workdir}",
                             f"--input={images}", f"--output={output}",
                             "--score_threshold=0.0", "--config.model.test.flip=True",
                             "--config.model.test.scales=(1.0,1.5)", *flags])
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "broken.jpg" in out and "skipped" in out
  results = json.load(open(output / "predictions.json"))
  assert {r["file_name"] for r in results} <= {"rgb.jpg", "gray.png", "rgba.png"}
  sizes = {"rgb.jpg": Image.open(val[0]).size[::-1], "gray.png": (90, 50),
           "rgba.png": (40, 130)}
  for r in results:
    h, w = sizes[r["file_name"]]
    x, y, bw, bh = r["bbox"]
    assert 0 <= x <= x + bw <= w + 1e-3 and 0 <= y <= y + bh <= h + 1e-3
    assert r["segmentation"]["size"] == [h, w], r["file_name"]
  for name, (h, w) in sizes.items():
    picture = Image.open(output / (os.path.splitext(name)[0] + ".png"))
    zoom = -(-512 // max(h, w))  # small images are drawn enlarged (--picture_min_side=512)
    assert picture.size == (w * zoom, h * zoom) and picture.mode == "RGB"


def test_predictor_api_on_arrays(dataset, reference_run):
  from mrcnn_jax import Predictor
  config = make_config(dataset)
  predictor = Predictor(config, reference_run[0], score_threshold=0.0)
  rng = np.random.default_rng(0)
  for image in (rng.integers(0, 255, (37, 81, 3), np.uint8),
                rng.integers(0, 65535, (70, 20), np.uint16),
                rng.random((64, 64, 4), np.float32)):
    out = predictor(image)
    n = len(out["scores"])
    h, w = image.shape[:2]
    assert out["boxes"].shape == (n, 4) and out["masks"].shape == (n, h, w)
    assert out["keypoints"].shape == (n, 3, 3) and len(out["results"]) == n
    assert np.all(out["boxes"] >= 0) and np.all(out["boxes"][:, 2] <= w)
  with pytest.raises(ValueError, match="expected"):
    predictor(np.zeros((4, 4, 2), np.uint8))


SHARDING_CHECK = textwrap.dedent("""
    import functools, sys, jax, numpy as np, optax
    sys.path.insert(0, {root!r})
    from mrcnn_jax import optim, sharding, train
    from mrcnn_jax.data import input_pipeline
    from mrcnn_jax.modeling import build
    from tests.test_train import make_config
    import pathlib
    # SGD, the standard recipe: Adam's normalised steps would turn float noise in
    # near-zero gradients into full-size update differences.
    config = make_config(pathlib.Path({dataset!r}), **{{"optim.name": "sgd", "optim.lr": 0.02}})
    assert jax.device_count() == 8
    model = build.build_model(config)
    shapes = jax.eval_shape(functools.partial(train.create_state, model, optax.identity(),
                                              config), jax.random.PRNGKey(0))
    tx = optim.make_optimizer(config, shapes.params)
    data = input_pipeline.make_dataset(config, "train").as_numpy_iterator()
    batches = [next(data) for _ in range(3)]

    def jitted_step(devices):  # one train step on devices, from a host state
      mesh = sharding.make_mesh(devices)
      rep = sharding.replicated(mesh)
      step = jax.jit(sharding.traced_in(mesh, functools.partial(
                         train.train_step, model=model, tx=tx,
                         schedule=optim.learning_rate(config))),
                     in_shardings=(rep, sharding.batch_sharding(mesh), rep),
                     out_shardings=(rep, rep))
      return lambda state, b: step(jax.device_put(state, rep), sharding.global_batch(b, mesh),
                                   jax.random.PRNGKey(0))

    # Each step of a one-device run, and the same step on 8 devices from the same
    # state: comparing whole trajectories would let float noise from the reduction
    # order compound until a near-tie (top-k over the untrained RPN's nearly equal
    # scores) picks another proposal and the runs part for good.
    one, eight = jitted_step(jax.devices()[:1]), jitted_step(jax.devices())
    state = jax.device_get(jax.jit(functools.partial(train.create_state, model, tx, config))(
        jax.random.PRNGKey(0)))
    l1, l8 = [], []
    for b in batches:
      (state1, m1), (state8, m8) = one(state, b), eight(state, b)
      l1.append(float(m1["loss"]))
      l8.append(float(m8["loss"]))
      np.testing.assert_allclose(l8[-1], l1[-1], rtol=1e-5, atol=1e-5)
      for a, c in zip(jax.tree.leaves(jax.device_get(state8.params)),
                      jax.tree.leaves(jax.device_get(state1.params))):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
      state = jax.device_get(state1)
    print("OK", l1, l8)
""")


def test_eight_devices_match_one(dataset):
  """Data-parallel over 8 simulated CPU devices: same losses and parameters as 1 device."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-c", SHARDING_CHECK.format(root=ROOT,
                                                                     dataset=str(dataset))],
                        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_stop_together_on_one_sigterm(dataset, tmp_path):
  """jax.distributed over localhost (gloo): two processes train; SIGTERM to process 1
  only stops both at the same step (preemption.py), each saves its part and exits 0."""
  workdir = str(tmp_path / "multi")
  port = _free_port()
  total = 40
  flags = cli_flags(dataset, total_steps=total, **{"train.checkpoint_every": total,
                                                   "train.log_every": 1})
  procs = [run_cli("train", ["--config=configs/shapes.py:tiny", f"--workdir={workdir}",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}", *flags]) for i in range(2)]
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no metric line"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # process 0 hears of it from the runtime
  outs = [p.communicate(timeout=600)[0] for p in procs]
  steps = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    found = re.findall(r"stopped by signal at step (\d+)", out)
    assert found, out[-3000:]
    steps.append(int(found[0]))
  assert "process 0 of 2" in outs[0] or "2 processes" in outs[0], outs[0]
  assert steps[0] == steps[1] < total
  assert checkpointing.Checkpointer(workdir).latest_step() == steps[0]
  params = final_params(workdir)["params"]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_two_processes_evaluate_as_one(dataset, reference_run, tmp_path):
  """Two processes each paste and encode their own images (through a worker process)
  and process 0 alone scores and prints: the metrics of a one-process run on the
  same two (simulated) devices, to the last digit."""
  workdir = reference_run[0]
  port = _free_port()
  flags = cli_flags(dataset, **{"eval.workers": 1})
  procs = [run_cli("evaluate", ["--config=configs/shapes.py:tiny",
                                f"--workdir={tmp_path / 'two'}", f"--checkpoint={workdir}",
                                f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                f"--process_id={i}", *flags]) for i in range(2)]
  single = run_cli("evaluate", ["--config=configs/shapes.py:tiny",
                                f"--workdir={tmp_path / 'one'}", f"--checkpoint={workdir}",
                                *cli_flags(dataset)],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  outs = [p.communicate(timeout=900)[0] for p in [*procs, single]]
  for p, out in zip([*procs, single], outs):
    assert p.returncode == 0, out
  assert "Average Precision" in outs[0] and "Average Precision" not in outs[1], outs[1]
  assert not (tmp_path / "two").exists() or os.listdir(tmp_path / "two") == [
      "eval_metrics.json"]
  two = json.load(open(tmp_path / "two" / "eval_metrics.json"))
  one = json.load(open(tmp_path / "one" / "eval_metrics.json"))
  assert two == one and "segm/AP" in one and "keypoints/AP" in one


def test_compile_only_fills_the_cache_that_training_then_loads(dataset, tmp_path):
  """--compile_only needs no data and writes no workdir; with JAX's persistent cache, a
  training run of the same flags compiles neither its initialisation nor its train step,
  one program per canvas (a landscape and a portrait one here, both used in 4 steps)."""
  cache = tmp_path / "cache"
  env = {"JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  programs = lambda: sorted(p.name for p in cache.iterdir()
                            if p.name.startswith(("jit_train_step-", "jit_create_state-")))
  flags = ["--config=configs/shapes.py:tiny", "--config.data.canvas_size=()",
           "--config.data.canvas_sizes=((64,96),(96,64))",
           *[f for f in cli_flags(dataset, total_steps=4) if "canvas_size" not in f]]
  proc = run_cli("train", [*flags, f"--workdir={tmp_path / 'unused'}", "--compile_only",
                           f"--config.data.train_dir={tmp_path / 'nowhere'}"], env=env)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert not (tmp_path / "unused").exists()
  compiled = programs()
  assert [n.split("-")[0] for n in compiled] == [
      "jit_create_state", "jit_train_step", "jit_train_step"], compiled
  proc = run_cli("train", [*flags, f"--workdir={tmp_path / 'run'}"], env=env)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert programs() == compiled  # the same three programs: loaded, not compiled anew
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert lines[-1]["train/step_compilations"] == 2  # each canvas once


def test_train_cli_names_a_missing_dataset(tmp_path):
  proc = run_cli("train", ["--config=configs/shapes.py:tiny", f"--workdir={tmp_path}",
                           f"--config.data.train_dir={tmp_path / 'nowhere'}"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert "nowhere" in out and "not a converted split" in out and "Traceback" not in out


@pytest.mark.parametrize("override,message", [
    ("--config.model.num_classes=3",
     "has 5 categories (rectangle, ellipse, triangle, hexagon, diamond) but model.num_classes "
     "is 3; set --config.model.num_classes=5"),
    ("--config.model.keypoint_head.num_keypoints=4",
     "has 3 keypoints per instance but the keypoint head predicts "
     "model.keypoint_head.num_keypoints=4"),
])
def test_train_cli_names_a_config_that_does_not_fit_the_data(dataset, tmp_path, override,
                                                             message):
  proc = run_cli("train", ["--config=configs/shapes.py:tiny", f"--workdir={tmp_path}",
                           *cli_flags(dataset), override])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert "the training split" in out and message in out and "Traceback" not in out


def test_predictor_refuses_a_config_that_does_not_fit_the_checkpoint(dataset, reference_run):
  from mrcnn_jax import Predictor
  from mrcnn_jax.modeling import build
  config = make_config(dataset, **{"model.num_classes": 7})
  with pytest.raises(build.DataMismatchError, match="model.num_classes is 7"):
    Predictor(config, reference_run[0])


def test_a_run_that_cannot_start_says_why_before_training(dataset, reference_run, tmp_path):
  """A workdir trained with another model, a finished workdir, eval annotations missing with
  periodic evaluation on: each is named up front, and the workdir's files stay as they were."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run[0], workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(train.SetupError,
                     match=r"checkpoint at step 8 does not fit this config "
                           r"\(\d+ parameters differ"):
    train.train_and_evaluate(make_config(dataset, **{"model.fpn_channels": 16}), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == config_before

  metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  assert train.train_and_evaluate(make_config(dataset), workdir) == {}  # at total_steps already
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before

  val = tmp_path / "val"
  shutil.copytree(dataset / "tf" / "val", val)
  os.remove(val / "ground_truth.json")
  with pytest.raises(FileNotFoundError, match="ground_truth.json not found"):
    train.train_and_evaluate(make_config(dataset, **{"data.eval_dir": str(val),
                                                     "train.eval_every": 4}),
                             str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new" / "checkpoints")


def test_train_cli_names_an_unreachable_workdir(dataset):
  """A filesystem that cannot be reached (here: an unknown scheme, as a bucket without
  credentials would be) stops the run before anything else, naming the path."""
  proc = run_cli("train", ["--config=configs/shapes.py:tiny", "--workdir=nosuchfs://bucket/run",
                           *cli_flags(dataset)])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert "--workdir nosuchfs://bucket/run: cannot be reached" in out, out
  assert "Traceback" not in out


def test_workdir_and_data_as_file_uris(dataset, tmp_path):
  """file:// URIs for the data, the workdir (checkpoints through orbax) and the initial
  checkpoint; an unreachable data or checkpoint path is named before training."""
  config = make_config(dataset, total_steps=2, **{
      "data.train_dir": f"file://{dataset}/tf/train", "train.checkpoint_every": 2})
  workdir = f"file://{tmp_path}/run"
  train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(str(tmp_path / "run")).latest_step() == 2
  assert {"config.json", "meta.json", "metrics.jsonl", "tensorboard"} <= set(
      os.listdir(tmp_path / "run"))
  # What init_checkpoint, evaluate --checkpoint and predict read it with.
  loaded = checkpointing.load_variables(workdir)["params"]
  assert_trees_equal(loaded, final_params(str(tmp_path / "run"))["params"])
  for key in ("data.train_dir", "init_checkpoint"):
    with pytest.raises(train.SetupError, match=f"config.{key} nosuchfs://b/x: cannot be reached"):
      train.train_and_evaluate(make_config(dataset, **{key: "nosuchfs://b/x"}),
                               str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")


def test_train_cli_refuses_a_file_as_workdir(dataset, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  proc = run_cli("train", ["--config=configs/shapes.py:tiny", f"--workdir={path}",
                           *cli_flags(dataset)])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert "exists and is not a directory" in out and "Traceback" not in out
