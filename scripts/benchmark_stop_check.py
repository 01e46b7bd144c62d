"""Per-step cost of the multi-process stop check, on processes on localhost (gloo).

    python scripts/benchmark_stop_check.py [--processes=2 --steps=200 --size=512]

Each process runs a data-parallel jitted step (a matmul and tanh on its
rows, and a global mean: one all-reduce) ``--steps`` times, dispatched
asynchronously, under three checks after every step: none; the host
allgather of the stop flag (``multihost_utils.process_allgather``, what
training did before preemption.py); and JAX's preemption sync point
(``reached_preemption_sync_point``, what it does now). Process 0 prints the
mean milliseconds per step of each.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def worker(pid: int, num: int, port: int, steps: int, size: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=num, process_id=pid)
  from mrcnn_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  rows = size * jax.local_device_count()
  x = sharding.global_batch(np.random.default_rng(pid).normal(size=(rows, size))
                            .astype(np.float32), mesh)
  w = jax.device_put(np.eye(size, dtype=np.float32) * 0.5, sharding.replicated(mesh))

  @jax.jit
  def step(x, w):
    y = jnp.tanh(x @ w) + x
    return y, y.mean()

  counter = 0

  def check(mode):
    nonlocal counter
    counter += 1
    if mode == "allgather":
      return bool(np.any(multihost_utils.process_allgather(np.asarray(False))))
    if mode == "sync_point":
      return multihost_utils.reached_preemption_sync_point(counter)
    return False

  for mode in ("none", "allgather", "sync_point") * 2:  # the second round is reported
    for _ in range(5):
      x, loss = step(x, w)
      check(mode)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
      x, loss = step(x, w)
      check(mode)
    loss.block_until_ready()
    ms = (time.perf_counter() - start) / steps * 1e3
    if pid == 0:
      print(f"{mode:>10}: {ms:.2f} ms/step", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker is not None:
    worker(args.worker, args.processes, args.port, args.steps, args.size)
    return 0
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={i}",
                             f"--port={port}", f"--processes={args.processes}",
                             f"--steps={args.steps}", f"--size={args.size}"],
                            cwd=root, env={**os.environ, "PYTHONPATH": root,
                                           "TF_CPP_MIN_LOG_LEVEL": "2"})
           for i in range(args.processes)]
  return max(p.wait() for p in procs)


if __name__ == "__main__":
  sys.exit(main())
