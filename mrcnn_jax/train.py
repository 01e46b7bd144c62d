"""Training: sharded, resumable, with periodic evaluation.

    python -m mrcnn_jax.train --config=configs/shapes.py --workdir=/tmp/shapes \\
        [--config.total_steps=1000 ...] [--coordinator_address=host:port \\
        --num_processes=N --process_id=I]

``train_and_evaluate`` reads top to bottom: mesh, model, optimiser, state
(initialised straight into its shardings), checkpoint restore, input from the
restored step, the jitted step, the loop with logging, evaluation and saves.

Guarantees:
- The batches and the per-step PRNG key are pure functions of (seed, step),
  and a checkpoint holds the whole state, so a run resumed at step k ends
  with the same parameters as one that never stopped (bitwise on CPU).
- SIGTERM / SIGINT: the current step finishes, a checkpoint is written, and
  the process exits 0; rerunning the command resumes. With several
  processes, a signal to any one stops all at the same step, agreed without
  a per-step barrier (preemption.py).
- A step whose loss or gradients are not finite changes nothing but the
  step counter and the skip counters; ``train.max_nonfinite`` skips in a row
  stop the run with an error, keeping the last (good) checkpoint.
- A checkpoint that cannot be restored is renamed to ``<step>.corrupt`` and
  the newest valid one is used (``_restore``); a failed save stops the run
  at the next step boundary with one line and exit status 4
  (``train.checkpoint_failures="warn"`` goes on); a corrupt record stops it
  with exit status 2 or is skipped (``data.on_corrupt``). README, "When
  things go wrong", lists every fault.
- Logs: a progress bar with ETA, a metric line every ``train.log_every``
  steps, TensorBoard summaries in WORKDIR/tensorboard and one JSON object per
  log step in WORKDIR/metrics.jsonl.
- ``--config.mlperf.enabled=True``: MLPerf time-to-accuracy mode (mlperf.py):
  WORKDIR/mlperf.log, the train step compiled before run_start, evaluation
  every epoch, and the run stops at the first evaluation that reaches the
  box and mask AP targets.
"""

import functools
import json
import sys
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import tqdm
from absl import app, flags, logging
from flax import struct
from ml_collections import config_flags

from mrcnn_jax import checkpointing, mlperf, optim, preemption, sharding, storage
from mrcnn_jax import evaluate as evaluate_lib
from mrcnn_jax.data import canvases as canvas_lib
from mrcnn_jax.data import input_pipeline
from mrcnn_jax.data import records as records_lib
from mrcnn_jax.modeling import build


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates attempted so far
  params: Any
  model_state: Any  # non-trained collections, e.g. {"batch_stats": ...}
  opt_state: Any
  nonfinite_run: jax.Array  # consecutive skipped (non-finite) steps
  nonfinite_total: jax.Array


class NonFiniteError(RuntimeError):
  pass


class LogWriteError(RuntimeError):
  """metrics.jsonl or TensorBoard cannot be written (a full or unwritable disk)."""


def batch_spec(config: ml_collections.ConfigDict, batch_size: int,
               num_keypoints: Optional[int] = None,
               canvas: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
  """The shapes and dtypes (``records.batch_spec``) ``make_dataset`` yields for
  ``canvas`` (default: the config's first).

  ``num_keypoints``: the data's keypoints per instance (what the pipeline
  yields); default: the keypoint head's, or 0 without one.
  """
  m = config.model
  if num_keypoints is None:
    num_keypoints = m.keypoint_head.num_keypoints if m.keypoint_head.enabled else 0
  return records_lib.batch_spec(
      batch_size, canvas or canvas_lib.canvas_sizes(config)[0], config.data.max_instances,
      config.data.mask_size, num_keypoints)


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int,
                num_keypoints: Optional[int] = None,
                canvas: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
  """A batch without instances (``records.placeholder_batch``) of ``batch_spec``."""
  return records_lib.placeholder_batch(batch_spec(config, batch_size, num_keypoints, canvas))


def _split_batch(batch):
  gt = {k: v for k, v in batch.items() if k.startswith("gt_")}
  return batch["images"], batch["image_info"], gt


def create_state(model, tx, config, rng) -> TrainState:
  """A fresh state (pure: run under ``jax.jit`` with output shardings). The parameters'
  shapes do not depend on the canvas: the first one initialises."""
  images = jnp.zeros((1, *canvas_lib.canvas_sizes(config)[0], 3), jnp.float32)
  variables = model.init(rng, images, method="initialize")
  params = variables.pop("params")
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, model_state=dict(variables),
                    opt_state=tx.init(params), nonfinite_run=zero, nonfinite_total=zero)


