"""COCO-format JSON + images -> sharded TFRecords that the input pipeline reads.

    python -m mrcnn_jax.data.coco --images DIR --annotations FILE.json --output DIR
        [--shards N] [--workers W] [--verify]
    python -m mrcnn_jax.data.coco --verify --output DIR   # check a converted split

``--verify`` re-reads every record of the split (after converting it, or
alone) and lists each bad one (a failed CRC, an undecodable image or mask)
by shard, record number, image id and file name; exit status 2 if any.

Works for any COCO-format split (instances with polygons or RLE, optional
COCO person_keypoints-style keypoints) up to full COCO 2017 train: images are
checked and encoded in worker processes, records stream to the shards, and a
progress bar shows the ETA.

The split's format (shards, ``index.json``, ``meta.json``, the example
schema) is ``records``'s. Each record holds the encoded image (the original
bytes when TF can decode them as they are, else a lossless PNG re-encoding)
and per instance the mask as one PNG cropped to the box's integer pixel
window, so the pipeline never decodes a full-image mask. ``meta.json`` holds
the class-id mapping, category names, keypoint names, flip map and skeleton,
the source paths and the conversion summary;
``ground_truth.json`` the COCO JSON of exactly what was converted (the
images written, the annotations kept as they were given, with a missing
``iscrowd`` set to 0, a missing or invalid ``area`` set to the mask's, and a
missing or repeated annotation ``id`` replaced), which evaluation scores
against, so that an annotation skipped here is neither trained on nor
counted as a missed object.

A split in which no annotation has a ``segmentation`` is taken as box-only
(a detection dataset): its instances are kept with empty masks, and
meta.json's ``has_masks`` is false, so that training with the mask head on
is refused (``build.check_dataset``) rather than taught empty masks.

Bad input is reported per file and annotation id and skipped with a counted
summary (also written to ``problems.txt``): an image entry without a usable
id (an integer that fits in int32, which the input pipeline carries), file
name or size, or whose id repeats an earlier one; an annotation that is
malformed in any field (box, category, polygon with non-finite or far-off
coordinates, RLE, area, keypoints) or whose mask is empty. Only input that
is unusable as a whole (unreadable or malformed JSON, no usable image, no
categories, a category without an integer id or with a repeated one) stops
the run, with a one-line message and exit status 2.
"""

import argparse
import collections
import concurrent.futures
import io
import itertools
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

from mrcnn_jax import storage

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1
# Polygon coordinates beyond this many image sides from the image are taken as
# malformed (pycocotools rasterises a polygon's whole outline, so a coordinate
# of 1e30 would take all memory).
MAX_POLYGON_REACH = 4


class DatasetError(Exception):
  """The input as a whole cannot be used."""


