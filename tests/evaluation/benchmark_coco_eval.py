"""Times COCOEvaluator on random detections: add (paste + RLE) and evaluate.

    .venv/bin/python -m tests.evaluation.benchmark_coco_eval [--images 200 --size 256 --dets 100]

Ground truth: ``--gt`` random boxes per image (5 categories, one with 17
keypoints), masks filled boxes; detections: ``--dets`` per image, jittered
copies of the ground truth plus random boxes, smooth random 28 x 28 masks.
"""

import argparse
import contextlib
import io
import time

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax.evaluation import coco as ev

COCO_IDS = [1, 3, 4, 8, 10]
NUM_KEYPOINTS = 17


def make_ground_truth(rng, num_images: int, size: int, per_image: int) -> COCO:
  images, anns = [], []
  for image_id in range(1, num_images + 1):
    images.append({"id": image_id, "height": size, "width": size, "file_name": f"{image_id}.jpg"})
    for _ in range(per_image):
      x, y = rng.uniform(0, size * 0.8, 2)
      w, h = rng.uniform(8, size * 0.5, 2)
      w, h = min(w, size - x), min(h, size - y)
      full = np.zeros((size, size), np.uint8, order="F")
      full[int(y):int(y + h), int(x):int(x + w)] = 1
      rle = mask_utils.encode(full)
      rle["counts"] = rle["counts"].decode("ascii")
      cat = int(rng.choice(COCO_IDS))
      ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
             "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)), "segmentation": rle}
      if cat == COCO_IDS[0]:
        kp = np.stack([rng.uniform(x, x + w, NUM_KEYPOINTS), rng.uniform(y, y + h, NUM_KEYPOINTS),
                       np.full(NUM_KEYPOINTS, 2.0)], 1)
        ann.update(keypoints=kp.reshape(-1).tolist(), num_keypoints=NUM_KEYPOINTS)
      anns.append(ann)
  cats = [{"id": c, "name": f"c{c}"} for c in COCO_IDS]
  cats[0]["keypoints"] = [f"k{i}" for i in range(NUM_KEYPOINTS)]
  gt = COCO()
  gt.dataset = {"images": images, "annotations": anns, "categories": cats}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def make_batch(rng, gt: COCO, image_ids, size: int, dets: int, scale: float = 1.25):
  b = len(image_ids)
  boxes = rng.uniform(0, size * scale * 0.8, (b, dets, 4)).astype(np.float32)
  boxes[..., 2:] = boxes[..., :2] + rng.uniform(4, size * scale * 0.5, (b, dets, 2))
  classes = rng.integers(0, len(COCO_IDS), (b, dets))
  for i, image_id in enumerate(image_ids):
    for j, a in enumerate(gt.imgToAnns[image_id]):
      x, y, w, h = a["bbox"]
      boxes[i, j] = (np.array([x, y, x + w, y + h]) + rng.normal(0, 2, 4)) * scale
      classes[i, j] = COCO_IDS.index(a["category_id"])
  coarse = rng.normal(0, 3, (b, dets, 7, 7))
  masks = 1 / (1 + np.exp(-np.kron(coarse, np.ones((4, 4)))))  # (B, D, 28, 28), blocky blobs
  detections = {
      "boxes": boxes, "scores": rng.uniform(0, 1, (b, dets)).astype(np.float32),
      "classes": classes.astype(np.int32), "valid": rng.uniform(0, 1, (b, dets)) < 0.98,
      "masks": masks.astype(np.float32),
      "keypoints": np.concatenate([rng.uniform(0, size * scale, (b, dets, NUM_KEYPOINTS, 2)),
                                   rng.uniform(0, 1, (b, dets, NUM_KEYPOINTS, 1))],
                                  -1).astype(np.float32)}
  info = {"image_size": np.full((b, 2), round(size * scale)),
          "original_size": np.full((b, 2), size), "scale": np.full((b, 2), scale, np.float32),
          "image_id": np.asarray(image_ids), "valid": np.ones(b, bool)}
  return detections, info


def run(num_images=200, size=256, dets=100, per_image=8, batch_size=8, seed=0, quiet=True):
  """Returns (seconds in add, seconds in evaluate, metrics)."""
  rng = np.random.default_rng(seed)
  gt = make_ground_truth(rng, num_images, size, per_image)
  ids = sorted(gt.getImgIds())
  batches = [make_batch(rng, gt, ids[i:i + batch_size], size, dets)
             for i in range(0, len(ids), batch_size)]
  evaluator = ev.COCOEvaluator(gt, COCO_IDS, [COCO_IDS[0]])
  start = time.perf_counter()
  for detections, info in batches:
    evaluator.add(detections, info)
  added = time.perf_counter() - start
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
    metrics = evaluator.evaluate()
  return added, time.perf_counter() - start, metrics


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=200)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--dets", type=int, default=100)
  parser.add_argument("--verbose", action="store_true", help="print COCOeval's output")
  args = parser.parse_args()
  added, evaluated, metrics = run(args.images, args.size, args.dets, quiet=not args.verbose)
  print(f"{args.images} images of {args.size}x{args.size}, {args.dets} detections each: "
        f"add {added:.2f}s, evaluate {evaluated:.2f}s, total {added + evaluated:.2f}s")
  print({k: round(v, 3) for k, v in metrics.items() if k.endswith("/AP")})


if __name__ == "__main__":
  main()
