"""A synthetic COCO-format dataset, so the whole job runs with no download.

    python -m mrcnn_jax.data.synthetic --output DIR [--train N --val M --size S --seed X]
        [--height H --width W]

writes ``DIR/train/*.jpg``, ``DIR/val/*.jpg`` and
``DIR/annotations/instances_{train,val}.json``: a real COCO dataset that
pycocotools loads. Each image has a textured background, unannotated clutter
(lines) and 1..8 objects of five shape categories with random colours, sizes
(COCO small to large), rotations and positions (some cut by the border).
Objects occlude one another; each annotation is the *visible* region, as
polygons: every shape is convex, so "shape minus the shapes in front of it"
splits exactly into convex pieces (one COCO polygon each). Some images carry
an ``iscrowd`` region (a cluster of small ellipses annotated as one RLE).

Category "triangle" has COCO-style keypoints: apex, left_base, right_base
(left = smaller x in the image, so a horizontal flip swaps them through the
flip map), v=2 visible, v=1 occluded, v=0 outside the image. Category ids are
not contiguous (as in COCO), to exercise the id mapping.

Images are drawn by rasterising the same polygons with pycocotools, so
pixels and annotations agree exactly. Each image's height and width are drawn
from [0.7 S, S]; ``--height``/``--width`` fix them instead (e.g. 480 x 640,
COCO's typical size, for throughput measurements). ``--min_object_size P``
raises every object's size to at least P pixels (the demo uses it: at 128
pixels the smallest default objects are 4-pixel diamonds, which no model
tells apart from ellipses); the random stream is unchanged, so the same seed
gives the same scenes with the small objects grown.
"""

import argparse
import json
import math
import multiprocessing
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

KEYPOINT_NAMES = ["apex", "left_base", "right_base"]
CATEGORIES = [
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 5, "name": "ellipse", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape",
     "keypoints": KEYPOINT_NAMES, "skeleton": [[1, 2], [1, 3], [2, 3]]},
    {"id": 9, "name": "hexagon", "supercategory": "shape"},
    {"id": 11, "name": "diamond", "supercategory": "shape"},
]
# Object size (side of the bounding square, as a fraction of the image's
# shorter side): ranges span COCO's small (< 32^2 px) to large (> 96^2 px).
SIZE_RANGE = {"rectangle": (0.12, 0.55), "ellipse": (0.08, 0.45), "triangle": (0.15, 0.6),
              "hexagon": (0.08, 0.4), "diamond": (0.05, 0.25)}
MIN_VISIBLE_AREA = 16.0  # px; smaller visible remnants are not annotated
JPEG_QUALITY = 92


# ----------------------------------------------------------------- geometry
def _shape_polygon(name: str, cx: float, cy: float, size: float, angle: float,
                   rng: np.random.Generator) -> np.ndarray:
  """A convex polygon ``[V, 2]`` (counter-clockwise in image coordinates)."""
  if name == "rectangle":
    aspect = rng.uniform(0.4, 1.0)
    w, h = (size, size * aspect) if rng.random() < 0.5 else (size * aspect, size)
    pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
  elif name == "ellipse":
    t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    pts = np.stack([np.cos(t) * size / 2, np.sin(t) * size / 2 * rng.uniform(0.5, 1.0)], 1)
  elif name == "triangle":
    # Apex up (image y grows downwards), base below: an isosceles triangle.
    pts = np.array([[0, -size / 2], [size * 0.45, size / 2], [-size * 0.45, size / 2]])
  elif name == "hexagon":
    t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    pts = np.stack([np.cos(t), np.sin(t)], 1) * size / 2
  else:  # diamond
    pts = np.array([[0, -size / 2], [size * 0.3, 0], [0, size / 2], [-size * 0.3, 0]])
  c, s = math.cos(angle), math.sin(angle)
  rot = pts @ np.array([[c, s], [-s, c]])
  return rot + np.array([cx, cy])


