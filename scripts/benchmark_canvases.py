"""One square canvas against a landscape + portrait pair: padding, and images/s side by side.

    python scripts/benchmark_canvases.py --padding          # the table only (seconds)
    python scripts/benchmark_canvases.py [--steps 24] [--passes 3] [--output FILE]

``--padding`` prints, for COCO-like image sizes (h x w), where each config's
images go and how many canvas pixels are padding, before (one square
canvas) and after (the pair) for both COCO resize rules: fit into 1024
(configs/coco_mask_rcnn_r50_fpn_1x.py: 1024x1024 -> 768x1024 + 1024x768) and
800/1333 (configs/torchvision_mask_rcnn.py: 1344x1344 -> 832x1344 + 1344x832).

Without it, it also builds a mixed-aspect synthetic set (each of the six
shapes, scaled to a longer side of 128 pixels, in equal numbers), converts
it, and times configs/shapes.py (the demo's model, batch 8) on it in one
process with two canvas settings: one 128x128 canvas, and 96x128 + 128x96
(the fit rule, as the COCO config). Training: ``--steps`` timed steps of
each, in alternating blocks of 4 after every program has compiled (the
pair's two train steps, the square's one). Inference: ``--passes`` timed
passes over the eval split (detect, as evaluation runs it, one view: the
config's test-time augmentation off; without the COCO scoring), alternating;
then the same passes over batches held in memory (the programs alone). Prints one JSON object (also to ``--output``) with
the 1-minute load average before and after, since the machine may be shared.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (h, w) of COCO-like photos: 640x480 and 500x375 (4:3), 640x427 (3:2), their
# portraits and a square.
SIZES = ((480, 640), (640, 480), (427, 640), (375, 500), (640, 427), (500, 500))
RULES = {  # name: (before, after, min_size, max_size, rounding)
    "fit 1024": (((1024, 1024),), ((768, 1024), (1024, 768)), 0, 0, "round"),
    "800/1333": (((1344, 1344),), ((832, 1344), (1344, 832)), 800, 1333, "floor"),
}
SQUARE, PAIR = ((128, 128),), ((96, 128), (128, 96))


def padding_table():
  """Rows of (rule, size, before canvas, before padding, after canvas, after padding, scale kept)."""
  from mrcnn_jax.data import canvases  # pylint: disable=g-import-not-at-top
  rows = []
  for rule, (before, after, *resize) in RULES.items():
    for size in SIZES:
      b_canvas, b_hw, b_pad = canvases.padded_pixels(size, before, *resize)
      a_canvas, a_hw, a_pad = canvases.padded_pixels(size, after, *resize)
      rows.append({"rule": rule, "image": list(size), "before_canvas": list(b_canvas),
                   "before_resized": list(b_hw), "before_padded": b_pad,
                   "after_canvas": list(a_canvas), "after_resized": list(a_hw),
                   "after_padded": a_pad})
  return rows


def build_dataset(directory: str, per_shape: int) -> str:
  """A converted train and val split of the six shapes at a longer side of 128."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.data import coco, synthetic  # pylint: disable=g-import-not-at-top
  shapes = [tuple(int(round(v * 128 / max(s))) for v in s) for s in SIZES]
  categories = {c["name"]: c for c in synthetic.CATEGORIES}
  for split, offset in (("train", 0), ("val", 1)):
    images, annotations = [], []
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    for i in range(per_shape * len(shapes)):
      image_id = 1 + offset * 100000 + i
      rng = np.random.default_rng([offset, i])
      img, anns = synthetic.make_image(rng, 128, image_id, categories, shapes[i % len(shapes)],
                                       min_object_size=16)
      name = f"{image_id:012d}.jpg"
      Image.fromarray(img).save(os.path.join(directory, split, name), quality=90)
      images.append({"id": image_id, "file_name": name, "height": img.shape[0],
                     "width": img.shape[1]})
      annotations += anns
    path = os.path.join(directory, f"instances_{split}.json")
    with open(path, "w") as f:
      json.dump({"images": images, "annotations": annotations,
                 "categories": synthetic.CATEGORIES}, f)
    coco.convert(os.path.join(directory, split), path, os.path.join(directory, "tf", split),
                 num_shards=1, workers=1)
  return os.path.join(directory, "tf")


def make_config(tf_dir: str, canvases_):
  from configs import shapes  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  config.data.update(train_dir=os.path.join(tf_dir, "train"),
                     eval_dir=os.path.join(tf_dir, "val"))
  config.model.test.update(flip=False, scales=(1.0,))  # one view: the model, not its TTA
  if len(canvases_) == 1:
    config.data.update(canvas_size=canvases_[0], canvas_sizes=())
  else:
    config.data.update(canvas_size=(), canvas_sizes=canvases_)
  return config


class Trainer:
  """Steps of one config's training (its own pipeline, state and programs)."""

  def __init__(self, config):
    import jax  # pylint: disable=g-import-not-at-top
    from mrcnn_jax import sharding, train  # pylint: disable=g-import-not-at-top
    from mrcnn_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    self.jax, self.sharding, self.config = jax, sharding, config
    self.mesh = sharding.make_mesh()
    _, _, _, init, self.step_fn = train._programs(config, self.mesh)  # pylint: disable=protected-access
    self.state = init(jax.random.PRNGKey(config.seed))
    self.key = jax.random.PRNGKey(config.seed)
    self.data = input_pipeline.make_dataset(config, "train").as_numpy_iterator()

  def run(self, steps: int) -> float:
    """Seconds for ``steps`` steps, input included, to the last step's end."""
    start = time.perf_counter()
    for _ in range(steps):
      batch = self.sharding.global_batch(next(self.data), self.mesh)
      self.state, metrics = self.step_fn(self.state, batch, self.key)
    self.jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start


