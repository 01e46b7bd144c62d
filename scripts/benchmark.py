"""Speed of the train and inference steps of any config: one command, JSON out.

    python scripts/benchmark.py                    # R50-FPN, batch 2, 512x512, float32, 512 RoIs
    python scripts/benchmark.py --vs-torchvision   # + torchvision's Mask R-CNN, interleaved
    python scripts/benchmark.py --sweep            # + canvas / RoIs / batch scaling sweep
    python scripts/benchmark.py --dtype=bfloat16 --output=bench_bf16.json
    python scripts/benchmark.py --dtype=bfloat16 --vs-torchvision --torchvision_autocast=bfloat16
    python scripts/benchmark.py --config=configs/shapes.py:tiny --canvas=128 --batch_size=8
    python scripts/benchmark.py --config.model.rpn.post_nms_topk_train=500 --steps=10

The config comes from ``--config`` (default configs/coco_mask_rcnn_r50_fpn_1x.py)
and ``--config.a.b=v`` overrides, as for the train CLI; then ``--batch_size``
(2) and ``--canvas`` (512) replace the config's, and ``--dtype``, ``--rois``
(sampled RoIs per image; the mask RoIs follow as rois * positive_fraction)
and ``--mask_rois`` replace it where given. Flags may be spelt with - or _.

Inputs are random: normal images and ``--gt_instances`` ground-truth boxes
per image (sides 6-40% of the canvas, random classes) with an ellipse mask
each. Both heads' costs follow the foreground: torchvision's mask head runs
on the sampled foreground RoIs, ours over chunks of its ``num_mask_rois``
slots that skip the empty ones (``model.roi.head_chunk_size``; 0 runs every
slot). By default every image gets as many instances as its foreground quota
(rois * positive_fraction: 512 * 25% = 128), raising ``data.max_instances``
where needed: ground-truth boxes are candidates too, so each side then
samples exactly its full quota of foreground RoIs; ``--gt_instances=7`` is a
COCO-like image. (With random weights the proposals almost never overlap an
object: measured at R50-FPN 512, 20 instances gave 21 foreground RoIs per
image on both sides.) FLOPs come from XLA's cost analysis, which counts a
loop body once and a conditional's costlier branch; with chunked heads the
train step's figure counts the chunks that ran (``executed_flops``), the
raw figure stays in ``gflop_per_step_xla_cost_analysis``.
Inference runs on the initial weights of both sides (see DIFFERENCES).

JSON keys (also printed as a table on stderr):
  settings       config, overrides, shapes, device, versions, load average.
  peak           GFLOP/s of a large matmul measured in this run (float32, the
                 compute dtype and torchvision's autocast dtype; float32
                 accumulation, as the model's matmuls); on GPU/TPU also the
                 device kind's nominal peak, which is then what utilisation is
                 against.
  train          ``mrcnn_jax.train.train_step`` jitted as the trainer does
                 (optimiser included): trace+lower and XLA compile seconds,
                 compilations of the step over the run, step seconds over
                 ``--steps`` after ``--warmup`` (median, IQR, min, max),
                 images/s, FLOPs from ``compiled.cost_analysis()``, achieved
                 GFLOP/s, utilisation, XLA's buffer sizes, the losses.
  inference      ``mrcnn_jax.evaluate.detect_step``: compile seconds, latency
                 at batch 1, images/s at ``--infer_batch``, FLOPs.
  memory         host peak RSS (getrusage) after our train steps and at the
                 end, device ``memory_stats()`` where the backend has them.
  stages         the step as separately jitted pieces (scripts/benchmark_stages.py
                 says what each covers), their sum and the rest of the step.
  op_profile     (--op_profile=N) the train step's N most expensive XLA ops in
                 one ``jax.profiler`` trace (scripts/op_profile.py): HLO
                 instruction, the JAX op it came from (its name stack: module
                 path and primitive) and ms per step, summed over the threads
                 that ran it.
  ops            roi_align forward+backward and nms alone, ours vs torchvision.ops.
  data_pipeline  tf.data input images/s at this canvas and batch
                 (scripts/benchmark_data.py), next to the train step's.
  dtype_check    one batch's losses in float32 and bfloat16 with the same
                 parameters, key and inputs, and their relative differences.
  torchvision    (--vs-torchvision) the same figures for torchvision's
                 MaskRCNN built to match (scripts/benchmark_torchvision.py),
                 steps alternating with ours, ratios ours/theirs, and the
                 list of what still differs.
  targets        the issue's goals with their values; reported, never asserted.
  sweep          (--sweep) step cost over canvas, RoIs per image and batch;
                 the point with the run's own settings reuses the main
                 measurement ("measured_in").
"""

import copy
import functools
import gc
import json
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

try:  # torch(vision) before TensorFlow (mrcnn_jax.data): the other order segfaults.
  import torch
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  torch = None

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
sys.path[:0] = [ROOT, SCRIPTS]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import machine  # noqa: E402  (scripts/machine.py)
from mrcnn_jax import evaluate, optim, sharding, train  # noqa: E402
from mrcnn_jax.modeling import build  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "coco_mask_rcnn_r50_fpn_1x.py"),
    "Experiment config file.", lock_config=True)
FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 2, "Train batch size (replaces the config's).")
flags.DEFINE_integer("canvas", 512, "Square canvas side (replaces data.canvas_size).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: config's).")
flags.DEFINE_integer("rois", None, "Sampled RoIs per image (default: config's).")
flags.DEFINE_integer("mask_rois", None, "RoIs per image for the mask head "
                     "(default: config's, or rois * positive_fraction with --rois).")
flags.DEFINE_integer("gt_instances", None, "Ground-truth instances per benchmark image "
                     "(default: the foreground quota, rois * positive_fraction).")
flags.DEFINE_integer("steps", 5, "Timed train steps.")
flags.DEFINE_integer("warmup", 1, "Untimed train steps after compiling (with --vs-torchvision, "
                     "again for both sides once torchvision is set up).")
flags.DEFINE_integer("infer_batch", 4, "Batch size of the inference throughput figure.")
flags.DEFINE_integer("infer_steps", 5, "Timed inference calls per batch size.")
flags.DEFINE_integer("stage_repeats", 3, "Timed calls per stage piece.")
flags.DEFINE_bool("stages", True, "Stage breakdown of the train step.")
flags.DEFINE_integer("op_profile", 0, "List the train step's N most expensive XLA ops from a "
                     "profiler trace of one step (0: off).")
flags.DEFINE_bool("ops", True, "roi_align and nms against torchvision.ops (needs torch).")
flags.DEFINE_bool("data", True, "Input pipeline throughput.")
flags.DEFINE_integer("data_images", 32, "Images in the input pipeline's synthetic set.")
flags.DEFINE_integer("data_steps", 20, "Timed input batches.")
flags.DEFINE_bool("dtype_check", True, "float32 vs bfloat16 losses on one batch.")
flags.DEFINE_bool("vs_torchvision", False, "Also run torchvision's MaskRCNN, interleaved.")
flags.DEFINE_enum("torchvision_autocast", None, ["bfloat16"],
                  "Run torchvision's side under torch.autocast in this dtype (its mixed "
                  "precision; compare with --dtype=bfloat16).")
flags.DEFINE_bool("sweep", False, "Scaling sweep over canvas, RoIs and batch.")
flags.DEFINE_list("sweep_canvas", ["256", "512", "768", "1024"], "Sweep canvas sides.")
flags.DEFINE_list("sweep_rois", ["128", "256", "512"], "Sweep RoIs per image.")
flags.DEFINE_list("sweep_batch", ["1", "2", "4"], "Sweep batch sizes.")
flags.DEFINE_integer("sweep_steps", 2, "Timed steps per sweep point (after one warm-up).")
flags.DEFINE_integer("peak_n", None, "Side of the peak-measuring matmul "
                     "(default 4096 on CPU, 8192 otherwise).")
flags.DEFINE_string("output", None, "Write the JSON here instead of stdout.")

# Nominal dense peaks in TFLOP/s (float32, bfloat16) by device_kind prefix.
# float32 is what XLA's default precision runs: TF32 tensor cores on Ampere
# and later GPUs, one bfloat16 MXU pass on TPUs.
NOMINAL_TFLOPS = {
    "NVIDIA H100 80GB HBM3": (494.7, 989.4), "NVIDIA H100 PCIe": (378.0, 756.0),
    "NVIDIA H200": (494.7, 989.4), "NVIDIA A100": (156.0, 312.0), "NVIDIA L4": (60.0, 121.0),
    "Tesla V100": (15.7, 125.0), "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0), "TPU v5": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0),
}
GOALS = {  # the targets: name -> (comparison, bound); the bf16 bound is ours
    "train_step_vs_torchvision": ("<=", 0.85), "inference_latency_vs_torchvision": ("<=", 0.7),
    "utilisation": (">=", 0.6), "train_step_compilations": ("==", 1),
    "train_step_compile_s": ("<=", 60.0), "bf16_loss_rel_diff": ("<=", 0.02),
}
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def log(msg: str) -> None:
  print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class CompileCounter:
  """Counts XLA backend compilations (every jitted function) through jax.monitoring."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, name, secs, **kwargs):
    del secs, kwargs
    if name == BACKEND_COMPILE:
      self.count += 1


def spread(seconds: List[float]) -> Dict[str, float]:
  s = np.asarray(seconds)
  q1, q3 = np.percentile(s, [25, 75])
  return {"median": float(np.median(s)), "iqr": float(q3 - q1), "min": float(s.min()),
          "max": float(s.max()), "n": len(s)}


def host_peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def device_memory() -> Optional[Dict]:
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return None
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k.replace("bytes", "mib"): stats[k] / 2 ** 20 for k in keys if k in stats}


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def compile_timed(jitted, *args):
  """(compiled, {trace_lower_s, xla_compile_s, compile_s}); fills ``jitted``'s cache."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  mid = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  return compiled, {"trace_lower_s": mid - start, "xla_compile_s": end - mid,
                    "compile_s": end - start}


def measure_peak(dtype: str) -> float:
  """GFLOP/s of the best of a few large square matmuls in ``dtype``, accumulating in
  float32 (the model's recipe: conv.accumulating_dot_general)."""
  on_cpu = jax.default_backend() == "cpu"
  n, repeats = (4096, 3) if on_cpu else (8192, 10)
  n = FLAGS.peak_n or n
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), getattr(jnp, dtype)) for i in (1, 2))
  f = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def nominal_peak(dtype: str) -> Optional[float]:
  kind = jax.devices()[0].device_kind
  matches = [k for k in NOMINAL_TFLOPS if kind.startswith(k)]
  if jax.default_backend() == "cpu" or not matches:
    return None
  return 1000 * NOMINAL_TFLOPS[max(matches, key=len)][dtype == "bfloat16"]