def _clip(poly: np.ndarray, a: np.ndarray, b: np.ndarray, keep_left: bool) -> np.ndarray:
  """Sutherland-Hodgman: the part of convex ``poly`` on one side of line a->b."""
  if len(poly) == 0:
    return poly
  d = b - a
  side = d[0] * (poly[:, 1] - a[1]) - d[1] * (poly[:, 0] - a[0])
  side = side if keep_left else -side
  out = []
  n = len(poly)
  for i in range(n):
    p, q = poly[i], poly[(i + 1) % n]
    sp, sq = side[i], side[(i + 1) % n]
    if sp >= 0:
      out.append(p)
    if (sp >= 0) != (sq >= 0):
      t = sp / (sp - sq)
      out.append(p + t * (q - p))
  return np.array(out) if out else np.zeros((0, 2))


def _orientation(poly):
  """Twice the signed area; positive for counter-clockwise in y-down image coordinates."""
  x, y = poly[:, 0], poly[:, 1]
  return float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1])


def _subtract(pieces: List[np.ndarray], hole: np.ndarray) -> List[np.ndarray]:
  """Convex pieces minus a convex ``hole``, again as disjoint convex pieces."""
  left = _orientation(hole) > 0  # inside of a CCW (in y-down coords) polygon
  out = []
  for piece in pieces:
    rest = piece
    for i in range(len(hole)):
      a, b = hole[i], hole[(i + 1) % len(hole)]
      outside = _clip(rest, a, b, not left)
      if len(outside) >= 3 and abs(_orientation(outside)) > 1e-6:
        out.append(outside)
      rest = _clip(rest, a, b, left)
      if len(rest) < 3:
        break
  return out


def _inside(point: np.ndarray, poly: np.ndarray) -> bool:
  left = _orientation(poly) > 0
  for i in range(len(poly)):
    a, b = poly[i], poly[(i + 1) % len(poly)]
    s = (b[0] - a[0]) * (point[1] - a[1]) - (b[1] - a[1]) * (point[0] - a[0])
    if (s < 0) if left else (s > 0):
      return False
  return True


def _rasterise(polys: List[np.ndarray], h: int, w: int) -> np.ndarray:
  if not polys:
    return np.zeros((h, w), bool)
  rles = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polys], h, w)
  return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


# ----------------------------------------------------------------- drawing
def _background(rng, h, w) -> np.ndarray:
  kind = rng.integers(4)
  base = rng.uniform(0, 1, 3)
  if kind == 0:  # flat colour
    img = np.broadcast_to(base, (h, w, 3)).copy()
  elif kind == 1:  # linear gradient
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = base * (1 - t) + rng.uniform(0, 1, 3) * t
    img = np.broadcast_to(img, (h, w, 3)).copy()
  elif kind == 2:  # stripes
    period = rng.uniform(6, 30)
    ys, xs = np.mgrid[0:h, 0:w]
    a = rng.uniform(0, np.pi)
    t = (np.sin((xs * np.cos(a) + ys * np.sin(a)) * 2 * np.pi / period) > 0)[..., None]
    img = np.where(t, base, base * rng.uniform(0.5, 0.9))
  else:  # blurry blobs: low-frequency noise
    small = rng.uniform(0, 1, (max(h // 32, 2), max(w // 32, 2), 3))
    img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                     np.float32) / 255
  return img.astype(np.float32)


def _colour(rng):
  hue = rng.uniform(0, 1)
  sat, val = rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0)
  i = int(hue * 6) % 6
  f = hue * 6 - int(hue * 6)
  p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
  return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i])


