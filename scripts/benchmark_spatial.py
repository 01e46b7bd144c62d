"""Train step time with each image's height split over 1, 2, 4, ... devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python scripts/benchmark_spatial.py [--config=shapes:tiny] [--canvas=256] \
        [--batch_size=2] [--spaces=1,2,4] [--steps=5]

For each ``mesh.space`` S the trainer's own step (``train._programs``) runs on
``batch_size * S`` devices (data = batch_size, one image per data slice)
over random images with ``--instances`` objects each (benchmark.make_batch).
Prints, per S: compile seconds, median step seconds over ``--steps`` after
one warm-up, and the load average. Simulated CPU devices share the host's
cores, so on CPU this measures the partitioning's overhead, not a speed-up.
"""

import argparse
import importlib
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# benchmark first: it imports torch (where installed) before TensorFlow, the order that works.
from scripts.benchmark import make_batch  # noqa: E402  pylint: disable=g-import-not-at-top
from mrcnn_jax import sharding, train  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="shapes:tiny", help="configs/NAME.py[:ARG]")
  parser.add_argument("--canvas", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--spaces", default="1,2,4")
  parser.add_argument("--instances", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  name, _, arg = args.config.partition(":")
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  config.data.canvas_size = (args.canvas, args.canvas)
  config.batch_size = args.batch_size
  host = [make_batch(config, args.batch_size, args.instances, seed) for seed in range(2)]
  for space in map(int, args.spaces.split(",")):
    mesh = sharding.make_mesh(jax.devices()[:args.batch_size * space], space=space)
    _, _, _, init, step = train._programs(config, mesh)  # pylint: disable=protected-access
    state = init(jax.random.PRNGKey(0))
    key = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(mesh))
    batches = [sharding.global_batch(b, mesh) for b in host]
    start = time.time()
    state, metrics = step(state, batches[0], key)
    jax.block_until_ready(metrics)
    compile_s = time.time() - start
    times = []
    for i in range(args.steps):
      start = time.time()
      state, metrics = step(state, batches[(i + 1) % 2], key)
      jax.block_until_ready(metrics)
      times.append(time.time() - start)
    print(f"space={space} devices={mesh.devices.size} canvas={args.canvas} "
          f"batch={args.batch_size}: compile+first step {compile_s:.1f} s, "
          f"step {np.median(times):.3f} s (median of {args.steps}), "
          f"loss {float(metrics['loss']):.4f}, load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
  main()
