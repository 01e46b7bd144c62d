"""Draws COCO results (as from ``coco.image_results``) on an image, with PIL.

    vis = draw(image, results, names={2: "rectangle", ...}, skeleton=meta["skeleton"],
               keypoint_category_ids=meta["keypoint_category_ids"])

Masks are translucent overlays, boxes outlines, labels "name score" on a
filled tag; keypoints are dots joined by the skeleton. Each category has a
fixed colour (a function of its COCO id only), so pictures from different
runs compare at a glance.
"""

import colorsys
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

MASK_ALPHA = 0.45  # overlay opacity


def category_colour(category_id: int) -> tuple:
  """RGB uint8 colour of a COCO category: hues spaced by the golden ratio."""
  hue = (int(category_id) * 0.6180339887) % 1.0
  return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.8, 0.95))


def draw(image: np.ndarray, results: Sequence[Mapping], names: Mapping[int, str],
         skeleton: Sequence[Sequence[int]] = (), keypoint_category_ids: Sequence[int] = (),
         score_threshold: float = 0.0, keypoint_threshold: float = 0.0,
         min_side: int = 0) -> np.ndarray:
  """Returns a copy of ``image`` with ``results`` drawn on it.

  Args:
    image: ``[H, W, 3]`` uint8 RGB, the original image the results refer to.
    results: COCO result dicts for this image (``bbox`` xywh, ``category_id``,
      ``score``; optional ``segmentation`` RLE of size [H, W] and
      ``keypoints`` [x, y, v] * Kp in COCO's integer-pixel convention).
    names: COCO category id -> name (a missing id is shown as its number).
    skeleton: keypoint index pairs, 1-based as in COCO's categories.
    keypoint_category_ids: categories whose keypoints are drawn.
    score_threshold: results with a lower score are not drawn.
    keypoint_threshold: keypoints with v (the predicted score) <= this are
      not drawn, nor are their skeleton lines.
    min_side: a picture whose longer side is under this is enlarged (by an
      integer factor, nearest neighbour, so pixels stay sharp) until it is at
      least this, so boxes, labels and keypoints are legible; 0: native size.

  Returns:
    ``[H', W', 3]`` uint8: ``[H, W]`` times that factor.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  height, width = image.shape[:2]
  results = sorted((r for r in results if r["score"] >= score_threshold),
                   key=lambda r: r["score"])  # best drawn last, on top
  canvas = image.astype(np.float32)
  for r in results:
    if "segmentation" in r:
      rle = r["segmentation"]
      if list(rle["size"]) != [height, width]:
        raise ValueError(f"segmentation size {rle['size']} differs from the image's "
                         f"[{height}, {width}]")
      mask = mask_utils.decode(rle).astype(bool)  # (H, W)
      colour = np.array(category_colour(r["category_id"]), np.float32)
      canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * colour
  out = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
  zoom = max(1, -(-int(min_side) // max(height, width))) if min_side > 0 else 1
  if zoom > 1:
    out = out.resize((width * zoom, height * zoom), Image.NEAREST)
    height, width = height * zoom, width * zoom
  pen = ImageDraw.Draw(out)
  font = ImageFont.load_default(size=max(12, round((height * width) ** 0.5 / 50)))
  line = max(1, round(min(height, width) / 300))
  kp_cats = {int(c) for c in keypoint_category_ids}
  for r in results:
    colour = category_colour(r["category_id"])
    x, y, w, h = (zoom * v for v in r["bbox"])
    pen.rectangle([x, y, x + w, y + h], outline=colour, width=line)
    label = f"{names.get(r['category_id'], str(r['category_id']))} {r['score']:.2f}"
    left, top, right, bottom = pen.textbbox((0, 0), label, font=font)
    tx = min(max(x, 0), max(width - (right - left), 0))
    ty = y - (bottom - top) - 2 if y - (bottom - top) - 2 >= 0 else y
    pen.rectangle([tx, ty, tx + right - left + 2, ty + bottom - top + 2], fill=colour)
    pen.text((tx + 1 - left, ty + 1 - top), label, fill=(0, 0, 0), font=font)
    if "keypoints" in r and int(r["category_id"]) in kp_cats:
      kps = np.asarray(r["keypoints"], np.float64).reshape(-1, 3)
      # Back to continuous coordinates: COCO's keypoint (i, j) is pixel (i, j)'s centre.
      xy, shown = (kps[:, :2] + 0.5) * zoom, kps[:, 2] > keypoint_threshold
      for a, b in skeleton:
        a, b = a - 1, b - 1
        if 0 <= a < len(kps) and 0 <= b < len(kps) and shown[a] and shown[b]:
          pen.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=line)
      radius = line + 1
      for (px, py), s in zip(xy, shown):
        if s:
          pen.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour,
                      outline=(0, 0, 0))
  return np.asarray(out)
