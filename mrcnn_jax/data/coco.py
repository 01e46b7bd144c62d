"""COCO-format JSON + images -> sharded TFRecords that the input pipeline reads.

    python -m mrcnn_jax.data.coco --images DIR --annotations FILE.json --output DIR
        [--shards N] [--workers W]

Works for any COCO-format split (instances with polygons or RLE, optional
COCO person_keypoints-style keypoints) up to full COCO 2017 train: images are
checked and encoded in worker processes, records stream to the shards, and a
progress bar shows the ETA.

Each record (a ``tf.train.Example``) holds the encoded image (the original
bytes when TF can decode them as they are, else a lossless PNG re-encoding),
its size and id, and per instance: the box (xyxy, original pixels),
contiguous class id, iscrowd, area, annotation id, keypoints, and the mask
as one PNG cropped to the box's integer pixel window (``mask_window`` gives
that window as x, y, w, h), so the pipeline never decodes a full-image mask.

Beside the shards: ``index.json`` (the byte offset and length of every
record, so the pipeline reads any example by number, and per-record instance
counts) and ``meta.json`` (the class-id mapping, category names, keypoint
names, flip map and skeleton, the source paths, and the conversion summary).

Bad input is reported per file and annotation id and skipped with a counted
summary (also written to ``problems.txt``); only input that is unusable as a
whole (unreadable or malformed JSON, no images, no categories) stops the run,
with a one-line message and exit status 2.
"""

import argparse
import collections
import io
import json
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

RECORD_OVERHEAD = 16  # TFRecord framing: u64 length, u32 crc, data, u32 crc


class DatasetError(Exception):
  """The input as a whole cannot be used."""


