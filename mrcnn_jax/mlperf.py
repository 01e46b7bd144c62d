"""MLPerf Training time-to-accuracy mode: WORKDIR/mlperf.log through mlperf-logging's mllog.

    python -m mrcnn_jax.train --config=configs/coco_mask_rcnn_r50_fpn_1x.py --workdir=DIR \\
        --config.mlperf.enabled=True --config.mlperf.division=closed \\
        --config.mlperf.org=ORG --config.mlperf.platform=SYSTEM
    python -m mlperf_logging.compliance_checker --usage training --ruleset 3.1.0 DIR/mlperf.log

The run's shape is MLPerf's Mask R-CNN rules (mlcommons/training_policies):
``init_start`` at the start of ``train_and_evaluate``, the model initialised
and its train step compiled (``train.py``), ``init_stop`` and ``run_start``,
then blocks of training, each followed by an evaluation on the whole eval
split (every epoch, or every ``mlperf.eval_every_steps``), and ``run_stop``
with status "success" at the first evaluation whose box and mask AP both
reach ``target_bbox_ap`` / ``target_segm_ap`` (MLPerf's 0.377 / 0.339), or
"aborted" when ``total_steps`` ends the run first. Epochs are counted in
images: step s has seen ``s * batch_size / train_samples`` epochs. Only
process 0 writes the log.

The hyperparameter keys: ``num_image_candidates`` is the RPN's post-NMS
proposals per image in training, ``min_image_size`` / ``max_image_size``
the canvas's sides (images are fitted into the canvas).
"""

import logging
import math
import os
import time
from typing import Dict, Optional

import ml_collections

from mrcnn_jax import optim


