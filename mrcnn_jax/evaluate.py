"""Evaluation: COCO AP of a checkpoint on the whole eval split.

    python -m mrcnn_jax.evaluate --config=configs/shapes.py --workdir=/tmp/shapes \\
        [--checkpoint=PATH] [--coordinator_address=host:port --num_processes=N --process_id=I]

Runs the jitted, sharded ``detect`` step over every eval image (the last batch
padded, padding ignored); each process maps its own images' detections back
to original pixels, pastes masks at full resolution and RLE-encodes them
(``config.eval.workers`` processes beside it), and process 0 gathers every
process's results and scores bbox, segm and (for keypoint categories)
keypoints with COCOeval (``config.eval.backend``: pycocotools or
faster_coco_eval).
Prints the standard tables and writes WORKDIR/eval_metrics.json with keys such
as "bbox/AP", "segm/AP50", "keypoints/AP". Without ``--checkpoint`` the latest
checkpoint in the workdir is evaluated.
"""

import functools
import math
import sys
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from mrcnn_jax import checkpointing, sharding, storage
from mrcnn_jax.data import input_pipeline
from mrcnn_jax.data import records as records_lib
from mrcnn_jax.evaluation import backends, distributed
from mrcnn_jax.evaluation import coco as coco_eval
from mrcnn_jax.modeling import build


def detect_step(variables, batch, *, model):
  """Detections and the image_info needed to map them back (both split by image, as
  the batch is: each process reads its own images' rows)."""
  return model.apply(variables, batch["images"], batch["image_info"],
                     method="detect"), batch["image_info"]


@functools.lru_cache(maxsize=None)
def _jitted_detect(model, mesh):
  rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(sharding.traced_in(mesh, functools.partial(detect_step, model=model)),
                 in_shardings=(rep, split), out_shardings=split)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-split array, in its local batch's order (one copy
  of each: with a 'space' mesh axis every row is on each device of its space group)."""
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def eval_ground_truth(config, records):
  """The eval split's COCO ground truth, as ``COCOEvaluator`` takes it: the file
  config.data.eval_annotations when set, else the reader's own (a converted
  split's ground_truth.json, read once; a TFDS split's, built from its objects)."""
  path = config.data.get("eval_annotations")
  if not path:
    try:
      return records.ground_truth()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"eval annotations {e.filename} not found; set "
                              f"--config.data.eval_annotations") from None
  if not storage.exists(path):
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
  backend = e.get("backend", "pycocotools")
  backends.check_backend(backend)
  workers = e.get("workers", 0)
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise ValueError(f"eval.workers: expected an integer >= 0 (0: in this process), got "
                     f"{workers!r}")
  return {"oks_sigmas": e.get("oks_sigmas") or None, "keypoint_score": score,
          "backend": backend, "workers": workers}


def evaluate(model, variables, config, mesh, max_steps: Optional[int] = None,
             progress: bool = True, records=None) -> Dict[str, float]:
  """COCO metrics of ``variables`` on the eval split (the first ``max_steps`` batches);
  ``records``: its reader (``input_pipeline.open_split``) when the caller has it open."""
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  if records is None:
    records = input_pipeline.open_split(config, "eval")
  meta = records.meta
  build.check_dataset(config, meta, f"the eval split {records.directory}")
  evaluator = coco_eval.COCOEvaluator(
      eval_ground_truth(config, records), meta["coco_ids"],
      keypoint_category_ids=meta["keypoint_category_ids"], **evaluator_options(config))
  steps = input_pipeline.num_eval_steps(config, records=records)
  if max_steps:
    steps = min(steps, max_steps)
  faults = input_pipeline.RecordFaults()
  data = input_pipeline.make_dataset(config, "eval", process_index=jax.process_index(),
                                     process_count=jax.process_count(), faults=faults,
                                     records=records)
  step_fn = _jitted_detect(model, mesh)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  start = time.time()
  bar = tqdm.tqdm(data.take(steps).as_numpy_iterator(), total=steps, desc="eval",
                  unit="batch", disable=not progress or jax.process_index() != 0,
                  dynamic_ncols=True)
  try:
    for batch in bar:
      for description in faults.new():  # the run's data.on_corrupt, as in training
        if config.data.get("on_corrupt", "fail") != "skip":
          raise records_lib.CorruptRecordError(f"corrupt record in {description}")
        logging.warning("eval: skipped corrupt record %s (its objects count as missed)",
                        description)
      detections, image_info = step_fn(variables, sharding.global_batch(batch, mesh))
      evaluator.add(jax.tree.map(_local_rows, detections), jax.tree.map(_local_rows, image_info))
    shards = distributed.gather_to_main(evaluator.shard())
  finally:
    evaluator.close()
  logging.info("eval: %d batches in %.1f s", steps, time.time() - start)
  outcome = None
  if jax.process_index() == 0:  # one COCOeval, one printout
    try:
      for shard in shards[1:]:
        evaluator.merge(shard)
      outcome = {"metrics": evaluator.evaluate()}
    except ValueError as e:  # e.g. image ids not in the annotations: every process stops
      outcome = {"error": str(e)}
  outcome = distributed.share_from_main(outcome)
  if "error" in outcome:
    raise ValueError(outcome["error"])
  return outcome["metrics"]


def write_metrics(workdir: str, metrics: Dict[str, float], step: Optional[int]) -> str:
  path = storage.join(workdir, "eval_metrics.json")
  # COCOeval's -1 ("no such objects") arrives as NaN; strict JSON has no NaN.
  values = {k: (None if math.isnan(v) else float(v)) for k, v in metrics.items()}
  storage.write_json(path, {"step": step, **values}, indent=1)
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
      "coordinator_address": flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0 (multi-host evaluation)."),
      "num_processes": flags.DEFINE_integer("num_processes", None,
                                            "Processes in a multi-host evaluation."),
      "process_id": flags.DEFINE_integer("process_id", None, "This process's index."),
  }


def main(argv, args):
  del argv
  config, workdir = args["config"].value, args["workdir"].value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  checkpointing.quiet_orbax_logs()
  sharding.initialize_distributed(args["coordinator_address"].value,
                                  args["num_processes"].value, args["process_id"].value)
  path = args["checkpoint"].value or workdir
  try:
    step_dir = checkpointing.resolve(path)
    variables = checkpointing.load_variables(step_dir)
  except (FileNotFoundError, checkpointing.CheckpointError,
          storage.UnreachableError) as e:  # missing, unreadable or out of reach
    print(f"error: {e}", file=sys.stderr)
    return 2
  model = build.build_model(config)
  try:
    metrics = evaluate(model, variables, config, sharding.make_mesh())
  except (FileNotFoundError, build.DataMismatchError, storage.UnreachableError,
          records_lib.CorruptRecordError, records_lib.SourceError) as e:  # e.g. no eval split
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    step = storage.basename(step_dir)
    out = write_metrics(workdir, metrics, int(step) if step.isdigit() else None)
    print(f"checkpoint {step_dir}\nmetrics written to {out}")
  return 0


if __name__ == "__main__":
  _args = _define_flags()
  app.run(functools.partial(main, args=_args))