class Detector:
  """Passes of one config's detect over its eval split, as evaluation runs them."""

  def __init__(self, config, variables):
    import jax  # pylint: disable=g-import-not-at-top
    from mrcnn_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top
    from mrcnn_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from mrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
    self.jax, self.sharding, self.config = jax, sharding, config
    self.mesh = sharding.make_mesh()
    self.step = evaluate._jitted_detect(build.build_model(config), self.mesh)  # pylint: disable=protected-access
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self.make_dataset = input_pipeline.make_dataset
    self.images = 0

  def batches(self):
    """One pass's batches on the host (for timing the program without the pipeline)."""
    return list(self.make_dataset(self.config, "eval").as_numpy_iterator())

  def run_on(self, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
      out = self.step(self.variables, self.sharding.global_batch(batch, self.mesh))
    self.jax.block_until_ready(out)
    return time.perf_counter() - start

  def run(self) -> float:
    # A new pipeline per pass, as evaluation makes one: its corrupt-record check keeps
    # state that a second iterator of the same dataset would share.
    data = self.make_dataset(self.config, "eval")
    start, self.images = time.perf_counter(), 0
    for batch in data.as_numpy_iterator():
      out = self.step(self.variables, self.sharding.global_batch(batch, self.mesh))
      self.images += int(batch["image_info"]["valid"].sum())
    self.jax.block_until_ready(out)
    return time.perf_counter() - start


def throughput(tf_dir: str, steps: int, passes: int, block: int = 4) -> dict:
  from mrcnn_jax.data import canvases  # pylint: disable=g-import-not-at-top
  configs = {"square": make_config(tf_dir, SQUARE), "pair": make_config(tf_dir, PAIR)}
  result = {"load_before": os.getloadavg()[0], "batch_size": configs["pair"].batch_size}
  trainers = {k: Trainer(c) for k, c in configs.items()}
  for name, t in trainers.items():  # until every canvas's program has compiled
    for _ in range(50):
      t.run(1)
      if t.step_fn._cache_size() == len(canvases.canvas_sizes(t.config)):  # pylint: disable=protected-access
        break
    result[f"{name}_train_programs"] = t.step_fn._cache_size()  # pylint: disable=protected-access
  blocks = {k: [] for k in trainers}
  for _ in range(-(-steps // block)):
    for name, t in trainers.items():
      blocks[name].append(t.run(block))
  done = -(-steps // block) * block
  for name in trainers:  # the median block resists bursts of other jobs' load
    images = block * configs[name].batch_size
    result[f"{name}_train_images_per_s"] = done * configs[name].batch_size / sum(blocks[name])
    result[f"{name}_train_images_per_s_median_block"] = images / float(np.median(blocks[name]))
  print(json.dumps(result), flush=True)
  variables = {"params": trainers["square"].state.params, **trainers["square"].state.model_state}
  detectors = {k: Detector(c, variables) for k, c in configs.items()}
  for d in detectors.values():
    d.run()  # compiles
  seconds = {k: [] for k in detectors}
  for _ in range(passes):
    for name, d in detectors.items():
      seconds[name].append(d.run())
  held = {k: d.batches() for k, d in detectors.items()}
  alone = {k: [] for k in detectors}
  for _ in range(passes):
    for name, d in detectors.items():
      alone[name].append(d.run_on(held[name]))
  for name, d in detectors.items():
    result[f"{name}_detect_only_images_per_s"] = passes * d.images / sum(alone[name])
    result[f"{name}_eval_images_per_s"] = passes * d.images / sum(seconds[name])
    result[f"{name}_eval_images_per_s_median_pass"] = d.images / float(np.median(seconds[name]))
    result[f"{name}_eval_programs"] = d.step._cache_size()  # pylint: disable=protected-access
  result.update(train_steps=done, eval_passes=passes, eval_images=detectors["pair"].images,
                load_after=os.getloadavg()[0])
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--padding", action="store_true", help="only the padding table")
  parser.add_argument("--steps", type=int, default=24, help="timed train steps per config")
  parser.add_argument("--passes", type=int, default=3, help="timed eval passes per config")
  parser.add_argument("--per_shape", type=int, default=8, help="images of each shape per split")
  parser.add_argument("--output", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  result = {"padding": padding_table()}
  for r in result["padding"]:
    print(f"{r['rule']:9s} {r['image'][0]:4d}x{r['image'][1]:<4d} "
          f"before {r['before_canvas'][0]}x{r['before_canvas'][1]} padded {r['before_padded']:8d}  "
          f"after {r['after_canvas'][0]}x{r['after_canvas'][1]} padded {r['after_padded']:8d} "
          f"(resized {r['before_resized'][0]}x{r['before_resized'][1]} -> "
          f"{r['after_resized'][0]}x{r['after_resized'][1]})")
  if not args.padding:
    with tempfile.TemporaryDirectory() as directory:
      result.update(throughput(build_dataset(directory, args.per_shape), args.steps,
                               args.passes))
    print(json.dumps({k: v for k, v in result.items() if k != "padding"}, indent=1))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