# ------------------------------------------------------------------ config and inputs
def configure(config, batch_size: int, canvas: int, dtype=None, rois=None, mask_rois=None):
  """A copy of ``config`` with the benchmark's settings (max_instances fits gt_count)."""
  config = copy.deepcopy(config)
  config.batch_size = batch_size
  config.data.update(canvas_size=(canvas, canvas), canvas_sizes=())
  roi = config.model.roi
  if dtype:
    config.model.dtype = dtype
  if rois:
    roi.batch_size_per_image = rois
    roi.num_mask_rois = int(round(rois * roi.positive_fraction))
  if mask_rois:
    roi.num_mask_rois = mask_rois
  config.data.max_instances = max(config.data.max_instances, gt_count(config))
  return config


def gt_count(config) -> int:
  """Ground-truth instances per image: --gt_instances, else the foreground quota."""
  roi = config.model.roi
  return FLAGS.gt_instances or int(round(roi.batch_size_per_image * roi.positive_fraction))


def ellipse(size: int) -> np.ndarray:
  """``[size, size]`` ellipse inscribed in a box, sampled at cell centres."""
  u = (np.arange(size) + 0.5) / size - 0.5
  return ((u[:, None] ** 2 + u[None, :] ** 2) <= 0.25).astype(np.float32)


def make_batch(config, batch_size: int, instances: int, seed: int) -> Dict:
  """A training batch (``train.dummy_batch`` layout) with random images and instances."""
  rng = np.random.default_rng(seed)
  batch = train.dummy_batch(config, batch_size)
  h, w = config.data.canvas_size
  n = min(instances, config.data.max_instances)
  if n < instances:
    raise ValueError(f"{instances} instances do not fit max_instances={n}")
  batch["images"] = rng.normal(size=batch["images"].shape).astype(np.float32)
  batch["image_info"]["image_id"] = np.arange(batch_size, dtype=np.int32)
  extent = np.array([w, h], np.float32)
  size = rng.uniform(0.06, 0.4, (batch_size, n, 2)) * extent
  xy = rng.uniform(0, 1, (batch_size, n, 2)) * (extent - size)
  batch["gt_boxes"][:, :n] = np.concatenate([xy, xy + size], -1)
  batch["gt_classes"][:, :n] = rng.integers(0, config.model.num_classes, (batch_size, n))
  batch["gt_valid"][:, :n] = True
  batch["gt_masks"][:, :n] = ellipse(config.data.mask_size)
  kp = batch["gt_keypoints"]
  if kp.shape[2]:
    kp[:, :n, :, :2] = xy[:, :, None] + rng.uniform(size=(batch_size, n, kp.shape[2], 2)) * \
        size[:, :, None]
    kp[:, :n, :, 2] = 2
  return batch


# ------------------------------------------------------------------ our model
class Ours:
  """Our train step and detect step, jitted and sharded as the trainer and evaluator do."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    # The trainer's and evaluator's own jitted programs (shardings, donation, mesh).
    self.model, _, _, init, self.step_fn = train._programs(config, mesh)
    self.state = init(jax.random.PRNGKey(config.seed))
    self.detect_fn = evaluate._jitted_detect(self.model, mesh)
    self.key = jax.random.PRNGKey(config.seed)

  def put(self, batch):
    return sharding.global_batch(batch, self.mesh)

  def compile_train(self, batch):
    compiled, times = compile_timed(self.step_fn, self.state, batch, self.key)
    self.train_compiled = compiled  # its HLO text names the ops for --op_profile
    mem = compiled.memory_analysis()
    buffers = None if mem is None else {
        k.replace("_in_bytes", "_mib"): getattr(mem, k) / 2 ** 20
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes")}
    return {**times, "flops": flops_of(compiled), "xla_buffers": buffers}

  def train_step(self, batch):
    """(seconds, host metrics) of one step, synchronised."""
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, batch, self.key)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start, jax.device_get(metrics)

  def inference_variables(self):
    """The initial variables (a copy: the state is donated) with +10 on foreground
    class 0's logit bias (see DIFFERENCES)."""
    def bias(path, x):
      names = [getattr(k, "key", str(k)) for k in path]
      return x.at[0].add(10.0) if names[-2:] == ["cls_score", "bias"] else jnp.copy(x)
    return jax.tree_util.tree_map_with_path(
        bias, {"params": self.state.params, **self.state.model_state})

  def compile_detect(self, variables, batch):
    compiled, times = compile_timed(self.detect_fn, variables, batch)
    return {**times, "flops": flops_of(compiled)}

  def detect(self, variables, batch):
    start = time.perf_counter()
    out = jax.block_until_ready(self.detect_fn(variables, batch))
    return time.perf_counter() - start, out