# ------------------------------------------------------------------ JSON
def load_json(path: str) -> dict:
  """Reads and checks a COCO JSON; raises DatasetError with the reason."""
  try:
    data = storage.read_json(path)
  except FileNotFoundError:
    raise DatasetError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                       f"{e.msg}") from None
  except Exception as e:  # pylint: disable=broad-except  # OSError, a bucket's tf.errors
    raise DatasetError(f"{path}: cannot read: {type(e).__name__}: {str(e)[:200]}") from None
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
  cats = [c for c in categories if isinstance(c, dict) and "id" in c]
  if not cats:
    raise DatasetError("categories: no entry has an 'id'")
  seen = set()
  for c in cats:
    if not _is_int(c["id"]):
      raise DatasetError(f"categories: id {c['id']!r} of {str(c)[:80]} is not an integer")
    if c["id"] in seen:
      raise DatasetError(f"categories: id {c['id']} appears more than once")
    seen.add(c["id"])
  cats.sort(key=lambda c: c["id"])
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


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def image_entry_problem(info) -> Optional[str]:
  """Why an ``images`` entry cannot be used, or None."""
  if not isinstance(info, dict):
    return "not an object"
  missing = [k for k in ("id", "file_name", "width", "height") if k not in info]
  if missing:
    return f"needs id, file_name, width, height (missing {', '.join(missing)})"
  if not _is_int(info["id"]) or not INT32_MIN <= info["id"] <= INT32_MAX:
    return (f"id {info['id']!r} is not an integer that fits in int32 (the input pipeline "
            f"carries image ids as int32)")
  if not isinstance(info["file_name"], str) or not info["file_name"]:
    return f"file_name {info['file_name']!r} is not a file name"
  for k in ("width", "height"):
    v = info[k]
    if not (_is_number(v) and float(v).is_integer() and v > 0):
      return f"{k} {v!r} is not a positive integer"
  return None


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
    raw = storage.retried(lambda: storage.read_bytes(path), path)
  except FileNotFoundError:
    return None, b"", "missing image file"
  except Exception as e:  # pylint: disable=broad-except  # OSError, a bucket's tf.errors
    return None, b"", f"unreadable image file ({type(e).__name__}: {str(e)[:200]})"
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
    reach = MAX_POLYGON_REACH * max(h, w)
    polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
             and all(_is_number(v) and -reach <= v <= reach for v in p)]
    if not polys:
      if any(isinstance(p, list) and len(p) >= 6 and not all(_is_number(v) for v in p)
             for p in segm):
        return None, "polygon coordinates are not all finite numbers"
      if any(isinstance(p, list) and len(p) >= 6 for p in segm):
        return None, f"polygon coordinates lie more than {MAX_POLYGON_REACH} image sides away"
      return None, "no polygon with at least 3 points"
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
  elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
    size = segm["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
      return None, f"RLE size {size!r} is not [height, width]"
    if size != [h, w]:
      return None, f"RLE size {size} differs from the image's [{h}, {w}]"
    counts = segm["counts"]
    if not (isinstance(counts, str) or (isinstance(counts, list)
                                        and all(_is_int(v) and v >= 0 for v in counts))):
      return None, "RLE counts are neither a string nor a list of non-negative integers"
    try:
      rle = (mask_utils.frPyObjects(segm, h, w) if isinstance(counts, list)
             else dict(segm, counts=counts.encode("ascii")))
      mask = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises bare Exceptions on bad RLE
      return None, f"undecodable RLE ({e})"
    return mask.astype(bool), None
  else:
    return None, "segmentation is neither polygons nor RLE"
  return mask_utils.decode(rle).astype(bool), None


def mask_png(mask: np.ndarray) -> bytes:
  """A boolean mask as the PNG the records store (0 or 255 per pixel)."""
  buf = io.BytesIO()
  Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


class _Skip(Exception):
  """An annotation that cannot be used: (problem kind, message)."""


def _no_segmentation(segm) -> bool:
  return segm is None or (isinstance(segm, (list, dict)) and not segm)


def _instance(ann: dict, where: str, h: int, w: int, class_of: dict, num_keypoints: int,
              with_masks: bool, problems: list, notes: list) -> dict:
  """One annotation -> its record fields; raises _Skip when it cannot be used."""
  cat = ann.get("category_id")
  if not _is_int(cat) or cat not in class_of:
    raise _Skip("category", f"{where}: category_id {cat!r} is not in categories; skipped")
  bbox = ann.get("bbox")
  if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
    raise _Skip("bbox", f"{where}: malformed bbox {bbox!r}; skipped")
  x, y, bw, bh = (float(v) for v in bbox)
  if bw <= 0 or bh <= 0:
    raise _Skip("bbox", f"{where}: bbox has zero or negative size {bbox}; skipped")
  x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
  if x2 <= x1 or y2 <= y1:
    raise _Skip("bbox", f"{where}: bbox {bbox} lies outside the {w}x{h} image; skipped")
  if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
    notes.append(f"{where}: bbox {bbox} clipped to the image")
  crowd = ann.get("iscrowd", 0)
  if crowd not in (0, 1):  # also False / True
    raise _Skip("annotation", f"{where}: iscrowd {crowd!r} is not 0 or 1; skipped")
  # The mask's window: the box's integer pixels.
  wx0, wy0 = int(np.floor(x1)), int(np.floor(y1))
  wx1, wy1 = int(np.ceil(x2)), int(np.ceil(y2))
  if not with_masks:  # a box-only split (see convert): every mask is left empty
    window = np.zeros((wy1 - wy0, wx1 - wx0), bool)
  else:
    segm = ann.get("segmentation")
    if _no_segmentation(segm):
      mask, reason = None, "no segmentation"
    else:
      mask, reason = _annotation_mask(segm, h, w)
    if mask is None:
      raise _Skip("segmentation", f"{where}: {reason}; skipped")
    if not mask.any():
      raise _Skip("segmentation", f"{where}: the mask is empty (no pixel inside); skipped")
    window = mask[wy0:wy1, wx0:wx1]
  area = ann.get("area")
  if not (_is_number(area) and area >= 0):
    what = "the mask's" if with_masks else "the box's"
    if area is not None:
      problems.append(("area", f"{where}: area {area!r} is not a non-negative number; "
                               f"{what} area used"))
    area = float(mask.sum()) if with_masks else (x2 - x1) * (y2 - y1)  # box-only: the box's
  keypoints = np.zeros((num_keypoints, 3), np.float32)
  raw_kp = ann.get("keypoints")
  if raw_kp and num_keypoints:
    ok = (isinstance(raw_kp, list) and len(raw_kp) == 3 * num_keypoints
          and all(_is_number(v) for v in raw_kp))
    if not ok:
      problems.append(("keypoints", f"{where}: keypoints must be {3 * num_keypoints} numbers; "
                                    f"keypoints dropped, instance kept"))
    else:
      keypoints = np.asarray(raw_kp, np.float32).reshape(num_keypoints, 3)
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
  aid = ann.get("id")
  return {"box": [x1, y1, x2, y2], "class": class_of[cat], "crowd": int(crowd),
          "area": float(area), "id": aid if _is_int(aid) and 0 <= aid <= INT64_MAX else -1,
          "keypoints": keypoints, "png": mask_png(window),
          "window": [wx0, wy0, wx1 - wx0, wy1 - wy0]}


def convert_image(job) -> dict:
  """Worker: one image and its annotations -> record fields, notes and problems."""
  info, anns, image_dir, class_of, num_keypoints, with_masks = job
  name = info["file_name"]
  problems, notes = [], []
  out = {"image_id": info["id"], "file_name": name, "problems": problems, "notes": notes}
  image, raw, error = _open_image(storage.join(image_dir, name))
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
  kept, positions = [], []
  for position, ann in enumerate(anns):
    where = f"{name} annotation {str(ann.get('id'))[:40]}"
    try:
      kept.append(_instance(ann, where, h, w, class_of, num_keypoints, with_masks, problems,
                            notes))
      positions.append(position)
    except _Skip as e:
      problems.append(e.args)
    except Exception as e:  # any other malformed field: this annotation only
      problems.append(("annotation", f"{where}: malformed ({type(e).__name__}: {e}); skipped"))
  field = lambda k: [i[k] for i in kept]
  out["record"] = {
      "image": encoded, "height": h, "width": w,
      "boxes": np.asarray(field("box"), np.float32).reshape(len(kept), 4),
      "classes": np.asarray(field("class"), np.int64),
      "is_crowd": np.asarray(field("crowd"), np.int64),
      "areas": np.asarray(field("area"), np.float32), "ann_ids": np.asarray(field("id"), np.int64),
      "keypoints": np.asarray(field("keypoints"), np.float32).reshape(len(kept), num_keypoints, 3),
      "mask_png": field("png"),
      "mask_window": np.asarray(field("window"), np.int64).reshape(len(kept), 4),
  }
  # Which of the image's annotations were kept, and the fields ground_truth.json
  # completes them with: the parent builds it from its own copy (no polygons sent back).
  out["kept"] = [(p, {"iscrowd": i["crowd"], "area": i["area"]}) for p, i in zip(positions, kept)]
  return out


# ------------------------------------------------------------------ split
def convert(images_dir: str, annotations: str, output: str, num_shards: int = 8,
            workers: Optional[int] = None, max_printed: int = 20) -> dict:
  """Converts one split; returns the summary (also in meta.json)."""
  # TensorFlow is imported here, in the writer, never in the workers.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.data import records  # pylint: disable=g-import-not-at-top
  start = time.time()
  data = load_json(annotations)
  meta = category_meta(data["categories"])
  class_of = {cid: i for i, cid in enumerate(meta["coco_ids"])}
  num_keypoints = len(meta["keypoint_names"])
  images, problems = [], collections.Counter()
  log = []
  images_by_id = {}
  for info in data["images"]:
    problem = image_entry_problem(info)
    if problem is None and info["id"] in images_by_id:
      problem = f"id {info['id']} repeats an earlier image's"
    if problem:
      log.append(f"images entry {str(info)[:80]}: {problem}; skipped")
      problems["image"] += 1
      continue
    images_by_id[info["id"]] = info
    images.append(info)
  anns_by_image = collections.defaultdict(list)
  malformed = 0
  for ann in data.get("annotations", []):
    if isinstance(ann, dict) and _is_int(ann.get("image_id")):
      anns_by_image[ann["image_id"]].append(ann)
    else:
      malformed += 1
  if malformed:
    log.append(f"{malformed} annotations are not objects with an integer image_id; skipped")
    problems["annotation"] += malformed
  orphans = [a for k, v in anns_by_image.items() if k not in images_by_id for a in v]
  for ann in orphans:  # each named in problems.txt, as other skips are
    log.append(f"annotation id {ann.get('id')}: image_id {ann['image_id']} is not in "
               f"images; skipped")
  if orphans:
    problems["orphan annotations"] += len(orphans)
  if not images:
    raise DatasetError(f"{annotations}: no usable entry in 'images'")

  storage.makedirs(output)
  num_shards = max(1, min(num_shards, len(images)))
  shard_names = [f"data-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)]
  writers = [tf.io.TFRecordWriter(storage.join(output, n)) for n in shard_names]
  offsets = [0] * num_shards
  # records: [shard, offset, length, instances, image_id]; image_sizes: [height, width]
  index = {"shards": shard_names, "records": [], "image_sizes": []}
  counts = collections.Counter()
  # A split where no annotation has a segmentation is a box-only (detection)
  # dataset: its instances are kept with empty masks and meta.json says so
  # (build.check_dataset then refuses the mask head). Where some have one,
  # an annotation without is skipped as malformed.
  with_masks = any(isinstance(a, dict) and not _no_segmentation(a.get("segmentation"))
                   for a in data.get("annotations", []))
  if not with_masks:
    log.append("no annotation has a segmentation: a box-only split (empty masks)")
    tqdm.write("note: no annotation has a segmentation; converting a box-only split")
  jobs = ((info, anns_by_image.get(info["id"], []), images_dir, class_of, num_keypoints,
           with_masks) for info in images)
  workers = workers or os.cpu_count() or 1
  printed = collections.Counter()
  kept_images, kept_annotations = [], []
  # A worker that dies (killed for memory, say) breaks the executor, which
  # raises here; multiprocessing.Pool would wait for its results forever.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    results = pool.map(convert_image, jobs, chunksize=8)
    try:
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
        kept_images.append({k: images_by_id[result["image_id"]][k]
                            for k in ("id", "file_name", "width", "height")})
        given = anns_by_image.get(result["image_id"], [])
        kept_annotations.extend(dict(given[i], **filled) for i, filled in result["kept"])
        serialized = records.to_example(result["image_id"], result["file_name"], rec)
        shard = len(index["records"]) % num_shards
        writers[shard].write(serialized)
        n = len(rec["classes"])
        index["records"].append([shard, offsets[shard], len(serialized), n,
                                 int(result["image_id"])])
        index["image_sizes"].append([int(rec["height"]), int(rec["width"])])
        offsets[shard] += len(serialized) + records.RECORD_OVERHEAD
        counts["images written"] += 1
        counts["instances written"] += n
        counts["crowd regions"] += int(rec["is_crowd"].sum())
        counts["images without annotations"] += int(n == 0)
    except concurrent.futures.process.BrokenProcessPool:
      raise DatasetError(
          f"{annotations}: a conversion worker died (out of memory?) after "
          f"{counts['images written'] + counts['images skipped']} of {len(images)} images; "
          f"nothing usable was written to {output}") from None
  for wr in writers:
    wr.close()

  summary = {"images in JSON": len(data["images"]), **counts,
             "problems": dict(problems), "seconds": round(time.time() - start, 1)}
  meta.update(source_annotations=storage.abspath(annotations),
              source_images=storage.abspath(images_dir), ground_truth=records.GROUND_TRUTH,
              has_masks=with_masks,
              summary=summary)
  ground_truth = {k: v for k, v in data.items() if k not in ("images", "annotations")}
  ground_truth.update(images=kept_images, annotations=_unique_ids(kept_annotations))
  storage.write_json(storage.join(output, records.GROUND_TRUTH), ground_truth)
  storage.write_json(storage.join(output, "index.json"), index)
  storage.write_json(storage.join(output, "meta.json"), meta, indent=1)
  storage.write_text(storage.join(output, "problems.txt"), "\n".join(log) + ("\n" if log else ""))
  return summary


def _unique_ids(annotations: List[dict]) -> List[dict]:
  """``annotations`` (copies, changed in place): a missing, repeated or non-integer ``id``
  (or one beyond int64) replaced by a new one (pycocotools indexes ground truth by id)."""
  valid = lambda a: _is_int(a.get("id")) and 0 <= a["id"] <= INT64_MAX
  fresh = itertools.count(max((a["id"] for a in annotations if valid(a)), default=0) + 1)
  seen = set()
  for ann in annotations:
    if not valid(ann) or ann["id"] in seen:
      ann["id"] = next(fresh)
    seen.add(ann["id"])
  return annotations


def verify(directory: str) -> Tuple[int, List[str]]:
  """(records read, one line per bad record) of a converted split."""
  from mrcnn_jax.data import records  # pylint: disable=g-import-not-at-top
  split = records.RecordFile(directory)
  bad = []
  for i in tqdm(range(len(split)), desc="verify", unit="rec", dynamic_ncols=True,
                mininterval=1.0):
    problem = split.problem(i)
    if problem:
      bad.append(split.describe(i, problem))
  split.close()
  return len(split), bad


def _verify_main(output: str) -> int:
  try:
    total, bad = verify(output)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for line in bad:
    print(f"bad record: {line}")
  print(f"verify: {total} records, {len(bad)} bad")
  return 2 if bad else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Convert a COCO-format split to TFRecords.")
  parser.add_argument("--images", help="directory the file_names are relative to")
  parser.add_argument("--annotations", help="COCO instances/keypoints JSON")
  parser.add_argument("--output", required=True, help="directory for the shards")
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--workers", type=int, default=None, help="default: all cores")
  parser.add_argument("--verify", action="store_true",
                      help="re-read every record of --output (after converting, or alone) "
                           "and list the bad ones")
  args = parser.parse_args(argv)
  if args.verify and args.images is None and args.annotations is None:
    return _verify_main(args.output)
  if args.images is None or args.annotations is None:
    parser.error("--images and --annotations are required (unless --verify alone)")
  for what, path in (("--images", args.images), ("--annotations", args.annotations),
                     ("--output", args.output)):
    try:
      storage.check_reachable(path, what)
    except storage.UnreachableError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  if not storage.isdir(args.images):
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
  print(f"details of every problem: {storage.join(args.output, 'problems.txt')}")
  return _verify_main(args.output) if args.verify else 0


if __name__ == "__main__":
  sys.exit(main())