# ------------------------------------------------------------------ JSON
def load_json(path: str) -> dict:
  """Reads and checks a COCO JSON; raises DatasetError with the reason."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise DatasetError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                       f"{e.msg}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"{path}: cannot read: {e}") from None
  if not isinstance(data, dict):
    raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories")
  for key in ("images", "categories"):
    if not isinstance(data.get(key), list) or not data[key]:
      raise DatasetError(f"{path}: '{key}' is missing or empty")
  if not isinstance(data.get("annotations", []), list):
    raise DatasetError(f"{path}: 'annotations' must be a list")
  return data


def category_meta(categories: List[dict]) -> dict:
  """Contiguous class ids (by sorted COCO id) and keypoint metadata."""
  cats = sorted((c for c in categories if isinstance(c, dict) and "id" in c),
                key=lambda c: c["id"])
  if not cats:
    raise DatasetError("categories: no entry has an 'id'")
  names = [str(c.get("name", c["id"])) for c in cats]
  kp_cats = [c for c in cats if c.get("keypoints")]
  kp_names = list(kp_cats[0]["keypoints"]) if kp_cats else []
  return {
      "coco_ids": [int(c["id"]) for c in cats],  # contiguous id i <-> coco_ids[i]
      "names": names,
      "keypoint_names": kp_names,
      "keypoint_flip_map": flip_map(kp_names),
      "skeleton": kp_cats[0].get("skeleton", []) if kp_cats else [],
      "keypoint_category_ids": [int(c["id"]) for c in kp_cats],
  }


def flip_map(names: List[str]) -> List[int]:
  """Index permutation that swaps left_*/right_* keypoints (detectron2's convention)."""
  index = {n: i for i, n in enumerate(names)}
  out = []
  for i, n in enumerate(names):
    for a, b in (("left", "right"), ("right", "left")):
      if a in n:
        out.append(index.get(n.replace(a, b), i))
        break
    else:
      out.append(i)
  return out


# ------------------------------------------------------------------ one image
def _open_image(path: str) -> Tuple[Optional[Image.Image], bytes, Optional[str]]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    return None, b"", "missing image file"
  except OSError as e:
    return None, b"", f"unreadable image file ({e})"
  try:
    image = Image.open(io.BytesIO(raw))
    image.load()
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
          Image.DecompressionBombError) as e:
    return None, raw, f"corrupt image ({type(e).__name__}: {e})"
  return image, raw, None


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode to 8-bit RGB (16-bit scaled, palette expanded, alpha dropped)."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(image, np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
    image = Image.fromarray(np.clip(arr / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L")
  elif image.mode == "F":
    arr = np.asarray(image, np.float64)
    image = Image.fromarray(np.clip(arr * (255 if arr.max() <= 1 else 1), 0, 255).astype(np.uint8))
  elif image.mode in ("P", "PA"):
    image = image.convert("RGBA")
  return image.convert("RGB")


def _encode_image(image: Image.Image, raw: bytes, width: int, height: int):
  """Returns (bytes to store, (h, w) of those pixels, a note or None, an error or None).

  EXIF orientation is applied (as every viewer and detectron2 do) when the JSON
  size matches the rotated image; when it matches the stored pixels instead,
  the annotations were made on those, so they are kept unrotated.
  """
  orientation = image.getexif().get(0x0112, 1)
  rotated = ImageOps.exif_transpose(image) if orientation != 1 else image
  note = None
  if (rotated.width, rotated.height) == (width, height):
    use = rotated
  elif (image.width, image.height) == (width, height):
    use = image
    note = "EXIF orientation ignored: the JSON size matches the stored pixels"
  else:
    return None, None, None, (f"image is {image.width}x{image.height} but the JSON says "
                              f"{width}x{height}")
  # TF decodes JPEG/PNG in RGB or grayscale as they are and ignores EXIF.
  if orientation == 1 and image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L"):
    return raw, (use.height, use.width), note, None
  buf = io.BytesIO()
  to_rgb(use).save(buf, format="PNG", compress_level=1)
  return buf.getvalue(), (use.height, use.width), note, None


def _annotation_mask(segm, h: int, w: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
  """Full-image mask of a polygon list or RLE, or (None, reason)."""
  if isinstance(segm, list):
    polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
             and all(isinstance(v, (int, float)) for v in p)]
    if not polys:
      return None, "no polygon with at least 3 points"
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
  elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
    if list(segm["size"]) != [h, w]:
      return None, f"RLE size {segm['size']} differs from the image's [{h}, {w}]"
    try:
      rle = (mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list)
             else dict(segm, counts=segm["counts"].encode("ascii")
                       if isinstance(segm["counts"], str) else segm["counts"]))
      mask = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises bare Exceptions on bad RLE
      return None, f"undecodable RLE ({e})"
    return mask.astype(bool), None
  else:
    return None, "segmentation is neither polygons nor RLE"
  return mask_utils.decode(rle).astype(bool), None


def _png(mask: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def convert_image(job) -> dict:
  """Worker: one image and its annotations -> record fields, notes and problems."""
  info, anns, image_dir, class_of, num_keypoints = job
  name = info["file_name"]
  problems, notes = [], []
  out = {"image_id": info["id"], "file_name": name, "problems": problems, "notes": notes}
  image, raw, error = _open_image(os.path.join(image_dir, name))
  if error:
    problems.append(("image", f"{name}: {error}; image skipped"))
    return out
  encoded, size, note, error = _encode_image(image, raw, int(info["width"]), int(info["height"]))
  if error:
    problems.append(("image", f"{name}: {error}; image skipped"))
    return out
  if note:
    notes.append(f"{name}: {note}")
  h, w = size
  boxes, classes, crowd, areas, ids, kps, pngs, windows = [], [], [], [], [], [], [], []
  for ann in anns:
    aid = ann.get("id")
    where = f"{name} annotation {aid}"
    cat = ann.get("category_id")
    if cat not in class_of:
      problems.append(("category", f"{where}: category_id {cat} is not in categories; skipped"))
      continue
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)):
      problems.append(("bbox", f"{where}: malformed bbox {bbox!r}; skipped"))
      continue
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
      problems.append(("bbox", f"{where}: bbox has zero or negative size {bbox}; skipped"))
      continue
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if x2 <= x1 or y2 <= y1:
      problems.append(("bbox", f"{where}: bbox {bbox} lies outside the {w}x{h} image; skipped"))
      continue
    if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
      notes.append(f"{where}: bbox {bbox} clipped to the image")
    is_crowd = bool(ann.get("iscrowd", 0))
    segm = ann.get("segmentation")
    if segm in (None, [], {}):
      mask, reason = None, "no segmentation"
    else:
      mask, reason = _annotation_mask(segm, h, w)
    if mask is None:
      problems.append(("segmentation", f"{where}: {reason}; skipped"))
      continue
    # The mask cropped to the box's integer pixel window.
    wx0, wy0 = int(np.floor(x1)), int(np.floor(y1))
    wx1, wy1 = int(np.ceil(x2)), int(np.ceil(y2))
    pngs.append(_png(mask[wy0:wy1, wx0:wx1]))
    windows.append([wx0, wy0, wx1 - wx0, wy1 - wy0])
    keypoints = np.zeros((num_keypoints, 3), np.float32)
    raw_kp = ann.get("keypoints")
    if raw_kp and num_keypoints:
      arr = np.asarray(raw_kp, np.float32) if isinstance(raw_kp, list) else None
      if arr is None or arr.size != 3 * num_keypoints or not np.all(np.isfinite(arr)):
        problems.append(("keypoints", f"{where}: keypoints must be {3 * num_keypoints} numbers; "
                                      f"keypoints dropped, instance kept"))
      else:
        keypoints = arr.reshape(num_keypoints, 3)
        labelled = keypoints[:, 2] > 0
        in_image = ((keypoints[:, 0] >= 0) & (keypoints[:, 0] < w)
                    & (keypoints[:, 1] >= 0) & (keypoints[:, 1] < h))
        if np.any(labelled & ~in_image):
          problems.append(("keypoints", f"{where}: keypoints outside the image marked "
                                        f"unlabelled"))
          keypoints[labelled & ~in_image] = 0
        in_box = ((keypoints[:, 0] >= x1 - 1) & (keypoints[:, 0] <= x2)
                  & (keypoints[:, 1] >= y1 - 1) & (keypoints[:, 1] <= y2))
        if np.any((keypoints[:, 2] > 0) & ~in_box):
          notes.append(f"{where}: keypoints outside the box (kept)")
    boxes.append([x1, y1, x2, y2])
    classes.append(class_of[cat])
    crowd.append(int(is_crowd))
    areas.append(float(ann.get("area", (x2 - x1) * (y2 - y1))))
    ids.append(int(aid) if isinstance(aid, int) else -1)
    kps.append(keypoints)
  out["record"] = {
      "image": encoded, "height": h, "width": w,
      "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
      "classes": np.asarray(classes, np.int64), "is_crowd": np.asarray(crowd, np.int64),
      "areas": np.asarray(areas, np.float32), "ann_ids": np.asarray(ids, np.int64),
      "keypoints": np.asarray(kps, np.float32).reshape(-1, num_keypoints, 3),
      "mask_png": pngs, "mask_window": np.asarray(windows, np.int64).reshape(-1, 4),
  }
  return out


