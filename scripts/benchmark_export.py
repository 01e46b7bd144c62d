"""Export and prediction from the artifact against the live model: size, start-up, latency.

    python scripts/benchmark_export.py --config=configs/shapes.py --checkpoint=workdirs/shapes
    python scripts/benchmark_export.py --config=configs/shapes.py --checkpoint=init --runs=20

Exports the checkpoint (``mrcnn_jax.export.export``, every platform of
``--platforms``, batch 1) into a temporary directory unless ``--exported``
names one, then times ``Predictor(config, checkpoint)`` and
``Predictor.from_exported(DIR)`` on the same image (a random uint8 image of
the canvas's size, or ``--image``): start-up (construction), the first call
(compilation included) and ``--runs`` further calls, alternating between the
two so that the machine's load falls on both alike. ``--checkpoint=init``
uses the model's initial weights (with the synthetic shapes dataset's
classes): size and latency do not depend on the weights, except through how
many detections the heads see. Prints JSON (also to ``--output``).
"""

import functools
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import mrcnn_jax  # noqa: E402
from mrcnn_jax import checkpointing, export, predict  # noqa: E402
from mrcnn_jax.data import canvases  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py", "Experiment config.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "init", "A checkpoint, or 'init'.")
_EXPORTED = flags.DEFINE_string("exported", None, "An existing export (default: export now).")
_PLATFORMS = flags.DEFINE_list("platforms", list(export.DEFAULT_PLATFORMS), "Lowered for.")
_IMAGE = flags.DEFINE_string("image", None, "An image file (default: random, canvas-sized).")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed calls of each predictor after the first.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here.")


def _initial_checkpoint(config, directory: str) -> str:
  """The model's initial weights as a workdir, with the synthetic dataset's meta.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.data import coco, synthetic  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
  model = build.build_model(config)
  variables = jax.jit(functools.partial(model.init, method="initialize"))(
      jax.random.key(0), jnp.zeros((1, *canvases.canvas_sizes(config)[0], 3)))
  saver = checkpointing.Checkpointer(directory)
  state = {"params": variables["params"]}
  if len(variables) > 1:  # BatchNorm statistics
    state["model_state"] = {k: v for k, v in variables.items() if k != "params"}
  saver.save(0, state)
  saver.close()
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump({**coco.category_meta(synthetic.CATEGORIES), "has_masks": True}, f)
  return directory


def _seconds(f):
  start = time.perf_counter()
  out = f()
  return out, time.perf_counter() - start


def _summary(times):
  t = np.asarray(times)
  return {"median_s": float(np.median(t)), "iqr_s": float(np.subtract(*np.percentile(t, [75, 25]))),
          "min_s": float(t.min()), "runs": len(t)}


def main(argv):
  del argv
  config = _CONFIG.value
  checkpointing.quiet_orbax_logs()
  with tempfile.TemporaryDirectory(prefix="benchmark_export_") as scratch:
    _benchmark(config, scratch)


def _benchmark(config, scratch: str):
  checkpoint = _CHECKPOINT.value
  if checkpoint == "init":
    checkpoint = _initial_checkpoint(config, os.path.join(scratch, "init"))
  result = {"canvases": [list(c) for c in canvases.canvas_sizes(config)], "checkpoint": _CHECKPOINT.value,
            "load_average": os.getloadavg(), "cpus": os.cpu_count()}
  directory = _EXPORTED.value
  if directory is None:
    directory = os.path.join(scratch, "export")
    _, result["export_s"] = _seconds(lambda: export.export(config, checkpoint, directory,
                                                           platforms=_PLATFORMS.value))
  manifest = json.load(open(os.path.join(directory, "manifest.json")))
  result["artifact"] = {"platforms": manifest["platforms"],
                        "program_bytes": sum(f["bytes"] for f in manifest["functions"]),
                        "manifest_bytes": os.path.getsize(os.path.join(directory, "manifest.json"))}

  canvas = canvases.canvas_sizes(config)[0]
  image = (predict.read_image(_IMAGE.value) if _IMAGE.value else
           np.random.default_rng(0).integers(0, 256, (*canvas, 3), np.uint8))
  live, result["live_startup_s"] = _seconds(
      lambda: predict.Predictor(config, checkpoint, score_threshold=0.0))
  exported, result["exported_startup_s"] = _seconds(
      lambda: mrcnn_jax.Predictor.from_exported(directory, score_threshold=0.0))
  times = {"live": [], "exported": []}
  outs = {}
  for name, p in (("live", live), ("exported", exported)):
    outs[name], result[f"{name}_first_call_s"] = _seconds(lambda p=p: p(image))
  for _ in range(_RUNS.value):
    for name, p in (("live", live), ("exported", exported)):
      times[name].append(_seconds(lambda p=p: p(image))[1])
  for name in times:
    result[f"{name}_call"] = _summary(times[name])
  result["detections"] = {name: len(o["results"]) for name, o in outs.items()}
  if len(outs["live"]["scores"]) == len(outs["exported"]["scores"]):
    result["max_score_difference"] = float(np.max(np.abs(
        outs["live"]["scores"] - outs["exported"]["scores"]), initial=0.0))
  text = json.dumps(result, indent=1)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