def mlperf_config(**overrides) -> ml_collections.ConfigDict:
  """``config.mlperf``: off by default; see the module docstring."""
  cfg = ml_collections.ConfigDict({
      "enabled": False,
      "division": "open",  # "closed" or "open"
      "status": "research",  # submission_status: cloud, onprem, preview, research
      "org": "mrcnn_jax",
      "platform": "",  # default: the devices, e.g. "8xcpu"
      "eval_every_steps": 0,  # 0: every epoch
      "target_bbox_ap": 0.377, "target_segm_ap": 0.339,
  })
  cfg.update(overrides)
  return cfg


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key for an MLPerf setting that cannot run."""
  p = config.mlperf
  if p.division not in ("closed", "open"):
    raise ValueError(f"mlperf.division: expected 'closed' or 'open', got {p.division!r}")
  if p.status not in ("cloud", "onprem", "preview", "research"):
    raise ValueError(f"mlperf.status: expected cloud, onprem, preview or research, got "
                     f"{p.status!r}")
  if not config.model.mask_head.enabled:
    raise ValueError("mlperf.enabled: MLPerf's Mask R-CNN scores box and mask AP; "
                     "model.mask_head.enabled is False")
  if config.train.get("eval_steps"):
    raise ValueError(f"mlperf.enabled: MLPerf scores the whole eval set; train.eval_steps="
                     f"{config.train.eval_steps} evaluates only part of it (set it to 0)")
  if p.eval_every_steps < 0:
    raise ValueError(f"mlperf.eval_every_steps: expected >= 0, got {p.eval_every_steps}")


class MLPerfRun:
  """The mllog events of one run (a no-op on processes other than 0)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, enabled: bool):
    # pylint: disable=g-import-not-at-top
    from mlperf_logging.mllog import constants, mllog
    self.c = constants
    self.config, self.enabled = config, enabled
    self.batch_size = config.batch_size
    self.train_samples = 0
    self._start_time = None
    self._handler = self._logger = None
    if enabled:
      # Its own logger, not mllog's shared one: nothing else reaches the file.
      self._logger = logging.getLogger(f"mrcnn_jax.mlperf.{id(self)}")
      self._logger.propagate = False
      self._logger.setLevel(logging.INFO)
      self._handler = logging.FileHandler(os.path.join(workdir, "mlperf.log"))
      self._logger.addHandler(self._handler)
      self.log = mllog.MLLogger(logger=self._logger, default_stack_offset=2)
    # The first events: the run's timer starts with init_start.
    self._event("cache_clear", True)
    self._start("init_start")

  def _event(self, key, value=None, metadata=None):
    if self.enabled:
      self.log.event(key=key, value=value, metadata=metadata)

  def _start(self, key, metadata=None):
    if self.enabled:
      self.log.start(key=key, value=None, metadata=metadata)

  def _end(self, key, metadata=None):
    if self.enabled:
      self.log.end(key=key, value=None, metadata=metadata)

  def submission(self, platform: str) -> None:
    p, c = self.config.mlperf, self.c
    self._event(c.SUBMISSION_BENCHMARK, c.MASKRCNN)
    self._event(c.SUBMISSION_ORG, p.org)
    self._event(c.SUBMISSION_DIVISION, p.division)
    self._event(c.SUBMISSION_STATUS, p.status)
    self._event(c.SUBMISSION_PLATFORM, p.platform or platform)

  def hyperparameters(self, train_samples: int, eval_samples: int) -> None:
    """The global batch, dataset sizes and Mask R-CNN's hyperparameter keys."""
    cfg, c = self.config, self.c
    o, canvas = cfg.optim, cfg.data.canvas_size
    self.train_samples = train_samples
    self._event(c.GLOBAL_BATCH_SIZE, cfg.batch_size)
    self._event(c.GRADIENT_ACCUMULATION_STEPS, 1)
    self._event(c.TRAIN_SAMPLES, train_samples)
    self._event(c.EVAL_SAMPLES, eval_samples)
    # The optimiser's own schedule settings (optim.learning_rate reads the same).
    self._event(c.OPT_BASE_LR, optim.base_lr(cfg))
    self._event(c.OPT_LR_WARMUP_STEPS, optim.warmup_steps(cfg))
    self._event(c.OPT_LR_WARMUP_FACTOR, float(o.warmup_factor))
    decay = optim.decay_steps(cfg)
    self._event(c.OPT_LR_DECAY_FACTOR, float(o.decay_factor) if decay else 0.0)
    self._event(c.OPT_LR_DECAY_STEPS, decay)
    self._event(c.NUM_IMAGE_CANDIDATES, int(cfg.model.rpn.post_nms_topk_train))
    self._event(c.MIN_IMAGE_SIZE, int(min(canvas)))
    self._event(c.MAX_IMAGE_SIZE, int(max(canvas)))

  def eval_interval(self) -> int:
    """Steps between evaluations: ``eval_every_steps``, else one epoch (rounded up)."""
    every = self.config.mlperf.eval_every_steps
    return every or max(1, math.ceil(self.train_samples / self.batch_size))

  def epoch(self, step: int) -> float:
    """Epochs seen after ``step`` steps (a whole number at epoch boundaries)."""
    e = step * self.batch_size / max(self.train_samples, 1)
    return int(e) if float(e).is_integer() else e

  def run_start(self) -> None:
    """Initialisation (compilation included) is over: the timed run starts."""
    self._end(self.c.INIT_STOP)
    self._start(self.c.RUN_START)
    self._start_time = time.time()

  def block_start(self, step: int, steps: int) -> None:
    """``steps`` training steps after ``step`` until the next evaluation."""
    epochs = steps * self.batch_size / max(self.train_samples, 1)
    self._start(self.c.BLOCK_START, {"first_epoch_num": self.epoch(step),
                                     "epoch_count": epochs, "step_num": step})
    self._start(self.c.EPOCH_START, {"epoch_num": self.epoch(step)})

  def block_stop(self, step: int, first_step: int) -> None:
    self._end(self.c.EPOCH_STOP, {"epoch_num": self.epoch(first_step)})
    self._end(self.c.BLOCK_STOP, {"first_epoch_num": self.epoch(first_step), "step_num": step})

  def eval_start(self, step: int) -> None:
    self._start(self.c.EVAL_START, {"epoch_num": self.epoch(step), "step_num": step})

  def eval_stop(self, step: int, metrics: Dict[str, float]) -> bool:
    """Logs the accuracy; True when both targets are reached."""
    epoch = self.epoch(step)
    self._end(self.c.EVAL_STOP, {"epoch_num": epoch, "step_num": step})
    bbox, segm = float(metrics["bbox/AP"]), float(metrics["segm/AP"])
    self._event(self.c.EVAL_ACCURACY, {"BBOX": bbox, "SEGM": segm},
                {"epoch_num": epoch, "step_num": step})
    p = self.config.mlperf
    return bbox >= p.target_bbox_ap and segm >= p.target_segm_ap

  def run_stop(self, success: bool, step: int) -> Optional[float]:
    """Ends the run; returns the seconds from run_start (the time to target on success)."""
    status = self.c.SUCCESS if success else self.c.ABORTED
    self._end(self.c.RUN_STOP, {"status": status, "epoch_num": self.epoch(step)})
    return None if self._start_time is None else time.time() - self._start_time

  def close(self) -> None:
    if self._handler is not None:
      self._logger.removeHandler(self._handler)
      self._handler.close()