def train_step(state: TrainState, batch, key, *, model, tx, schedule):
  """One update; returns (new state, metrics). ``key`` is folded with the step."""
  images, image_info, gt = _split_batch(batch)
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    (losses, diag), updated = model.apply(
        {"params": params, **state.model_state}, images, image_info, gt, step_key,
        train=True, method="losses", mutable=list(state.model_state))
    return losses["loss"], (losses, diag, updated)

  (_, (losses, diag, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite step leaves parameters, optimiser and norm statistics untouched.
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      model_state=keep(dict(model_state), state.model_state),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  metrics = {**losses, **diag, "grad_norm": grad_norm, "lr": schedule(state.step),
             "finite": finite.astype(jnp.float32), "nonfinite_run": new_state.nonfinite_run}
  return new_state, metrics


class MetricLogger:
  """Metric lines on the console, metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled, self.workdir, self.tf = enabled, workdir, tf
    self.writer = None
    if enabled:
      self.writer = tf.summary.create_file_writer(storage.join(workdir, "tensorboard"))
      self.jsonl = storage.AppendFile(storage.join(workdir, "metrics.jsonl"))

  def write(self, step: int, metrics: Dict[str, float], prefix: str = "") -> None:
    try:
      self._write(step, metrics, prefix)
    except (OSError, self.tf.errors.OpError) as e:
      raise LogWriteError(f"cannot write metrics at step {step} to {self.workdir}: "
                          f"{checkpointing.cause(e)}") from None

  def _write(self, step: int, metrics: Dict[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    metrics = {prefix + k: float(v) for k, v in metrics.items()}
    # COCOeval's "no such object" (NaN) becomes null: strict JSON has no NaN.
    record = {k: (None if np.isnan(v) else v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
    self.jsonl.flush()
    with self.writer.as_default(step=step):
      for k, v in metrics.items():
        self.tf.summary.scalar(k, v)
    self.writer.flush()

  def event(self, step: int, record: Dict[str, Any]) -> None:
    """A non-numeric record (a fault and what was done) in metrics.jsonl."""
    if self.enabled:
      self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
      self.jsonl.flush()

  def close(self, quiet: bool = False):
    """Closes the files; ``quiet``: a failure to flush is not raised again."""
    if self.enabled:
      try:
        self.jsonl.close()
        self.writer.close()
      except (OSError, self.tf.errors.OpError) as e:
        if not quiet:
          raise LogWriteError(f"cannot write metrics to {self.workdir}: "
                              f"{checkpointing.cause(e)}") from None


def _format(metrics: Dict[str, float]) -> str:
  keys = [k for k in metrics if k.startswith("loss")] + [
      k for k in ("lr", "grad_norm", "images_per_s") if k in metrics]
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)


class SetupError(RuntimeError):
  """The run cannot start as asked (the CLI prints it and exits 2)."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains for ``config.total_steps`` (resuming from ``workdir``); returns the last eval."""
  # From the start: a signal during set-up or the first compilation is also
  # answered by finishing the step, saving and exiting (not a crash in XLA).
  stop = preemption.StopRequest()
  try:
    return _train(config, workdir, stop)
  finally:
    stop.restore()


def _programs(config, mesh):
  """(model, abstract state, replicated sharding, jitted init, jitted train step):
  one definition for training and ``compile_programs``, so that both compile the
  same programs."""
  model = build.build_model(config, num_devices=sharding.data_size(mesh))
  # Trace the model once for shapes; the optimiser state's shapes follow from the params'.
  shapes = jax.eval_shape(functools.partial(create_state, model, optax.identity(), config),
                          jax.random.PRNGKey(0))
  tx = optim.make_optimizer(config, shapes.params, build.frozen_parameters(config))
  schedule = optim.learning_rate(config)
  shapes = shapes.replace(opt_state=jax.eval_shape(tx.init, shapes.params))
  rep = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  state_sharding = jax.tree.map(lambda _: rep, abstract)
  init = jax.jit(functools.partial(create_state, model, tx, config), out_shardings=state_sharding)
  step_fn = jax.jit(sharding.traced_in(mesh, functools.partial(train_step, model=model, tx=tx,
                                                               schedule=schedule)),
                    in_shardings=(state_sharding, sharding.batch_sharding(mesh), rep),
                    out_shardings=(state_sharding, rep), donate_argnums=(0,))
  return model, abstract, rep, init, step_fn


def make_mesh(config) -> jax.sharding.Mesh:
  """Every device, split ``config.mesh.space`` ways along image height (sharding.py);
  ``config.batch_size`` must split evenly over the rest, the data axis."""
  mesh = sharding.make_mesh(space=config.get("mesh", {}).get("space", 1))
  sharding.check_batch_size(config.batch_size, mesh)
  return mesh


def compile_programs(config: ml_collections.ConfigDict) -> None:
  """Compiles a run's initialisation and its train step for every canvas, needing neither
  data nor a workdir.

  With JAX's persistent compilation cache on (``JAX_COMPILATION_CACHE_DIR``), a
  later training process of the same config loads both instead of compiling
  them (a 2-step configs/shapes.py run on 2 cores: 39 -> 15 s); scripts/demo.sh
  runs this (``--compile_only``) while it makes the dataset. Without the cache
  it only checks that the config compiles.
  """
  mesh = make_mesh(config)
  _, abstract, _, init, step_fn = _programs(config, mesh)
  key = jax.eval_shape(jax.random.PRNGKey, config.seed)  # what _train passes both
  init.lower(key).compile()
  compile_steps(config, abstract, step_fn, key)


def compile_steps(config, abstract, step_fn, key, num_keypoints: Optional[int] = None):
  """``{canvas: the train step compiled for it}``, one per canvas of ``config``
  (``num_keypoints``: the data's, see ``batch_spec``)."""
  compiled = {}
  for canvas in canvas_lib.canvas_sizes(config):
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch_spec(
        config, config.batch_size, num_keypoints, canvas=canvas))
    compiled[tuple(canvas)] = step_fn.lower(abstract, batch, key).compile()
  return compiled


def _check_paths(config, workdir: str) -> None:
  """Fails before any work when the workdir, the data or the initial checkpoint lies
  on a filesystem that cannot be reached (``SetupError`` naming the path: exit 2)."""
  # Orbax reads and writes the workdir and the initial checkpoint: they need its schemes.
  paths = [("--workdir", workdir, storage.check_checkpoint_reachable)]
  if config.data.get("source", "records") == "tfds":
    if config.data.get("tfds_data_dir"):
      paths.append(("config.data.tfds_data_dir", config.data.tfds_data_dir,
                    storage.check_reachable))
  else:
    paths.append(("config.data.train_dir", config.data.train_dir, storage.check_reachable))
    if config.train.eval_every:
      paths.append(("config.data.eval_dir", config.data.eval_dir, storage.check_reachable))
  if config.get("init_checkpoint"):
    paths.append(("config.init_checkpoint", config.init_checkpoint,
                  storage.check_checkpoint_reachable))
  for what, path, check in paths:
    try:
      check(path, what)
    except storage.UnreachableError as e:
      raise SetupError(str(e)) from None
  try:
    if storage.exists(workdir) and not storage.isdir(workdir):
      raise SetupError(f"--workdir {workdir} exists and is not a directory")
    storage.makedirs(workdir)
  except (OSError, tf.errors.OpError) as e:
    raise SetupError(f"--workdir {workdir}: cannot write ({checkpointing.cause(e)})") from None


def _train(config, workdir, stop) -> Dict[str, float]:
  t = config.train
  _check_paths(config, workdir)
  is_main = jax.process_index() == 0
  perf = None
  if config.get("mlperf") and config.mlperf.enabled:
    try:
      mlperf.check_config(config)
    except ValueError as e:
      raise SetupError(str(e)) from None
    perf = mlperf.MLPerfRun(config, workdir, is_main)  # init_start: the run's clock starts
    perf.submission(f"{jax.device_count()}x{jax.devices()[0].device_kind}")
  train_records = input_pipeline.open_split(config, "train")
  build.check_dataset(config, train_records.meta, f"the training split {train_records.directory}")
  eval_records = None
  if t.eval_every or perf:  # what periodic evaluation needs, before hours of training
    eval_records = input_pipeline.open_split(config, "eval")
    build.check_dataset(config, eval_records.meta, f"the eval split {eval_records.directory}")
    evaluate_lib.eval_ground_truth(config, eval_records)

  try:
    mesh = make_mesh(config)
  except ValueError as e:
    raise SetupError(str(e)) from None
  evaluate_lib.evaluator_options(config)  # a bad eval setting fails now, not after training
  model, abstract, rep, init, step_fn = _programs(config, mesh)

  try:
    checkpointer = checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints,
                                              best_metric=t.get("best_metric") or None)
  except OSError as e:  # an unwritable or full workdir
    raise SetupError(f"--workdir {workdir}: cannot create its checkpoint directories "
                     f"({checkpointing.cause(e)})") from None
  start, state, bad = _restore(checkpointer, abstract, workdir, config.total_steps)
  if start is not None and state is None:  # at total_steps already
    checkpointer.close()
    logging.warning("%s is at step %d >= total_steps %d: nothing to train", workdir, start,
                    config.total_steps)
    return {}
  if start is not None:
    logging.info("resumed from %s at step %d", workdir, start)
  else:
    state = init(jax.random.PRNGKey(config.seed))
    if config.get("init_checkpoint"):
      state = _load_initialisation(state, config, rep)
    start = 0
  if is_main:  # after a restore, so a config that does not fit leaves these as they were
    try:
      storage.write_text(storage.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=1))
      # Class names and keypoint metadata travel with the checkpoints (predict reads them).
      storage.write_json(storage.join(workdir, "meta.json"), train_records.meta, indent=1)
    except (OSError, tf.errors.OpError) as e:
      checkpointer.close()
      raise SetupError(f"--workdir {workdir}: cannot write ({checkpointing.cause(e)})") from None
  nparams = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("model: %.2fM parameters; %d devices, %d processes", nparams / 1e6,
               jax.device_count(), jax.process_count())

  faults = input_pipeline.RecordFaults()
  data = iter(input_pipeline.make_dataset(
      config, "train", start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), faults=faults,
      records=train_records).as_numpy_iterator())
  # Placed once: the step takes it replicated (an executable takes arrays
  # already in its shardings).
  key = jax.device_put(jax.random.PRNGKey(config.seed), rep)
  eval_every, run_step, ahead = t.eval_every, step_fn, {}
  if perf is not None:
    perf.hyperparameters(len(train_records), len(eval_records))
    # Compilation belongs to initialisation: the loop runs these executables,
    # one per canvas, picked by the batch's image shape.
    ahead = compile_steps(config, abstract, step_fn, key, train_records.num_keypoints)
    run_step = lambda state, batch, key: ahead[batch["images"].shape[1:3]](state, batch, key)
    eval_every = perf.eval_interval()
    perf.run_start()

  logger = MetricLogger(workdir, is_main)
  for b in bad:
    logger.event(start, {"event": "corrupt_checkpoint", "corrupt_step": b.step,
                         "path": b.path, "moved_to": b.moved_to, "reason": b.reason})
  on_save_failure = t.get("checkpoint_failures", "stop")
  if on_save_failure not in ("stop", "warn"):
    raise SetupError(f"train.checkpoint_failures: expected 'stop' or 'warn', got "
                     f"{on_save_failure!r}")
  total = config.total_steps
  progress = tqdm.tqdm(total=total, initial=start, desc="train", unit="step",
                       disable=not is_main or not t.get("progress", True),
                       dynamic_ncols=True)
  pending, previous_run = [], None
  last_log, eval_metrics, step = time.time(), {}, start
  failed, reached = True, False
  try:
    for step in range(start + 1, total + 1):
      if perf is not None and ((step - 1) % eval_every == 0 or step == start + 1):
        block_first = step - 1  # a resumed run opens its first block where it resumes
        perf.block_start(block_first, min(eval_every - block_first % eval_every,
                                          total - block_first))
      _on_save_failure(checkpointer.check_saves, on_save_failure, logger, step - 1)
      host_batch = next(data)
      _check_records(faults, config.data.get("on_corrupt", "fail"), logger, step)
      batch = sharding.global_batch(host_batch, mesh)
      state, metrics = run_step(state, batch, key)
      pending.append(metrics)
      # Read the previous step's skip counter: one step behind keeps dispatch async.
      if previous_run is not None and int(previous_run) >= t.max_nonfinite:
        raise NonFiniteError(
            f"{t.max_nonfinite} steps in a row had a non-finite loss or gradient "
            f"(up to step {step - 1}); stopping. The last checkpoint "
            f"(step {checkpointer.latest_step()}) holds the last good parameters.")
      previous_run = metrics["nonfinite_run"]
      progress.update(1)

      if step % t.log_every == 0 or step == total:
        host = jax.device_get(pending)
        now = time.time()
        line = {k: float(np.mean([m[k] for m in host])) for k in host[0]
                if k != "nonfinite_run"}
        line["images_per_s"] = len(host) * config.batch_size / max(now - last_log, 1e-9)
        line["nonfinite_total"] = int(state.nonfinite_total)
        line["corrupt_records_skipped"] = len(faults)
        pending, last_log = [], now
        progress.set_postfix(loss=f"{line['loss']:.3f}")
        if is_main:
          progress.write(f"step {step}: {_format(line)}")
        try:
          logger.write(step, line, "train/")
        except LogWriteError:
          checkpointer.check_saves(block=True)  # a failed save (a full disk) is named first
          raise

      stopping = stop.requested(step)
      saved = step % t.checkpoint_every == 0 or step == total or stopping
      if saved:
        _on_save_failure(lambda: checkpointer.save(step, state, force=True),
                         on_save_failure, logger, step)
      if eval_every and (step % eval_every == 0 or step == total) and not stopping:
        if perf is not None:
          perf.block_stop(step, block_first)
          perf.eval_start(step)
        eval_metrics = _evaluate(model, state, config, mesh, workdir, logger, step,
                                 eval_records)
        checkpointer.save_best(step, state, eval_metrics)
        last_log = time.time()  # evaluation time is not training throughput
        if perf is not None and perf.eval_stop(step, eval_metrics):
          reached = True
          logging.info("MLPerf: box AP %.4f and mask AP %.4f reached the targets at step %d",
                       eval_metrics["bbox/AP"], eval_metrics["segm/AP"], step)
          if not saved:
            _on_save_failure(lambda: checkpointer.save(step, state, force=True),
                             on_save_failure, logger, step)
          break
      if stopping:
        logging.warning("stopped by signal at step %d; checkpoint saved", step)
        break
    if previous_run is not None and int(previous_run) >= t.max_nonfinite:
      raise NonFiniteError(f"{t.max_nonfinite} steps in a row had a non-finite loss or "
                           f"gradient at the end of the run; the last checkpoint is kept.")
    if perf is not None:
      seconds = perf.run_stop(reached, step)
      if is_main:
        print(f"MLPerf: run_stop {'success' if reached else 'aborted'} at step {step}: "
              f"{seconds / 60:.2f} min from run_start" + (" (time to target)" if reached else ""))
    # One compiled program per canvas is the static-shape contract (DESIGN.md).
    compilations = step_fn._cache_size() + len(ahead)  # + ahead of time
    logger.write(step, {"step_compilations": compilations}, "train/")
    logging.info("train step compiled %d time(s)", compilations)
    _on_save_failure(checkpointer.wait, on_save_failure, logger, step)  # the last save
    failed = False
  finally:
    progress.close()
    if failed:  # already failing: what went wrong is reported, not a second error
      checkpointer.abandon()
    else:
      checkpointer.close()
    logger.close(quiet=failed)
    if perf is not None:
      perf.close()
  return eval_metrics


