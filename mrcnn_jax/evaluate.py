"""Evaluation: COCO AP of a checkpoint on the whole eval split.

    python -m mrcnn_jax.evaluate --config=configs/shapes.py --workdir=/tmp/shapes \\
        [--checkpoint=PATH]

Runs the jitted, sharded ``detect`` step over every eval image (the last batch
padded, padding ignored), maps detections back to original pixels, pastes
masks at full resolution and RLE-encodes them on the host, and scores bbox,
segm and (for keypoint categories) keypoints with pycocotools' COCOeval.
Prints the standard tables and writes WORKDIR/eval_metrics.json with keys such
as "bbox/AP", "segm/AP50", "keypoints/AP". Without ``--checkpoint`` the latest
checkpoint in the workdir is evaluated.
"""

import functools
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import jax
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from mrcnn_jax import checkpointing, sharding
from mrcnn_jax.data import input_pipeline
from mrcnn_jax.evaluation import coco as coco_eval
from mrcnn_jax.modeling import build


def detect_step(variables, batch, *, model):
  """Detections and the image_info needed to map them back (both replicated)."""
  return model.apply(variables, batch["images"], batch["image_info"],
                     method="detect"), batch["image_info"]


@functools.lru_cache(maxsize=None)
def _jitted_detect(model, mesh):
  rep = sharding.replicated(mesh)
  return jax.jit(sharding.traced_in(mesh, functools.partial(detect_step, model=model)),
                 in_shardings=(rep, sharding.batch_sharding(mesh)), out_shardings=rep)


def eval_annotations(config) -> str:
  """The ground-truth JSON of the eval split: config.data.eval_annotations, else what
  the converter kept (its ground_truth.json; the source JSON for older conversions)."""
  path = config.data.get("eval_annotations")
  if not path:
    meta = input_pipeline.RecordFile(config.data.eval_dir).meta
    path = (os.path.join(config.data.eval_dir, meta["ground_truth"]) if "ground_truth" in meta
            else meta["source_annotations"])
  if not os.path.exists(path):
    raise FileNotFoundError(f"eval annotations {path} not found; set "
                            f"--config.data.eval_annotations")
  return path


def evaluator_options(config) -> Dict[str, Any]:
  """``COCOEvaluator``'s options from ``config.eval``, checked (train calls this up front)."""
  e = config.get("eval", {})
  score = e.get("keypoint_score", "box")
  if score not in coco_eval.KEYPOINT_SCORES:
    raise ValueError(f"eval.keypoint_score: expected one of {coco_eval.KEYPOINT_SCORES}, "
                     f"got {score!r}")
  return {"oks_sigmas": e.get("oks_sigmas") or None, "keypoint_score": score}


def evaluate(model, variables, config, mesh, max_steps: Optional[int] = None,
             progress: bool = True) -> Dict[str, float]:
  """COCO metrics of ``variables`` on the eval split (the first ``max_steps`` batches)."""
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  meta = input_pipeline.RecordFile(config.data.eval_dir).meta
  build.check_dataset(config, meta, f"the eval split {config.data.eval_dir}")
  evaluator = coco_eval.COCOEvaluator(
      eval_annotations(config), meta["coco_ids"],
      keypoint_category_ids=meta["keypoint_category_ids"], **evaluator_options(config))
  steps = input_pipeline.num_eval_steps(config)
  if max_steps:
    steps = min(steps, max_steps)
  faults = input_pipeline.RecordFaults()
  data = input_pipeline.make_dataset(config, "eval", process_index=jax.process_index(),
                                     process_count=jax.process_count(), faults=faults)
  step_fn = _jitted_detect(model, mesh)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  start = time.time()
  bar = tqdm.tqdm(data.take(steps).as_numpy_iterator(), total=steps, desc="eval",
                  unit="batch", disable=not progress or jax.process_index() != 0,
                  dynamic_ncols=True)
  for batch in bar:
    for description in faults.new():  # the run's data.on_corrupt, as in training
      if config.data.get("on_corrupt", "fail") != "skip":
        raise input_pipeline.CorruptRecordError(f"corrupt record in {description}")
      logging.warning("eval: skipped corrupt record %s (its objects count as missed)",
                      description)
    detections, image_info = jax.device_get(step_fn(variables,
                                                    sharding.global_batch(batch, mesh)))
    evaluator.add(detections, image_info)
  logging.info("eval: %d batches in %.1f s", steps, time.time() - start)
  # Every process scores the (replicated) detections, so all agree on the
  # result without another collective; only process 0 prints.
  return evaluator.evaluate()


def write_metrics(workdir: str, metrics: Dict[str, float], step: Optional[int]) -> str:
  path = os.path.join(workdir, "eval_metrics.json")
  with open(path, "w") as f:
    # COCOeval's -1 ("no such objects") arrives as NaN; strict JSON has no NaN.
    values = {k: (None if math.isnan(v) else float(v)) for k, v in metrics.items()}
    json.dump({"step": step, **values}, f, indent=1)
  return path


def _define_flags():
  """CLI flags, defined only when this module is the program (train imports it)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "Where eval_metrics.json goes; its "
                                     "latest checkpoint is evaluated unless --checkpoint."),
      "checkpoint": flags.DEFINE_string("checkpoint", None, "A checkpoint step directory, "
                                        "its parent or a workdir (default: --workdir)."),
  }


def main(argv, args):
  del argv
  config, workdir = args["config"].value, args["workdir"].value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  checkpointing.quiet_orbax_logs()
  path = args["checkpoint"].value or workdir
  try:
    step_dir = checkpointing.resolve(path)
    variables = checkpointing.load_variables(step_dir)
  except (FileNotFoundError, checkpointing.CheckpointError) as e:  # missing or unreadable
    print(f"error: {e}", file=sys.stderr)
    return 2
  model = build.build_model(config)
  try:
    metrics = evaluate(model, variables, config, sharding.make_mesh())
  except (FileNotFoundError, build.DataMismatchError,
          input_pipeline.CorruptRecordError) as e:  # e.g. a missing eval split
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(workdir, exist_ok=True)
  step = os.path.basename(step_dir)
  out = write_metrics(workdir, metrics, int(step) if step.isdigit() else None)
  print(f"checkpoint {step_dir}\nmetrics written to {out}")
  return 0


if __name__ == "__main__":
  _args = _define_flags()
  app.run(functools.partial(main, args=_args))
