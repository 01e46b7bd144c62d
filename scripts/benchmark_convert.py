"""Converter throughput: COCO-like 640x480 JPEGs -> TFRecord shards (python -m mrcnn_jax.data.coco).

    python scripts/benchmark_convert.py [--images 400] [--workers 2] [--dataset DIR]
        [--output F.json] [--runs 2]

Builds a synthetic COCO split of 640x480 JPEGs (``mrcnn_jax.data.synthetic``:
several polygon instances each, some crowds; ``--dataset DIR`` keeps it for
later runs), then times ``coco.convert`` with ``--workers`` processes
``--runs`` times and reports the fastest: images/s, images/s per worker, and the hours that
COCO train2017 (118,287 images) would take at that rate on this machine and
on a 96-core host (per-worker rate x 96: the conversion is per image and the
single writer does little; a host that fast may be bounded by its disk or
bucket instead). The load average before and after is reported, since the
machine may be shared.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TRAIN2017 = 118287  # images in COCO train2017


def main(argv=None) -> int:
  from mrcnn_jax.data import coco, synthetic  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=400)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--dataset", default=None, help="keep the raw images here")
  parser.add_argument("--output", default=None, help="also write the JSON here")
  parser.add_argument("--runs", type=int, default=2)
  args = parser.parse_args(argv)
  root = args.dataset or tempfile.mkdtemp(prefix="convert_bench_")
  raw = os.path.join(root, "raw")
  if not os.path.exists(os.path.join(raw, "annotations", "instances_train.json")):
    synthetic.main(["--output", raw, "--train", str(args.images), "--val", "0",
                    "--height", "480", "--width", "640", "--seed", "0"])
  images = os.path.join(raw, "train")
  annotations = os.path.join(raw, "annotations", "instances_train.json")
  jpeg_bytes = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images))
  load_before = os.getloadavg()
  seconds = []
  for run in range(args.runs):
    out = os.path.join(root, f"tf_{run}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = coco.convert(images, annotations, out, num_shards=8, workers=args.workers)
    seconds.append(time.perf_counter() - start)
  best = min(seconds)
  rate = summary["images written"] / best
  per_worker = rate / args.workers
  report = {
      "images": summary["images written"], "instances": summary["instances written"],
      "mean_jpeg_kb": round(jpeg_bytes / args.images / 1024, 1), "workers": args.workers,
      "cpus": os.cpu_count(), "seconds": [round(s, 2) for s in seconds],
      "images_per_s": round(rate, 1), "images_per_s_per_worker": round(per_worker, 1),
      "train2017_hours_here": round(TRAIN2017 / rate / 3600, 2),
      "train2017_hours_96_cores": round(TRAIN2017 / (per_worker * 96) / 3600, 3),
      "load_average": {"before": [round(v, 2) for v in load_before],
                       "after": [round(v, 2) for v in os.getloadavg()]},
  }
  print(json.dumps(report))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
  if not args.dataset:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