def _on_save_failure(call, on_failure: str, logger, step: int) -> None:
  """Runs ``call`` (a save, or a check of the one in flight); a ``SaveError`` is
  raised (``train.checkpoint_failures="stop"``) or logged, also in metrics.jsonl,
  and training goes on ("warn"; the next save tries again)."""
  try:
    call()
  except checkpointing.SaveError as e:
    if on_failure == "stop":
      raise
    logging.warning("%s; training goes on (train.checkpoint_failures=warn)", e)
    logger.event(step, {"event": "checkpoint_save_failed", "reason": str(e)})


def _check_records(faults, on_corrupt: str, logger, step: int) -> None:
  """Records the pipeline dropped as corrupt: stop (``data.on_corrupt="fail"``) or
  log each, in metrics.jsonl too (the count goes with every metric line)."""
  for description in faults.new():
    if on_corrupt != "skip":
      raise records_lib.CorruptRecordError(
          f"corrupt record in {description} (data.on_corrupt=skip skips such records)")
    logging.warning("skipped corrupt record %s", description)
    logger.event(step, {"event": "corrupt_record_skipped", "record": description})


def _agree(ok: bool) -> bool:
  """True when ``ok`` on every process (one process's bad read fails all)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _restore(checkpointer, abstract, workdir: str, total_steps: int):
  """(step, state, bad checkpoints) from the newest checkpoint that restores.

  Newest first: a checkpoint whose metadata cannot be read, whose parameter
  shapes do not fit, or whose arrays cannot be read is passed over; once an
  older one restores, each passed-over one is renamed to ``<step>.corrupt``
  (process 0; never deleted), warned about, and returned for metrics.jsonl.
  Every process takes the same decisions (``_agree``). None valid: a
  ``SetupError`` where they merely do not fit this config (nothing renamed),
  else a ``CheckpointError`` naming each. (step, None, ...) when the newest
  valid step is at ``total_steps`` already (nothing read). (None, None, [])
  for a fresh workdir.
  """
  bad, found = [], None
  for step in sorted(checkpointer.all_steps(), reverse=True):
    why = checkpointer.problem(step, abstract)
    if _agree(why is None):
      if step >= total_steps and not bad:
        return step, None, []
      state, why = checkpointer.try_restore(abstract, step)
      if _agree(why is None):
        found = (step, state)
        break
    bad.append(checkpointing.BadCheckpoint(step, checkpointer.step_dir(step),
                                           why or "cannot be read on another process"))
  if found is None:
    if not bad:
      return None, None, []
    misfit = next((b for b in bad if b.reason.startswith("misfit: ")), None)
    if misfit is not None:
      checkpointer.close()
      raise SetupError(
          f"--workdir {workdir}: its checkpoint at step {misfit.step} does not fit this config "
          f"({misfit.reason[len('misfit: '):]}); resume with the config it was trained with "
          f"(its config.json) or choose a new --workdir")
    checkpointer.close()
    raise checkpointing.CheckpointError(
        f"--workdir {workdir}: no checkpoint can be restored: " + "; ".join(
            f"step {b.step} ({b.path}): {b.reason}" for b in bad)
        + "; move them aside or choose a new --workdir")
  for b in bad:
    b.moved_to = checkpointer.move_aside(b.step)
    logging.warning("checkpoint at step %d (%s) is unusable: %s; moved to %s, resuming from step %d",
                    b.step, b.path, b.reason, b.moved_to, found[0])
  if bad:
    if jax.process_count() > 1:  # the renames are done before anyone lists the directory
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoints moved aside")
    checkpointer.reload()
  return found[0], found[1], bad


def _evaluate(model, state, config, mesh, workdir, logger, step, records):
  variables = {"params": state.params, **state.model_state}
  metrics = evaluate_lib.evaluate(model, variables, config, mesh,
                                  max_steps=config.train.get("eval_steps") or None,
                                  records=records)
  logger.write(step, metrics, "eval/")
  if jax.process_index() == 0:
    evaluate_lib.write_metrics(workdir, metrics, step)
  return metrics


def _load_initialisation(state: TrainState, config, sharding_) -> TrainState:
  """Overwrites parameters (and norm statistics) from ``config.init_checkpoint``.

  ``config.init_keep`` selects what is taken: "all", "backbone" (the
  backbone only; in the C4 design also the box head's res5 stage, from the
  file's ``backbone/layer4`` as detectron2 initialises it), or
  "no_predictors" (everything except class-count-dependent layers).
  """
  loaded = checkpointing.load_variables(config.init_checkpoint)
  keep = config.get("init_keep", "all")
  class_specific = ("cls_score", "bbox_pred", "predictor", "score_lowres")

  def pick(path, current):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    if keep == "backbone" and names[1:3] == ("box_head", "res5"):
      names = (names[0], "backbone", "layer4") + names[3:]
    elif keep == "backbone" and names[1:2] != ("backbone",):
      return current
    if keep == "no_predictors" and any(n in class_specific for n in names):
      return current
    node = loaded
    for n in names:
      if not isinstance(node, dict) or n not in node:
        raise KeyError(f"{config.init_checkpoint}: no tensor {'/'.join(names)}")
      node = node[n]
    if node.shape != current.shape:
      raise ValueError(f"{config.init_checkpoint}: {'/'.join(names)} has shape "
                       f"{node.shape}, the model needs {current.shape}")
    return jax.device_put(np.asarray(node, current.dtype), sharding_)

  variables = {"params": state.params, **state.model_state}
  variables = jax.tree_util.tree_map_with_path(pick, variables)
  params = variables.pop("params")
  logging.info("initialised from %s (%s)", config.init_checkpoint, keep)
  return state.replace(params=params, model_state=variables)


# ------------------------------------------------------------------ CLI
def _define_flags():
  """CLI flags, defined only when this module is the program."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs."),
      "coordinator_address": flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0 (multi-host runs)."),
      "num_processes": flags.DEFINE_integer("num_processes", None,
                                            "Processes in a multi-host run."),
      "process_id": flags.DEFINE_integer("process_id", None, "This process's index."),
      "compile_only": flags.DEFINE_bool(
          "compile_only", False, "Only compile the initialisation and the train step of "
          "every canvas (into JAX_COMPILATION_CACHE_DIR when set; see compile_programs) and exit; "
          "reads no data and writes nothing to --workdir."),
  }


def main(argv, args):
  del argv
  config, workdir = args["config"].value, args["workdir"].value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  checkpointing.quiet_orbax_logs()
  checkpointing.quiet_failed_save_aftermath()
  sharding.initialize_distributed(args["coordinator_address"].value,
                                  args["num_processes"].value, args["process_id"].value)
  try:
    canvas_lib.canvas_sizes(config)  # a bad canvas setting is named before anything runs
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    if args["compile_only"].value:
      compile_programs(config)
    else:
      train_and_evaluate(config, workdir)
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except (checkpointing.SaveError, LogWriteError) as e:
    print(f"train: {e}", file=sys.stderr)
    return 4
  except (FileNotFoundError, build.DataMismatchError, SetupError, storage.UnreachableError,
          checkpointing.CheckpointError, records_lib.CorruptRecordError,
          records_lib.SourceError) as e:  # e.g. no data
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  _args = _define_flags()
  app.run(functools.partial(main, args=_args))