def make_image(rng: np.random.Generator, size: int, image_id: int,
               cat_by_name: Dict[str, dict],
               shape: Optional[Tuple[int, int]] = None,
               min_object_size: float = 0.0) -> Tuple[np.ndarray, List[dict]]:
  """One image (uint8 HxWx3) and its annotations (ids ``image_id * 100 + k``).

  ``shape`` (h, w) fixes the image size; otherwise each side is drawn from
  [0.7 size, size]. Object sizes are drawn log-uniformly from SIZE_RANGE,
  with both ends raised to ``min_object_size`` pixels where below it.
  """
  h = int(rng.integers(int(size * 0.7), size + 1))
  w = int(rng.integers(int(size * 0.7), size + 1))
  if shape is not None:  # drawn anyway, so the rest of the random stream is unchanged
    h, w = shape
  img = _background(rng, h, w)
  img += 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
  for _ in range(rng.integers(0, 4)):  # clutter: thin unannotated lines
    p = rng.uniform(0, 1, 2) * (w, h)
    q = p + rng.normal(0, size / 3, 2)
    width = rng.uniform(1, 3)
    d = (q - p) / max(np.linalg.norm(q - p), 1e-6)
    n = np.array([-d[1], d[0]]) * width / 2
    line = _rasterise([np.array([p + n, q + n, q - n, p - n])], h, w)
    img[line] = _colour(rng)

  frame = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
  layers = []  # (category name or "crowd", list of convex polygons), back to front
  if rng.random() < 0.15:  # a crowd: a cluster of small ellipses, one RLE
    centre = rng.uniform(0.2, 0.8, 2) * (w, h)
    spread = rng.uniform(0.08, 0.2) * min(h, w)
    blobs = [_shape_polygon("ellipse", *(centre + rng.normal(0, spread, 2)),
                            rng.uniform(0.04, 0.08) * min(h, w), rng.uniform(0, np.pi), rng)
             for _ in range(rng.integers(6, 14))]
    layers.append(("crowd", blobs))
  names = [c for c in SIZE_RANGE]
  for _ in range(rng.integers(1, 9)):
    name = names[rng.integers(len(names))]
    lo, hi = SIZE_RANGE[name]
    lo = max(lo * min(h, w), min_object_size)
    hi = max(hi * min(h, w), lo)
    obj_size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    centre = rng.uniform(-0.05, 1.05, 2) * (w, h)
    angle = rng.uniform(-0.6, 0.6) if name == "triangle" else rng.uniform(0, np.pi)
    layers.append((name, [_shape_polygon(name, *centre, obj_size, angle, rng)]))

  annotations = []
  for i, (name, polys) in enumerate(layers):
    if name == "crowd":
      for poly in polys:
        img[_rasterise([poly], h, w)] = _colour(rng)
    else:
      mask = _rasterise(polys, h, w)
      shade = 1.0 + 0.04 * rng.standard_normal((int(mask.sum()), 1), dtype=np.float32)
      img[mask] = _colour(rng)[None, :] * shade
    # The visible part: minus every later (front) shape, inside the frame.
    visible = [c for p in polys for c in [_clip_to_frame(p, frame)] if len(c) >= 3]
    front = [q for _, qs in layers[i + 1:] for q in qs]
    for q in front:
      visible = _subtract(visible, q)
    visible = [p for p in visible if abs(_orientation(p)) / 2 > 0.05]
    if not visible:
      continue
    rle = mask_utils.merge(mask_utils.frPyObjects([p.reshape(-1).tolist() for p in visible], h, w))
    area = float(mask_utils.area(rle))
    if area < MIN_VISIBLE_AREA:
      continue
    pts = np.concatenate(visible)
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    ann = {"id": image_id * 100 + len(annotations) + 1, "image_id": image_id,
           "bbox": [round(float(x1), 2), round(float(y1), 2),
                    round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
           "area": area}
    if name == "crowd":
      rle["counts"] = rle["counts"].decode("ascii")
      ann.update(category_id=cat_by_name["ellipse"]["id"], iscrowd=1, segmentation=rle)
    else:
      ann.update(category_id=cat_by_name[name]["id"], iscrowd=0,
                 segmentation=[[round(float(v), 2) for v in p.reshape(-1)] for p in visible])
      if name == "triangle":
        ann.update(_keypoints(polys[0], front, h, w))
    annotations.append(ann)
  img = np.clip(img, 0, 1)
  return (img * 255 + 0.5).astype(np.uint8), annotations


def _clip_to_frame(poly, frame):
  for i in range(4):
    poly = _clip(poly, frame[i], frame[(i + 1) % 4], _orientation(frame) > 0)
  return poly


def _keypoints(tri: np.ndarray, front: List[np.ndarray], h: int, w: int) -> dict:
  """COCO keypoints [x, y, v] * 3 for a triangle (apex, left_base, right_base)."""
  apex, b1, b2 = tri
  left, right = (b1, b2) if b1[0] <= b2[0] else (b2, b1)
  flat = []
  for p in (apex, left, right):
    if not (0 <= p[0] < w and 0 <= p[1] < h):
      flat += [0, 0, 0]
      continue
    occluded = any(_inside(p, q) for q in front)
    # COCO keypoints are integer pixel indices.
    flat += [int(p[0]), int(p[1]), 1 if occluded else 2]
  return {"keypoints": flat, "num_keypoints": sum(1 for v in flat[2::3] if v > 0)}


# ----------------------------------------------------------------- dataset
def _work(args):
  seed, split_index, index, size, shape, min_object_size, image_id, out_path = args
  rng = np.random.default_rng([seed, split_index, index])
  img, anns = make_image(rng, size, image_id, {c["name"]: c for c in CATEGORIES}, shape,
                         min_object_size)
  Image.fromarray(img).save(out_path, quality=JPEG_QUALITY)
  return {"id": image_id, "file_name": os.path.basename(out_path),
          "height": img.shape[0], "width": img.shape[1]}, anns


def write_split(output: str, split: str, split_index: int, num_images: int, size: int,
                seed: int, first_image_id: int, workers: int,
                shape: Optional[Tuple[int, int]] = None, min_object_size: float = 0.0) -> str:
  """Writes one split's images and JSON; returns the JSON path."""
  image_dir = os.path.join(output, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
  jobs = [(seed, split_index, i, size, shape, min_object_size, first_image_id + i,
           os.path.join(image_dir, f"{first_image_id + i:012d}.jpg")) for i in range(num_images)]
  images, annotations = [], []
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    for image, anns in pool.imap(_work, jobs, chunksize=16):
      images.append(image)
      annotations.extend(anns)
  coco = {"info": {"description": "mrcnn_jax synthetic shapes", "version": "1.0",
                   "year": 2026},
          "licenses": [], "images": images, "annotations": annotations,
          "categories": CATEGORIES}
  path = os.path.join(output, "annotations", f"instances_{split}.json")
  with open(path, "w") as f:
    json.dump(coco, f)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True, help="dataset directory to write")
  parser.add_argument("--train", type=int, default=1000, help="training images")
  parser.add_argument("--val", type=int, default=200, help="validation images")
  parser.add_argument("--size", type=int, default=256, help="longest image side in pixels")
  parser.add_argument("--height", type=int, default=None,
                      help="fixed image height (with --width; overrides --size)")
  parser.add_argument("--width", type=int, default=None, help="fixed image width")
  parser.add_argument("--min_object_size", type=float, default=0.0,
                      help="smallest object size in pixels (side of its bounding square)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  shape = None
  if (args.height is None) != (args.width is None):
    parser.error("--height and --width go together")
  if args.height is not None:
    shape = (args.height, args.width)
    args.size = max(shape)  # the scale of clutter and object sizes
    if min(shape) < 32:
      parser.error(f"--height and --width must be at least 32, got {shape}")
  if args.size < 32:
    parser.error(f"--size must be at least 32, got {args.size}")
  if not 0 <= args.min_object_size <= args.size:
    parser.error(f"--min_object_size must be in [0, --size], got {args.min_object_size}")
  start = time.time()
  for index, (split, n, first_id) in enumerate([("train", args.train, 1),
                                                ("val", args.val, 1 + args.train)]):
    path = write_split(args.output, split, index, n, args.size, args.seed, first_id,
                       args.workers, shape, args.min_object_size)
    with open(path) as f:
      num_anns = len(json.load(f)["annotations"])
    print(f"{split}: {n} images, {num_anns} annotations -> {path}")
  print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
  main()
