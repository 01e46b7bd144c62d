"""Times COCO evaluation at COCO size: our path against plain single-process pycocotools.

    python scripts/benchmark_eval.py --images=1000 --detections=100 --output=eval_bench.json \\
        [--workers=2] [--backend=faster_coco_eval] [--batch_size=8] [--seed=0]

Makes a COCO-val-like split (image sizes 640x480, 480x640 and 500x375, ~7
polygon instances per image over 80 categories, a few crowd regions) and
model-like outputs (``--detections`` per image in the canvas's frame, each
ground-truth object found 1-3 times with jittered boxes and masks, the rest
scattered with lower scores; 28 x 28 mask probabilities), all made before any
timing starts. Then scores them twice, bbox and segm:

- ours: ``COCOEvaluator`` with ``--workers`` paste/encode processes and the
  ``--backend`` COCOeval;
- baseline: in this process, each image's masks pasted at full size
  (``paste_masks``), RLE-encoded by ``pycocotools.mask.encode`` over the whole
  image, then pycocotools' COCOeval.

Writes ``{"images", "detections", "ours": {"total_s", stage seconds...},
"baseline": {...}, "speedup", "max_abs_metric_diff", "metrics", "load_average"}``
(load averages before and after: the machine may be shared).
"""

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrcnn_jax.evaluation import backends  # pylint: disable=wrong-import-position
from mrcnn_jax.evaluation import coco as ev  # pylint: disable=wrong-import-position

SIZES = ((640, 480), (480, 640), (500, 375))  # (width, height), COCO val's commonest
NUM_CLASSES = 80
CANVAS_SCALE = 1.6  # original -> canvas pixels (a 1024 canvas over a 640 side)
MASK = 28


def _polygon(rng, x, y, w, h):
  """A star-shaped polygon of 8-16 vertices inside the box (flat [x0, y0, x1, ...])."""
  n = int(rng.integers(8, 17))
  angles = np.sort(rng.uniform(0, 2 * np.pi, n))
  radius = rng.uniform(0.6, 1.0, n)
  px = x + w / 2 + np.cos(angles) * radius * w / 2
  py = y + h / 2 + np.sin(angles) * radius * h / 2
  return np.stack([px, py], 1).reshape(-1).round(2).tolist()


def make_ground_truth(rng, num_images: int) -> dict:
  images, annotations = [], []
  for image_id in range(1, num_images + 1):
    width, height = SIZES[image_id % len(SIZES)]
    images.append({"id": image_id, "width": width, "height": height,
                   "file_name": f"{image_id:012d}.jpg"})
    for _ in range(max(1, int(rng.poisson(7)))):
      w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
      x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
      poly = _polygon(rng, x, y, w, h)
      rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
      area = float(mask_utils.area(rle))
      if area < 1:
        continue
      bx, by, bw, bh = mask_utils.toBbox(rle).tolist()
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(rng.integers(1, NUM_CLASSES + 1)),
                          "segmentation": [poly], "area": area, "bbox": [bx, by, bw, bh],
                          "iscrowd": int(rng.uniform() < 0.01)})
  categories = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]
  return {"images": images, "annotations": annotations, "categories": categories}


def _mask_of(poly, box, rng) -> np.ndarray:
  """[MASK, MASK] probabilities of ``poly`` seen through ``box`` (x1, y1, x2, y2), noised."""
  x1, y1, x2, y2 = box
  pts = np.asarray(poly).reshape(-1, 2)
  pts = (pts - [x1, y1]) / [max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)] * MASK * 4
  canvas = Image.new("L", (MASK * 4, MASK * 4))
  ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
  inside = np.asarray(canvas.resize((MASK, MASK), Image.BILINEAR), np.float32) / 255
  noise = rng.normal(0, 0.15, (MASK, MASK))
  return np.clip(0.05 + 0.9 * inside + noise, 0, 1).astype(np.float32)


def make_detections(rng, gt: dict, detections: int, batch_size: int):
  """Batches of (detections, image_info) as ``MaskRCNN.detect`` and the pipeline give them."""
  by_image = {}
  for a in gt["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a)
  batches = []
  images = gt["images"]
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    b, d = batch_size, detections
    boxes = np.zeros((b, d, 4), np.float32)
    scores = rng.uniform(0.05, 0.4, (b, d)).astype(np.float32)
    classes = rng.integers(0, NUM_CLASSES, (b, d)).astype(np.int32)
    coarse = rng.normal(-1, 2, (b, d, 7, 7))
    masks = (1 / (1 + np.exp(-np.kron(coarse, np.ones((4, 4)))))).astype(np.float32)
    info = {"scale": np.full((b, 2), CANVAS_SCALE, np.float32),
            "original_size": np.zeros((b, 2), np.int32), "image_id": np.zeros(b, np.int32),
            "valid": np.zeros(b, bool)}
    for i, im in enumerate(chunk):
      w, h = im["width"], im["height"]
      info["original_size"][i] = (h, w)
      info["image_id"][i] = im["id"]
      info["valid"][i] = True
      xy = rng.uniform(0, [w, h, w, h], (d, 4))
      boxes[i] = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]),
                                 np.maximum(xy[:, :2], xy[:, 2:]) + 4], 1)
      j = 0
      for a in by_image.get(im["id"], []):
        x, y, bw, bh = a["bbox"]
        for _ in range(int(rng.integers(1, 4))):
          if j == d:
            break
          jitter = rng.normal(0, 0.05, 4) * [bw, bh, bw, bh]
          box = np.array([x, y, x + bw, y + bh]) + jitter
          boxes[i, j] = box
          scores[i, j] = rng.uniform(0.5, 1.0)
          classes[i, j] = a["category_id"] - 1 if rng.uniform() < 0.9 else classes[i, j]
          masks[i, j] = _mask_of(a["segmentation"][0], box, rng)
          j += 1
    boxes *= CANVAS_SCALE
    valid = np.zeros((b, d), bool)
    valid[:len(chunk)] = True
    batches.append(({"boxes": boxes, "scores": scores, "classes": classes, "valid": valid,
                     "masks": masks}, info))
  return batches


