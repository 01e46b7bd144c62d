"""Input-pipeline throughput: COCO-like 640x480 JPEGs -> 1024x1024 training batches.

    python scripts/benchmark_data.py [--dataset DIR] [--images 128] [--steps 40]
        [--warmup 5] [--batch-size 8] [--canvas 1024] [--scale-range 0.8 1.25]
        [--channel-order bgr]

Builds a synthetic COCO split of fixed-size JPEGs (``mrcnn_jax.data.synthetic
--height 480 --width 640``, several instances each, some crowds), converts it
(``mrcnn_jax.data.coco``), then times ``make_dataset(config, "train")`` as the
trainer uses it (``as_numpy_iterator``) after a warm-up: canvas 1024 x 1024,
28 x 28 masks, max_instances 100, flip on. ``--dataset DIR`` keeps the built
dataset in DIR and reuses it on later runs.

Prints one JSON object (images_per_s and the settings; ``stages_ms`` is each
transform timed alone on one image, for where the time goes) and a readable
line. The goal (issue): >= 80 images/s, so input never bounds a train step.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GOAL = 80.0  # images/s, from the issue


def build(directory: str, num_images: int) -> str:
  """The converted train split under ``directory`` (made once, then reused)."""
  from mrcnn_jax.data import coco, synthetic
  tf_dir = os.path.join(directory, "tf", "train")
  if os.path.exists(os.path.join(tf_dir, "index.json")):
    return tf_dir
  raw = os.path.join(directory, "raw")
  synthetic.main(["--output", raw, "--train", str(num_images), "--val", "0",
                  "--height", "480", "--width", "640", "--seed", "0"])
  coco.convert(os.path.join(raw, "train"), os.path.join(raw, "annotations", "instances_train.json"),
               tf_dir, num_shards=4)
  return tf_dir


def make_config(tf_dir: str, args) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0, "batch_size": args.batch_size, "eval_batch_size": args.batch_size,
      "data": {"train_dir": tf_dir, "eval_dir": tf_dir,
               "canvas_size": (args.canvas, args.canvas), "max_instances": 100, "mask_size": 28,
               # ImageNet statistics, as a real config uses.
               "mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375),
               "channel_order": args.channel_order, "flip": True,
               "scale_range": tuple(args.scale_range) if args.scale_range else None,
               "filter_empty": True, "threads": 0, "prefetch": 2}})


def time_pipeline(config, steps: int, warmup: int) -> float:
  """Seconds for ``steps`` batches after ``warmup`` batches."""
  from mrcnn_jax.data import input_pipeline
  batches = input_pipeline.make_dataset(config, "train").as_numpy_iterator()
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
  seconds = time.perf_counter() - start
  assert batch["images"].shape == (config.batch_size, *config.data.canvas_size, 3)
  return seconds


def time_stages(config, repeats: int = 20) -> dict:
  """Milliseconds per call of each transform alone, on the busiest record (tf.function).

  Called one at a time, each op may use both cores; in the pipeline several
  images run side by side, so these add up to roughly CPU-milliseconds.
  """
  import tensorflow as tf
  from mrcnn_jax.data import records as records_lib, transforms
  d = config.data
  records = records_lib.RecordFile(d.train_dir)
  i = int(np.argmax(records.num_instances))
  canvas = tuple(d.canvas_size)
  flip_map = records.meta["keypoint_flip_map"]

  def clock(fn, *args):
    """Median over ``repeats`` calls, robust to a busy machine."""
    fn(*args)  # trace and warm up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      tf.nest.map_structure(lambda x: x.numpy(), fn(*args))
      times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))

  serialized = tf.constant(records.read(i))
  parse = tf.function(lambda s: transforms.keep_largest(
      records_lib.parse(s, records.num_keypoints), d.max_instances))
  ex = parse(serialized)
  decode = tf.function(lambda e: transforms.decode_image(e, d.channel_order))
  ex = decode(ex)
  scale = transforms.fit_scale(ex["original_size"], canvas)
  geometry = tf.function(lambda e, flip: transforms.apply_geometry(
      e, canvas, scale, tf.zeros([2]), flip, d.mask_size, flip_map))
  no_instances = {k: (v[:0] if k in ("boxes", "classes", "is_crowd", "areas", "keypoints",
                                      "mask_png", "mask_window") else v) for k, v in ex.items()}
  out = geometry(ex, tf.constant(True))
  normalize = tf.function(lambda image: transforms.normalize(image, d.mean, d.std))
  pad = tf.function(lambda e: transforms.pad_instances(e, d.max_instances))
  image_only = clock(geometry, no_instances, tf.constant(False))
  image_flip = clock(geometry, no_instances, tf.constant(True))
  with_masks = clock(geometry, ex, tf.constant(False))
  return {
      "instances": int(records.num_instances[i]),
      "parse+keep_largest": clock(parse, serialized),
      "decode_jpeg": clock(decode, ex),
      "resize+pad (no flip)": image_only,
      "resize+flip+pad": image_flip,
      "masks (all instances)": with_masks - image_only,
      "normalize": clock(normalize, out["image"]),
      "pad_instances": clock(pad, out),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default=None,
                      help="directory to build the dataset in and reuse (default: a temp dir)")
  parser.add_argument("--images", type=int, default=128, help="images in the built dataset")
  parser.add_argument("--steps", type=int, default=40, help="timed batches")
  parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--canvas", type=int, default=1024)
  parser.add_argument("--scale-range", type=float, nargs=2, default=None,
                      help="large-scale jitter range (default: off, fit to canvas)")
  parser.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb",
                      help="bgr for detectron2-converted weights")
  parser.add_argument("--no-stages", action="store_true", help="skip the per-transform timing")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  directory = args.dataset or tempfile.mkdtemp(prefix="benchmark_data_")
  try:
    tf_dir = build(directory, args.images)
    config = make_config(tf_dir, args)
    from mrcnn_jax.data import records as records_lib
    counts = records_lib.RecordFile(tf_dir).num_instances
    load = os.getloadavg()[0]
    seconds = time_pipeline(config, args.steps, args.warmup)
    stages = None if args.no_stages else time_stages(config)
  finally:
    if args.dataset is None:
      shutil.rmtree(directory, ignore_errors=True)
  num_images = args.steps * args.batch_size
  result = {
      "images_per_s": round(num_images / seconds, 1), "seconds": round(seconds, 2),
      "num_images": num_images, "batch_size": args.batch_size,
      "canvas": [args.canvas, args.canvas], "image_size": [480, 640], "mask_size": 28,
      "max_instances": 100, "flip": True, "scale_range": args.scale_range,
      "channel_order": args.channel_order,
      "cpu_count": os.cpu_count(), "load_average_1m_before": round(load, 2),
      "mean_instances_per_image": round(float(counts.mean()), 2),
      "stages_ms": None if stages is None else {k: round(v, 2) for k, v in stages.items()},
  }
  print(json.dumps(result))
  ips = result["images_per_s"]
  print(f"input pipeline: {ips:.1f} images/s ({args.batch_size} x {args.canvas}x{args.canvas} "
        f"from 640x480 JPEG, 28x28 masks, {os.cpu_count()} CPUs, load {load:.1f} before); "
        f"goal >= {GOAL:.0f}: {'met' if ips >= GOAL else 'NOT met'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
