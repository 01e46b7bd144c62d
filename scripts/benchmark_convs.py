"""Convolution forms on this machine: XLA's convolution against conv.py's matmul.

    python scripts/benchmark_convs.py                       # R50-FPN shapes, 512 px, batch 2
    python scripts/benchmark_convs.py --output=convs.json --repeats=5

For each convolution shape of the R50-FPN Mask R-CNN (stem, a 3x3 and a 1x1
of each ResNet stage, the FPN and RPN 3x3s, the mask and keypoint heads' 3x3s
over their RoIs), in float32 and bfloat16, at top level:
``conv.conv_general_dilated`` with ``form="xla"`` (XLA's convolution),
``form="matmul"`` (one im2col matmul with float32 accumulation, matmul
gradients) and ``form="auto"`` (what the model trains with: one of those),
forward and both gradients (``jax.value_and_grad``); and the forward alone
(inference) for "xla" and "matmul" (16-bit stride-1 matmuls then in bands of
``conv.BAND_ROWS`` output pixels). Prints a table and writes JSON: per shape and
dtype the median seconds of each, GFLOP/s and which form won; the settings name the CPU
(scripts/machine.py: bfloat16 speed depends on its AMX / AVX512-BF16).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import machine  # noqa: E402  (scripts/machine.py)
from mrcnn_jax.modeling import conv  # noqa: E402

flags.DEFINE_integer("canvas", 512, "Square canvas side.")
flags.DEFINE_integer("batch_size", 2, "Images per batch.")
flags.DEFINE_integer("rois", 128, "Mask / keypoint RoIs per image.")
flags.DEFINE_integer("repeats", 3, "Timed calls per form (after one untimed).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_string("output", None, "Write the JSON here too.")
FLAGS = flags.FLAGS


def shapes(canvas: int, b: int, rois: int):
  """(name, input NHWC, kernel, out channels, stride) of the R50-FPN's convolutions."""
  s = canvas
  return [
      ("stem 7x7/2 3->64", (b, s, s, 3), 7, 64, 2),
      ("res2 3x3 64", (b, s // 4, s // 4, 64), 3, 64, 1),
      ("res2 1x1 256->64", (b, s // 4, s // 4, 256), 1, 64, 1),
      ("res3 3x3/2 128", (b, s // 4, s // 4, 128), 3, 128, 2),
      ("res3 3x3 128", (b, s // 8, s // 8, 128), 3, 128, 1),
      ("res4 3x3 256", (b, s // 16, s // 16, 256), 3, 256, 1),
      ("res5 3x3 512", (b, s // 32, s // 32, 512), 3, 512, 1),
      ("fpn/rpn 3x3 256 on P2", (b, s // 4, s // 4, 256), 3, 256, 1),
      ("fpn 3x3 256 on P3", (b, s // 8, s // 8, 256), 3, 256, 1),
      ("mask head 3x3 256", (b * rois, 14, 14, 256), 3, 256, 1),
      ("keypoint head 3x3 512", (b * rois, 14, 14, 512), 3, 512, 1),
  ]


def time_form(x, w, stride, form, repeats, gradients=True):
  k = w.shape[0]
  pad = ((k // 2, k // 2),) * 2
  f = lambda x, w: jnp.sum(conv.conv_general_dilated(
      x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      form=form).astype(jnp.float32) ** 2)
  g = jax.jit(jax.value_and_grad(f, (0, 1)) if gradients else f)
  jax.block_until_ready(g(x, w))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(g(x, w))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  rows = []
  key = jax.random.PRNGKey(0)
  for name, shape, k, out, stride in shapes(FLAGS.canvas, FLAGS.batch_size, FLAGS.rois):
    for dtype in FLAGS.dtypes:
      dt = getattr(jnp, dtype)
      x = jax.random.normal(key, shape, jnp.float32).astype(dt)
      w = (jax.random.normal(key, (k, k, shape[-1], out), jnp.float32) * 0.05).astype(dt)
      pixels = shape[0] * (-(-shape[1] // stride)) * (-(-shape[2] // stride))
      gflop = 3 * 2 * pixels * k * k * shape[-1] * out / 1e9  # forward + 2 gradients
      row = {"conv": name, "dtype": dtype, "gflop": gflop}
      for form in ("xla", "matmul", "auto"):
        row[f"{form}_s"] = time_form(x, w, stride, form, FLAGS.repeats)
        row[f"{form}_gflops"] = gflop / row[f"{form}_s"]
      for form in ("xla", "matmul"):
        row[f"{form}_forward_s"] = time_form(x, w, stride, form, FLAGS.repeats, False)
        row[f"{form}_forward_gflops"] = gflop / 3 / row[f"{form}_forward_s"]
      row["faster"] = min(("xla", "matmul"), key=lambda f: row[f"{f}_s"])
      row["faster_forward"] = min(("xla", "matmul"), key=lambda f: row[f"{f}_forward_s"])
      rows.append(row)
      print(f"{name:<26}{dtype:>9}  GFLOP/s, forward + gradients: xla "
            f"{row['xla_gflops']:4.0f} matmul {row['matmul_gflops']:4.0f} auto "
            f"{row['auto_gflops']:4.0f} -> {row['faster']};  forward: xla "
            f"{row['xla_forward_gflops']:4.0f} matmul {row['matmul_forward_gflops']:4.0f} -> "
            f"{row['faster_forward']}", file=sys.stderr, flush=True)
  result = {"settings": {"canvas": FLAGS.canvas, "batch_size": FLAGS.batch_size,
                         "rois": FLAGS.rois, "repeats": FLAGS.repeats,
                         "jax": jax.__version__, "backend": jax.default_backend(),
                         "cpu_count": os.cpu_count(), "cpu": machine.cpu_description(),
                         "load_average_1m": os.getloadavg()[0]},
            "convs": rows}
  text = json.dumps(result, indent=1)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