def run_ours(gt, batches, workers: int, backend: str):
  times = {}
  start = time.perf_counter()
  evaluator = ev.COCOEvaluator(gt, list(range(1, NUM_CLASSES + 1)),
                               iou_types=("bbox", "segm"), backend=backend, workers=workers)
  times["setup_s"] = time.perf_counter() - start
  start = time.perf_counter()
  for detections, info in batches:
    evaluator.add(detections, info)
  times["add_s"] = time.perf_counter() - start
  start = time.perf_counter()
  evaluator.results  # pylint: disable=pointless-statement  # waits for the workers
  times["wait_for_workers_s"] = time.perf_counter() - start
  evaluator.close()
  start = time.perf_counter()
  metrics = evaluator.evaluate(quiet=True)
  times["cocoeval_s"] = time.perf_counter() - start
  times["total_s"] = sum(times.values())
  return times, metrics


def run_baseline(gt, batches):
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  times = {}
  start = time.perf_counter()
  coco_gt = COCO()
  coco_gt.dataset = gt
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt.createIndex()
  times["setup_s"] = time.perf_counter() - start
  start = time.perf_counter()
  results = []
  for detections, info in batches:
    for b in np.flatnonzero(info["valid"]):
      keep = np.flatnonzero(detections["valid"][b])
      sy, sx = (float(v) for v in info["scale"][b])
      height, width = (int(v) for v in info["original_size"][b])
      boxes = detections["boxes"][b, keep].astype(np.float64) / [sx, sy, sx, sy]
      boxes = np.clip(boxes, 0, [width, height, width, height])
      full = ev.paste_masks(detections["masks"][b, keep], boxes, height, width)
      rles = mask_utils.encode(np.asfortranarray(full.transpose(1, 2, 0).astype(np.uint8)))
      for k, j in enumerate(keep):
        x1, y1, x2, y2 = boxes[k]
        rle = rles[k]
        results.append({"image_id": int(info["image_id"][b]),
                        "category_id": int(detections["classes"][b, j]) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(detections["scores"][b, j]),
                        "segmentation": {"size": rle["size"],
                                         "counts": rle["counts"].decode("ascii")}})
  times["paste_encode_s"] = time.perf_counter() - start
  metrics = {}
  start = time.perf_counter()
  for iou_type in ("bbox", "segm"):
    keys = ("image_id", "category_id", "score",
            "bbox" if iou_type == "bbox" else "segmentation")
    with contextlib.redirect_stdout(io.StringIO()):
      coco_dt = coco_gt.loadRes([{k: r[k] for k in keys} for r in results])
      coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    metrics.update(backends.stats_as_metrics(iou_type, ev.BOX_METRICS, coco_eval.stats))
  times["cocoeval_s"] = time.perf_counter() - start
  times["total_s"] = sum(times.values())
  return times, metrics


def max_abs_diff(a: dict, b: dict) -> float:
  if set(a) != set(b):
    raise ValueError(f"metric names differ: {sorted(set(a) ^ set(b))}")
  diffs = [abs(a[k] - b[k]) for k in a if not (np.isnan(a[k]) and np.isnan(b[k]))]
  if any(np.isnan(a[k]) != np.isnan(b[k]) for k in a):
    return float("inf")
  return float(max(diffs, default=0.0))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--detections", type=int, default=100)
  parser.add_argument("--output", required=True, help="the JSON report")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--backend", default="faster_coco_eval", choices=backends.BACKENDS)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  load_before = os.getloadavg()
  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  gt = make_ground_truth(rng, args.images)
  batches = make_detections(rng, gt, args.detections, args.batch_size)
  made = time.perf_counter() - start
  ours, ours_metrics = run_ours(copy.deepcopy(gt), batches, args.workers, args.backend)
  baseline, baseline_metrics = run_baseline(copy.deepcopy(gt), batches)
  report = {
      "images": args.images, "detections": args.detections,
      "annotations": len(gt["annotations"]), "workers": args.workers,
      "backend": args.backend, "cpus": os.cpu_count(), "data_s": round(made, 2),
      "ours": {k: round(v, 3) for k, v in ours.items()},
      "baseline": {k: round(v, 3) for k, v in baseline.items()},
      "speedup": round(baseline["total_s"] / ours["total_s"], 2),
      "max_abs_metric_diff": max_abs_diff(ours_metrics, baseline_metrics),
      "metrics": {k: (None if np.isnan(v) else round(v, 6)) for k, v in ours_metrics.items()},
      "load_average": {"before": [round(v, 2) for v in load_before],
                       "after": [round(v, 2) for v in os.getloadavg()]},
  }
  with open(args.output, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps({k: report[k] for k in ("images", "ours", "baseline", "speedup",
                                           "max_abs_metric_diff")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