# ------------------------------------------------------------------ records
def to_example(image_id: int, file_name: str, rec: dict) -> bytes:
  import tensorflow as tf  # the workers never import TF: only the writer does
  f = tf.train.Feature
  b = lambda v: f(bytes_list=tf.train.BytesList(value=v))
  i = lambda v: f(int64_list=tf.train.Int64List(value=np.asarray(v).reshape(-1).tolist()))
  fl = lambda v: f(float_list=tf.train.FloatList(value=np.asarray(v).reshape(-1).tolist()))
  feature = {
      "image/encoded": b([rec["image"]]), "image/id": i([image_id]),
      "image/height": i([rec["height"]]), "image/width": i([rec["width"]]),
      "image/filename": b([file_name.encode()]),
      "objects/bbox": fl(rec["boxes"]), "objects/class": i(rec["classes"]),
      "objects/is_crowd": i(rec["is_crowd"]), "objects/area": fl(rec["areas"]),
      "objects/id": i(rec["ann_ids"]), "objects/keypoints": fl(rec["keypoints"]),
      "objects/mask_png": b(rec["mask_png"]), "objects/mask_window": i(rec["mask_window"]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def convert(images_dir: str, annotations: str, output: str, num_shards: int = 8,
            workers: Optional[int] = None, max_printed: int = 20) -> dict:
  """Converts one split; returns the summary (also in meta.json)."""
  import tensorflow as tf
  start = time.time()
  data = load_json(annotations)
  meta = category_meta(data["categories"])
  class_of = {cid: i for i, cid in enumerate(meta["coco_ids"])}
  num_keypoints = len(meta["keypoint_names"])
  anns_by_image = collections.defaultdict(list)
  for ann in data.get("annotations", []):
    if isinstance(ann, dict):
      anns_by_image[ann.get("image_id")].append(ann)
  images, problems = [], collections.Counter()
  log = []
  for info in data["images"]:
    if not (isinstance(info, dict) and all(k in info for k in ("id", "file_name", "width", "height"))):
      log.append(f"images entry {str(info)[:80]}: needs id, file_name, width, height; skipped")
      problems["image"] += 1
      continue
    images.append(info)
  known = {info["id"] for info in images}
  orphans = sum(len(v) for k, v in anns_by_image.items() if k not in known)
  if orphans:
    log.append(f"{orphans} annotations refer to image ids not in images; skipped")
    problems["orphan annotations"] += orphans
  if not images:
    raise DatasetError(f"{annotations}: no usable entry in 'images'")

  os.makedirs(output, exist_ok=True)
  num_shards = max(1, min(num_shards, len(images)))
  shard_names = [f"data-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)]
  writers = [tf.io.TFRecordWriter(os.path.join(output, n)) for n in shard_names]
  offsets = [0] * num_shards
  index = {"shards": shard_names, "records": []}  # [shard, offset, length, instances, image_id]
  counts = collections.Counter()
  jobs = ((info, anns_by_image.get(info["id"], []), images_dir, class_of, num_keypoints)
          for info in images)
  workers = workers or os.cpu_count() or 1
  printed = collections.Counter()
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    results = pool.imap(convert_image, jobs, chunksize=8)
    for result in tqdm(results, total=len(images), desc="convert", unit="img",
                       dynamic_ncols=True, mininterval=1.0):
      for kind, message in result["problems"]:
        problems[kind] += 1
        log.append(message)
        if printed[kind] < max_printed:
          printed[kind] += 1
          tqdm.write(f"warning: {message}")
      log.extend(result["notes"])
      counts["notes"] += len(result["notes"])
      rec = result.get("record")
      if rec is None:
        counts["images skipped"] += 1
        continue
      serialized = to_example(result["image_id"], result["file_name"], rec)
      shard = len(index["records"]) % num_shards
      writers[shard].write(serialized)
      n = len(rec["classes"])
      index["records"].append([shard, offsets[shard], len(serialized), n,
                               int(result["image_id"])])
      offsets[shard] += len(serialized) + RECORD_OVERHEAD
      counts["images written"] += 1
      counts["instances written"] += n
      counts["crowd regions"] += int(rec["is_crowd"].sum())
      counts["images without annotations"] += int(n == 0)
  for wr in writers:
    wr.close()

  summary = {"images in JSON": len(data["images"]), **counts,
             "problems": dict(problems), "seconds": round(time.time() - start, 1)}
  meta.update(source_annotations=os.path.abspath(annotations),
              source_images=os.path.abspath(images_dir), summary=summary)
  with open(os.path.join(output, "index.json"), "w") as f:
    json.dump(index, f)
  with open(os.path.join(output, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  with open(os.path.join(output, "problems.txt"), "w") as f:
    f.write("\n".join(log) + ("\n" if log else ""))
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Convert a COCO-format split to TFRecords.")
  parser.add_argument("--images", required=True, help="directory the file_names are relative to")
  parser.add_argument("--annotations", required=True, help="COCO instances/keypoints JSON")
  parser.add_argument("--output", required=True, help="directory for the shards")
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--workers", type=int, default=None, help="default: all cores")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.images):
    print(f"error: --images {args.images}: not a directory", file=sys.stderr)
    return 2
  try:
    summary = convert(args.images, args.annotations, args.output, args.shards, args.workers)
  except DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("summary:")
  for key, value in summary.items():
    print(f"  {key}: {value}")
  print(f"details of every problem: {os.path.join(args.output, 'problems.txt')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