def executed_flops(config, mesh, ours, batch, fg_rois_per_image: float) -> Dict:
  """The train step's FLOPs with the chunked heads counted as they ran.

  XLA's cost analysis counts a loop body once and a conditional's costlier
  branch, so the chunked step's figure holds one chunk of the heads whatever
  the occupancy. Both programs' lowered cost analyses (chunked, and every
  slot: ``head_chunk_size=0``) give one chunk's FLOPs; the step ran
  ``ceil(real slots / chunk)`` chunks per device, real slots =
  min(foreground RoIs, mask slots) per image (the mask head's occupancy; a
  keypoint head, if any, is assumed to run as many chunks).
  """
  roi = config.model.roi
  chunk = roi.head_chunk_size
  slots = min(roi.num_mask_rois, roi.batch_size_per_image)
  if not config.model.mask_head.enabled:
    slots = 0
  local = config.batch_size // sharding.data_size(mesh)
  if not chunk or not slots:
    return {}
  every_config = copy.deepcopy(config)
  every_config.model.roi.head_chunk_size = 0
  _, abstract, _, _, every_step = train._programs(  # pylint: disable=protected-access
      every_config, mesh)
  key = jax.random.PRNGKey(0)
  lowered = lambda fn, state: flops_of(fn.lower(state, batch, key))
  chunked, every = lowered(ours.step_fn, ours.state), lowered(every_step, abstract)
  chunks = -(-local * slots // chunk)
  size = -(-local * slots // chunks)  # chunked.run's even split
  ran = -(-int(round(local * min(fg_rois_per_image, slots))) // size)
  per_chunk = (every - chunked) / max(chunks - 1, 1)
  return {"gflop_per_step": (chunked + (ran - 1) * per_chunk) / 1e9,
          "gflop_every_slot": every / 1e9, "head_chunks_run": ran, "head_chunks": chunks}


def measure_train_point(config, mesh, steps: int) -> Dict:
  """Compile + one warm-up + ``steps`` timed steps of ``config`` (the sweep's unit)."""
  ours = Ours(config, mesh)
  batch = ours.put(make_batch(config, config.batch_size, gt_count(config), 0))
  info = ours.compile_train(batch)
  ours.train_step(batch)
  times = [ours.train_step(batch)[0] for _ in range(steps)]
  del ours
  gc.collect()
  median = float(np.median(times))
  return {"compile_s": info["compile_s"], "step_s": median, "gflop": info["flops"] / 1e9,
          "images_per_s": config.batch_size / median}


# ------------------------------------------------------------------ sections
def dtype_check(config, state, batch, key) -> Dict:
  """Losses of one batch in float32 and bfloat16: same parameters, inputs and key.

  The proposals come from each dtype's own RPN outputs, so the sampled RoIs
  may differ a little: single terms over few RoIs (loss_box_reg) move more
  than the total, which is what the target reads.
  """
  variables = {"params": state.params, **state.model_state}
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c = copy.deepcopy(config)
    c.model.dtype = dtype
    model = build.build_model(c)
    fn = jax.jit(lambda v, b, k, model=model: model.apply(
        v, b["images"], b["image_info"], {n: x for n, x in b.items() if n.startswith("gt_")},
        k, train=True, method="losses", mutable=list(state.model_state))[0][0])
    losses[dtype] = {k: float(v) for k, v in jax.device_get(fn(variables, batch, key)).items()}
  f32, bf16 = losses["float32"], losses["bfloat16"]
  rel = {k: abs(bf16[k] - f32[k]) / max(abs(f32[k]), 1e-12) for k in f32}
  return {**losses, "rel_diff": rel, "max_rel_diff": max(rel.values())}


def data_pipeline(config) -> Dict:
  """Input pipeline images/s at this canvas and batch (scripts/benchmark_data.py)."""
  import argparse  # pylint: disable=g-import-not-at-top
  import benchmark_data  # pylint: disable=g-import-not-at-top
  directory = tempfile.mkdtemp(prefix="benchmark_")
  try:
    tf_dir = benchmark_data.build(directory, FLAGS.data_images)
    args = argparse.Namespace(batch_size=config.batch_size, canvas=config.data.canvas_size[0],
                              channel_order=config.data.channel_order, scale_range=None)
    seconds = benchmark_data.time_pipeline(benchmark_data.make_config(tf_dir, args),
                                           FLAGS.data_steps, warmup=3)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  return {"images_per_s": FLAGS.data_steps * config.batch_size / seconds,
          "setting": f"{FLAGS.data_images} synthetic 640x480 JPEGs -> "
                     f"{config.batch_size} x {config.data.canvas_size[0]}^2, 28x28 masks, flip"}


def stage_breakdown(ours, batch, step_s: float) -> Dict:
  import benchmark_stages  # pylint: disable=g-import-not-at-top
  if ours.model.fpn is None:
    return {"skipped": "C4 design: no stage breakdown"}
  pieces = benchmark_stages.breakdown(ours.model, ours.state, batch, ours.key,
                                      FLAGS.stage_repeats)
  total = sum(p["ms"] for p in pieces.values())
  for p in pieces.values():
    p["share_of_step"] = p["ms"] / (1000 * step_s)
  out = {"pieces": pieces, "sum_ms": total, "step_ms": 1000 * step_s,
         "rest_ms": 1000 * step_s - total}
  if ours.model.roi_heads.keypoint_head is not None:
    out["note"] = "the keypoint head is not among the pieces: its time is in rest_ms"
  return out


def sweep(config, mesh, main: Dict) -> List[Dict]:
  """One row per (axis, value); ``main`` is the run's train-step result, which
  is reused for the point with the run's own settings rather than compiled again."""
  base = {"canvas": FLAGS.canvas, "rois": config.model.roi.batch_size_per_image,
          "batch": FLAGS.batch_size}
  done = {tuple(base.values()): {
      "compile_s": main["compile_s"], "step_s": main["step_s"]["median"],
      "gflop": main["gflop_per_step"], "images_per_s": main["images_per_s"],
      "measured_in": "main run"}}
  rows = []
  for axis, values in (("canvas", FLAGS.sweep_canvas), ("rois", FLAGS.sweep_rois),
                       ("batch", FLAGS.sweep_batch)):
    for v in map(int, values):
      point = {**base, axis: v}
      key = tuple(point.values())
      if key not in done:
        log(f"sweep {point}")
        # Only the RoI axis moves the mask RoIs (rois * positive_fraction).
        c = configure(config, point["batch"], point["canvas"],
                      rois=point["rois"] if axis == "rois" else None)
        done[key] = {**measure_train_point(c, mesh, FLAGS.sweep_steps), "measured_in": "sweep"}
      rows.append({"axis": axis, **point, **done[key]})
  return rows


# ------------------------------------------------------------------ the run
def run(config, overrides: List[str]) -> Dict:
  counter = CompileCounter()
  mesh = sharding.make_mesh()
  b = config.batch_size
  dtype = config.model.dtype
  backend = jax.default_backend()
  result = {"settings": {
      "config": os.path.relpath(config_flags.get_config_filename(FLAGS["config"]), ROOT),
      "overrides": overrides, "batch_size": b, "canvas": list(config.data.canvas_size),
      "dtype": dtype, "backbone": f"R{config.model.backbone.depth}-{config.model.design}",
      "rois_per_image": config.model.roi.batch_size_per_image,
      "mask_rois_per_image": config.model.roi.num_mask_rois,
      "rpn_pre_post_nms_train": [config.model.rpn.pre_nms_topk_train,
                                 config.model.rpn.post_nms_topk_train],
      "gt_instances": gt_count(config), "max_instances": config.data.max_instances,
      "steps": FLAGS.steps, "warmup": FLAGS.warmup,
      "infer_batch": FLAGS.infer_batch, "backend": backend,
      "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
      "cpu": machine.cpu_description(),  # bfloat16 speed depends on its AMX / AVX512-BF16
      "jax": jax.__version__, "torch": getattr(torch, "__version__", None),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),  # mrcnn_jax.xla_flags adds one on CPU
      "load_average_1m_before": os.getloadavg()[0]}}
  log(f"settings: {result['settings']}")

  tv_dtype = FLAGS.torchvision_autocast or "float32"
  peak = {"measured_gflops": {dt: measure_peak(dt) for dt in {"float32", dtype, tv_dtype}},
          "nominal_gflops": nominal_peak(dtype)}
  peak["used_gflops"] = peak["nominal_gflops"] or peak["measured_gflops"][dtype]
  peak["used"] = "nominal" if peak["nominal_gflops"] else "measured"
  result["peak"] = peak
  log(f"peak: {peak}")

  # Our train step: compile, warm up.
  ours = Ours(config, mesh)
  host = [make_batch(config, b, gt_count(config), seed) for seed in range(2)]
  variables = ours.inference_variables()  # before the first (donating) step
  batches = [ours.put(x) for x in host]
  log("compiling the train step")
  train_info = ours.compile_train(batches[0])
  log(f"train step compiled in {train_info['compile_s']:.1f} s")
  for i in range(FLAGS.warmup):
    ours.train_step(batches[i % 2])
  rss_ours = host_peak_mib()

  tv = None
  if FLAGS.vs_torchvision:
    import benchmark_torchvision as tvb  # pylint: disable=g-import-not-at-top
    bad = tvb.unsupported(config)
    if bad:
      raise app.UsageError("--vs-torchvision: " + "; ".join(bad))
    torch.set_num_threads(os.cpu_count())
    log("building torchvision's MaskRCNN")
    tmodel, topt = tvb.build(config, config.data.canvas_size[0],
                             float(optim.learning_rate(config)(0)))
    tv_initial = copy.deepcopy(tmodel.state_dict())
    trainer = tvb.Trainer(tmodel, topt, FLAGS.torchvision_autocast)
    tv_batches = [tvb.inputs(x, config) for x in host]
    for i in range(FLAGS.warmup):
      trainer.step(*tv_batches[i % 2])
    tv_flops = trainer.flops(*tv_batches[0])
    trainer.mask_rois.clear()
    tv = {"train_times": [], "losses": []}
    # Warm ours up again, next to torchvision's: right after torchvision's
    # setup (building, copying and flop-counting a model) our first steps ran
    # up to 45% slower (15.2, 13.3, 12.4 s, then ~10.5 s).
    for i in range(FLAGS.warmup):
      ours.train_step(batches[i % 2])
      trainer.step(*tv_batches[i % 2])

  # Timed train steps, alternating with torchvision's.
  compiles_before = counter.count
  times, metrics = [], []
  for i in range(FLAGS.steps):
    seconds, m = ours.train_step(batches[i % 2])
    times.append(seconds)
    metrics.append(m)
    msg = f"step {i}: ours {seconds:.2f} s"
    if tv is not None:
      start = time.perf_counter()
      tv["losses"].append(trainer.step(*tv_batches[i % 2]))
      tv["train_times"].append(time.perf_counter() - start)
      msg += f", torchvision {tv['train_times'][-1]:.2f} s"
    log(msg)
  step = spread(times)
  if tv is not None:  # the hook also fires at inference: read it now
    tv["mask_rois_per_image"] = float(np.mean(trainer.mask_rois)) / b
  xla_flops = train_info.pop("flops")
  buffers = train_info.pop("xla_buffers")
  fg = float(np.mean([m["num_fg_rois"] for m in metrics]))
  executed = executed_flops(config, mesh, ours, batches[0], fg)
  flops = executed.pop("gflop_per_step", xla_flops / 1e9) * 1e9
  achieved = flops / step["median"] / 1e9
  result["train"] = {
      **train_info, "compilations": ours.step_fn._cache_size(),  # pylint: disable=protected-access
      "backend_compiles_during_timed_steps": counter.count - compiles_before,
      "step_s": step, "images_per_s": b / step["median"], "gflop_per_step": flops / 1e9,
      "gflop_per_step_xla_cost_analysis": xla_flops / 1e9, **executed,
      "achieved_gflops": achieved, "utilisation": achieved / peak["used_gflops"],
      "utilisation_vs_measured_peak": achieved / peak["measured_gflops"][dtype],
      "fg_rois_per_image": fg,
      "diagnostics": {k: float(np.mean([m[k] for m in metrics])) for k in
                      ("fg_fraction", "proposal_recall", "num_proposals") if k in metrics[0]},
      "losses": {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]
                 if k.startswith("loss")}}

  # Inference: batch 1 latency and batch N throughput, alternating with torchvision's.
  infer_host = {n: make_batch(config, n, gt_count(config), 10 + n)
                for n in (1, FLAGS.infer_batch)}
  infer = {}
  if tv is not None:
    tvb.prepare_inference(tmodel, tv_initial)
  for n, batch_np in infer_host.items():
    batch = ours.put({"images": batch_np["images"], "image_info": batch_np["image_info"]})
    log(f"compiling detect at batch {n}")
    info = ours.compile_detect(variables, batch)
    _, dets = ours.detect(variables, batch)
    entry = {**info, "detections_per_image": float(np.sum(dets[0]["valid"])) / n}
    t_ours, t_tv = [], []
    if tv is not None:
      tv_images = tvb.inputs(batch_np, config)[0]
      tv_dets = tvb.infer(tmodel, tv_images, FLAGS.torchvision_autocast)
      entry["torchvision_detections_per_image"] = float(np.mean([len(d["boxes"])
                                                                 for d in tv_dets]))
    for _ in range(FLAGS.infer_steps):
      t_ours.append(ours.detect(variables, batch)[0])
      if tv is not None:
        start = time.perf_counter()
        tvb.infer(tmodel, tv_images, FLAGS.torchvision_autocast)
        t_tv.append(time.perf_counter() - start)
    entry["seconds"] = spread(t_ours)
    entry["images_per_s"] = n / entry["seconds"]["median"]
    entry["gflop"] = entry.pop("flops") / 1e9
    if tv is not None:
      entry["torchvision_seconds"] = spread(t_tv)
    infer[n] = entry
    log(f"detect batch {n}: {entry['seconds']['median']:.3f} s")
  big = infer[FLAGS.infer_batch]
  result["inference"] = {
      "compile_s": {f"batch_{n}": e["compile_s"] for n, e in infer.items()},
      "compilations": ours.detect_fn._cache_size(),  # pylint: disable=protected-access
      "latency_s_batch_1": infer[1]["seconds"],
      f"images_per_s_batch_{FLAGS.infer_batch}": big["images_per_s"],
      "gflop_batch_1": infer[1]["gflop"],
      "detections_per_image": infer[1]["detections_per_image"]}

  if tv is not None:
    tv_step = spread(tv["train_times"])
    tv_lat = infer[1]["torchvision_seconds"]
    tv_big = FLAGS.infer_batch / big["torchvision_seconds"]["median"]
    result["torchvision"] = {
        "version": torchvision.__version__, "threads": torch.get_num_threads(),
        "train_step_s": tv_step, "images_per_s": b / tv_step["median"],
        "gflop_per_step_matmul_conv": tv_flops / 1e9,
        "achieved_gflops": tv_flops / tv_step["median"] / 1e9,
        "autocast": FLAGS.torchvision_autocast,
        "utilisation_vs_measured_peak": tv_flops / tv_step["median"] / 1e9 /
                                        peak["measured_gflops"][tv_dtype],
        "mask_rois_per_image": tv["mask_rois_per_image"],
        "losses": {k: float(np.mean([x[k] for x in tv["losses"]])) for k in tv["losses"][0]},
        "inference_latency_s_batch_1": tv_lat,
        f"inference_images_per_s_batch_{FLAGS.infer_batch}": tv_big,
        "detections_per_image": infer[1]["torchvision_detections_per_image"],
        "ratios_ours_over_torchvision": {
            "train_step_s": step["median"] / tv_step["median"],
            "inference_latency_s_batch_1": infer[1]["seconds"]["median"] / tv_lat["median"],
            f"inference_images_per_s_batch_{FLAGS.infer_batch}": big["images_per_s"] / tv_big,
            "gflop_per_step": flops / tv_flops},
        "differences": tvb.DIFFERENCES}
    del tmodel, topt, trainer
    gc.collect()

  result["memory"] = {"host_peak_mib_after_our_train_steps": rss_ours,
                      "device": device_memory(), "xla_train_buffers": buffers}

  if FLAGS.stages:
    log("stage breakdown")
    result["stages"] = stage_breakdown(ours, batches[0], step["median"])
  if FLAGS.op_profile:
    log("op profile")
    import op_profile  # pylint: disable=g-import-not-at-top
    result["op_profile"] = op_profile.top_ops(lambda: ours.train_step(batches[0]),
                                              ours.train_compiled.as_text(),
                                              FLAGS.op_profile, log)
  if FLAGS.ops and torch is not None:
    import benchmark_torchvision as tvb  # pylint: disable=g-import-not-at-top,reimported
    log("ops vs torchvision.ops")
    m, canvas = config.model, config.data.canvas_size[0]
    result["ops"] = {
        "roi_align": tvb.compare_roi_align(
            b, m.roi.batch_size_per_image, canvas // 4, m.fpn_channels, 4,
            m.box_head.pooler_resolution, m.roi.sampling_ratio, repeats=5),
        "nms": tvb.compare_nms(m.rpn.pre_nms_topk_train, canvas, m.rpn.nms_threshold, repeats=5)}
  if FLAGS.dtype_check:
    log("float32 vs bfloat16 losses")
    result["dtype_check"] = dtype_check(config, ours.state, batches[0], ours.key)
  del ours
  gc.collect()
  if FLAGS.data:
    log("input pipeline")
    result["data_pipeline"] = {**data_pipeline(config),
                               "train_step_images_per_s": result["train"]["images_per_s"]}
  if FLAGS.sweep:
    result["sweep"] = sweep(config, mesh, result["train"])

  result["memory"]["host_peak_mib_end"] = host_peak_mib()
  result["settings"]["load_average_1m_after"] = os.getloadavg()[0]
  result["settings"]["backend_compiles_total"] = counter.count
  result["targets"] = targets(result)
  return result


def targets(result: Dict) -> Dict:
  ratios = result.get("torchvision", {}).get("ratios_ours_over_torchvision", {})
  values = {
      "train_step_vs_torchvision": ratios.get("train_step_s"),
      "inference_latency_vs_torchvision": ratios.get("inference_latency_s_batch_1"),
      "utilisation": result["train"]["utilisation"],
      "train_step_compilations": result["train"]["compilations"],
      "train_step_compile_s": result["train"]["compile_s"],
      "bf16_loss_rel_diff": result.get("dtype_check", {}).get("rel_diff", {}).get("loss"),
  }
  out = {}
  for name, (op, bound) in GOALS.items():
    v = values[name]
    met = None if v is None else {"<=": v <= bound, ">=": v >= bound, "==": v == bound}[op]
    out[name] = {"value": v, "goal": f"{op} {bound}", "met": met}
  return out


# ------------------------------------------------------------------ output
def table(r: Dict) -> str:
  s, t, inf = r["settings"], r["train"], r["inference"]
  tv = r.get("torchvision")
  lines = [f"{s['backbone']} {s['config']} | batch {s['batch_size']}, {s['canvas'][0]}x"
           f"{s['canvas'][1]}, {s['dtype']}, {s['rois_per_image']} RoIs/img "
           f"({s['mask_rois_per_image']} mask), {s['gt_instances']} gt/img | {s['backend']} "
           f"{s['device_kind']}, "
           f"{s['cpu_count']} CPUs ({s['cpu']['model']}: {' '.join(s['cpu']['flags'])}), "
           f"load {s['load_average_1m_before']:.1f} -> "
           f"{s['load_average_1m_after']:.1f}",
           f"peak ({r['peak']['used']}): {r['peak']['used_gflops']:.0f} GFLOP/s", ""]
  row = lambda name, ours, theirs="", ratio=None: lines.append(
      f"{name:<34}{ours:>12}{theirs:>14}" + (f"{ratio:>8.2f}" if ratio is not None else ""))
  lines.append(f"{'':<34}{'ours':>12}" + (f"{'torchvision':>14}{'ratio':>8}  (ours/theirs)"
                                           if tv else ""))
  n = s["infer_batch"]
  if tv:
    q = tv["ratios_ours_over_torchvision"]
    row("train step median (s)", f"{t['step_s']['median']:.3f}",
        f"{tv['train_step_s']['median']:.3f}", q["train_step_s"])
    row("train step IQR (s)", f"{t['step_s']['iqr']:.3f}", f"{tv['train_step_s']['iqr']:.3f}")
    row("train images/s", f"{t['images_per_s']:.2f}", f"{tv['images_per_s']:.2f}",
        t["images_per_s"] / tv["images_per_s"])
    row("foreground RoIs/image", f"{t['fg_rois_per_image']:.1f}",
        f"{tv['mask_rois_per_image']:.1f}", t["fg_rois_per_image"] / tv["mask_rois_per_image"])
    row("GFLOP/step (theirs: mm+conv)", f"{t['gflop_per_step']:.0f}",
        f"{tv['gflop_per_step_matmul_conv']:.0f}", q["gflop_per_step"])
    row("achieved GFLOP/s", f"{t['achieved_gflops']:.1f}", f"{tv['achieved_gflops']:.1f}",
        t["achieved_gflops"] / tv["achieved_gflops"])
    row("infer latency b1 (s)", f"{inf['latency_s_batch_1']['median']:.3f}",
        f"{tv['inference_latency_s_batch_1']['median']:.3f}", q["inference_latency_s_batch_1"])
    row(f"infer images/s b{n}", f"{inf[f'images_per_s_batch_{n}']:.2f}",
        f"{tv[f'inference_images_per_s_batch_{n}']:.2f}", q[f"inference_images_per_s_batch_{n}"])
  else:
    row("train step median (s)", f"{t['step_s']['median']:.3f}")
    row("train step IQR (s)", f"{t['step_s']['iqr']:.3f}")
    row("train images/s", f"{t['images_per_s']:.2f}")
    row("foreground RoIs/image", f"{t['fg_rois_per_image']:.1f}")
    row("GFLOP/step", f"{t['gflop_per_step']:.0f}")
    row("achieved GFLOP/s", f"{t['achieved_gflops']:.1f}")
    row("infer latency b1 (s)", f"{inf['latency_s_batch_1']['median']:.3f}")
    row(f"infer images/s b{n}", f"{inf[f'images_per_s_batch_{n}']:.2f}")
  row("utilisation", f"{t['utilisation']:.1%}")
  row("train compile (s)", f"{t['compile_s']:.1f}")
  row("train step compilations", f"{t['compilations']}")
  row("infer compile b1 (s)", f"{inf['compile_s']['batch_1']:.1f}")
  row("host peak RSS (MiB)", f"{r['memory']['host_peak_mib_end']:.0f}")
  if "data_pipeline" in r:
    row("input pipeline images/s", f"{r['data_pipeline']['images_per_s']:.1f}")
  if r.get("stages", {}).get("pieces"):
    lines += ["", f"{'stage':<20}{'ms':>10}{'share':>8}{'GFLOP':>9}{'GFLOP/s':>9}"]
    for name, p in r["stages"]["pieces"].items():
      lines.append(f"{name:<20}{p['ms']:>10.1f}{p['share_of_step']:>8.1%}{p['gflop']:>9.1f}"
                   f"{p['gflops']:>9.1f}")
    st = r["stages"]
    lines.append(f"{'sum / step / rest':<20}{st['sum_ms']:>10.1f} / {st['step_ms']:.1f} / "
                 f"{st['rest_ms']:.1f}")
  if r.get("op_profile"):
    lines += ["", f"{'train step op (thread ms)':<30}{'ms':>9}{'share':>8}  from"]
    for o in r["op_profile"]:
      lines.append(f"{o['instruction'][:30]:<30}{o['ms']:>9.1f}{o['share']:>8.1%}  "
                   f"{o['op'][-90:]}")
  for name, o in r.get("ops", {}).items():
    lines.append(f"op {name}: ours {o['ours_ms']:.2f} ms, torchvision {o['torchvision_ms']:.2f}"
                 f" ms, ratio {o['ratio']:.2f} ({o['setting']})")
  if "dtype_check" in r:
    d = r["dtype_check"]
    lines.append(f"bf16 vs f32 loss: {d['bfloat16']['loss']:.4f} vs {d['float32']['loss']:.4f}"
                 f" (rel diff {d['rel_diff']['loss']:.4f}; largest of one term "
                 f"{d['max_rel_diff']:.3f})")
  for row_ in r.get("sweep", []):
    lines.append(f"sweep {row_['axis']:<7} canvas {row_['canvas']:>5} rois {row_['rois']:>4} "
                 f"batch {row_['batch']}: step {row_['step_s']:.2f} s, {row_['gflop']:.0f} "
                 f"GFLOP, compile {row_['compile_s']:.1f} s")
  lines.append("")
  for name, g in r["targets"].items():
    v = g["value"]
    shown = "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
    lines.append(f"target {name} {g['goal']}: {shown} ({verdict})")
  return "\n".join(lines)


def _finite(x):
  """JSON-safe: NaN/inf become null, numpy scalars Python numbers."""
  if isinstance(x, dict):
    return {str(k): _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  config = configure(_CONFIG.value, FLAGS.batch_size, FLAGS.canvas, FLAGS.dtype, FLAGS.rois,
                     FLAGS.mask_rois)
  result = _finite(run(config, overrides))
  print(table(result), file=sys.stderr, flush=True)
  text = json.dumps(result, indent=1)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      f.write(text + "\n")
    log(f"wrote {FLAGS.output}")
  else:
    print(text)
  return 0


def _normalise_flag(arg: str) -> str:
  """``--vs-torchvision`` -> ``--vs_torchvision`` (not inside --config.* paths)."""
  m = re.match(r"^--(no)?([a-z][a-z0-9-]*)(=.*)?$", arg)
  if not m or arg.startswith("--config"):
    return arg
  return f"--{m.group(1) or ''}{m.group(2).replace('-', '_')}{m.group(3) or ''}"


if __name__ == "__main__":
  app.run(main, argv=[sys.argv[0]] + [_normalise_flag(a) for a in sys.argv[1:]])
