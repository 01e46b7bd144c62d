"""Host-side COCO evaluation: fixed-size detections -> COCO results -> COCOeval.

The model returns, per batch, ``D`` detections per image with a ``valid``
mask (DESIGN.md: static shapes). Everything data-dependent happens here, in
NumPy and pycocotools: dropping invalid rows, mapping boxes and keypoints
from canvas back to original pixels, pasting the box-relative mask
probabilities into the image, RLE encoding, and COCOeval.

Letters: B batch, D detections per image, S mask size (28), Kp keypoints,
H W the original image.

Conventions at this boundary:
- Canvas -> original pixels is ``original = canvas / scale`` with
  ``scale = (sy, sx)`` from ``image_info``; boxes are then clipped to the
  original image (as detectron2's ``detector_postprocess`` does) and masks
  are pasted into the clipped box.
- Keypoints come out of the model in continuous coordinates (pixel i covers
  [i, i + 1)); COCO's are integer pixel indices, so 0.5 is subtracted after
  scaling, undoing the +0.5 the input pipeline adds (detectron2's
  ``instances_to_coco_json`` does the same). The third value of each COCO
  keypoint triple is the model's keypoint score, not a 0/1/2 visibility flag,
  as in detectron2: COCOeval ignores predicted visibilities.
- Metrics are fractions in [0, 1] (COCOeval's own scale, not detectron2's
  percentages); a metric COCOeval cannot compute (no ground truth in that
  area range: its -1) is NaN.
"""

import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
from absl import logging
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax import storage
from mrcnn_jax.evaluation import backends

# COCO's per-keypoint OKS sigmas for its 17 person keypoints (nose, eyes,
# ears, shoulders, elbows, wrists, hips, knees, ankles): Ronchi & Perona 2017,
# the values pycocotools hard-codes in Params.setKpParams.
COCO_PERSON_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                               1.07, 1.07, .87, .87, .89, .89]) / 10.0
# How a keypoint result is ranked: "box" gives it its detection's score
# (detectron2, torchvision); "box_x_keypoints" multiplies that by the mean of
# its keypoints' scores, as top-down pose estimators rank their poses
# (SimpleBaseline, HRNet): COCOeval's keypoint AP ranks by score, and a
# confident box with unsure keypoints then falls behind one whose keypoints
# the heatmaps are sure of. bbox and segm results keep the detection's score.
KEYPOINT_SCORES = ("box", "box_x_keypoints")
# Uniform sigma for keypoint sets other than COCO's 17 when none is given.
# A choice, not a standard: it lies between COCO's face points (0.025-0.035)
# and its joints (0.062-0.107), i.e. it asks for corner-like points to be
# placed more precisely than any joint (a wrist is 0.062) but less than an
# eye. Pass ``oks_sigmas`` for a dataset's own.
DEFAULT_OKS_SIGMA = 0.05

# Names of COCOeval.stats, in its order.
BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
               "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
METRIC_NAMES = {"bbox": BOX_METRICS, "segm": BOX_METRICS, "keypoints": KEYPOINT_METRICS}


# ------------------------------------------------------------------ masks
def _axis_weights(lo: np.ndarray, hi: np.ndarray, size: int, extent: int):
  """Bilinear weights that sample S-cell axes over [lo, hi] at pixel centres.

  Reproduces ``grid_sample(align_corners=False, padding_mode="zeros")`` on
  detectron2's grid ``(p + 0.5 - lo) / (hi - lo) * 2 - 1``, in float32 as
  torch computes it. A pixel has a non-zero weight only when its centre is
  within half a cell of [lo, hi]; ``start``/``stop`` bound those pixels.

  Args:
    lo, hi: ``[n]`` float32 box sides along this axis (hi > lo).
    size: S, the mask cells along the axis.
    extent: the image's pixels along the axis.

  Returns:
    ``weights`` ``[n, extent, S]`` float32, ``start`` and ``stop`` ``[n]`` int.
  """
  n = len(lo)
  lo, hi = lo[:, None], hi[:, None]
  centres = np.arange(extent, dtype=np.float32) + np.float32(0.5)
  with np.errstate(over="ignore"):  # a box of width ~1e-38 overflows to inf
    grid = (centres - lo) / (hi - lo) * np.float32(2) - np.float32(1)
    pos = ((grid + np.float32(1)) * np.float32(size) - np.float32(1)) / np.float32(2)  # (n, extent)
  pos = np.clip(pos, -2, size + 1)  # changes no weight: both taps are outside past -1 and S
  left = np.floor(pos)
  frac = pos - left
  left = left.astype(np.int64)
  # Column c + 1 holds cell c; column 0 and S + 1 collect taps that fall
  # outside the mask and are dropped: zero padding.
  inside = (left >= -1) & (left < size)
  rows = np.arange(n)[:, None]
  cols = np.arange(extent)[None, :]
  weights = np.zeros((n, extent, size + 2), np.float32)
  weights[rows, cols, np.where(inside, left + 1, 0)] = np.where(inside, 1 - frac, 0)
  weights[rows, cols, np.where(inside, left + 2, 0)] += np.where(inside, frac, 0)
  half_cell = (hi[:, 0] - lo[:, 0]) / (2 * size)
  start = np.clip(np.floor(lo[:, 0] - half_cell - 0.5), 0, extent).astype(np.int64)
  stop = np.clip(np.ceil(hi[:, 0] + half_cell - 0.5) + 1, 0, extent).astype(np.int64)
  return weights[:, :, 1:size + 1], start, stop


def _pasted(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float):
  """Yields ``(i, top, left, block)`` per non-empty pasted mask; ``block`` is
  the bool [h, w] patch of the [H, W] image at (top, left) the mask can reach."""
  masks = masks.astype(np.float32)
  boxes = boxes.astype(np.float32)
  ok = np.flatnonzero(np.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0])
                      & (boxes[:, 3] > boxes[:, 1]))  # degenerate boxes paste nothing
  if len(ok) == 0:
    return
  b = boxes[ok]
  wy, top, bottom = _axis_weights(b[:, 1], b[:, 3], masks.shape[1], height)
  wx, left, right = _axis_weights(b[:, 0], b[:, 2], masks.shape[2], width)
  for j, i in enumerate(ok):
    y0, y1, x0, x1 = top[j], bottom[j], left[j], right[j]
    if y1 > y0 and x1 > x0:
      values = wy[j, y0:y1] @ masks[i] @ wx[j, x0:x1].T  # (h, w): bilinear is separable
      yield i, y0, x0, values >= threshold


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                threshold: float = 0.5) -> np.ndarray:
  """Box-relative mask probabilities -> full-image binary masks.

  The same values as detectron2's ``paste_masks_in_image`` (its GPU path,
  which samples the whole image; its CPU path stops one pixel outside the
  box, which changes nothing for thresholds >= 0.5 on probabilities): pixel
  centres at i + 0.5 are mapped into the box and sampled bilinearly from the
  S x S mask with ``align_corners=False`` and zero padding, then
  thresholded with ``>=``. Bilinear sampling is separable: the per-axis
  weights come from one vectorised pass over all boxes (``[D, H, S]`` and
  ``[D, W, S]``), then each box costs two small matrix products over just the
  pixels its mask can reach (the box plus half a mask cell each side,
  clipped to the image).

  Args:
    masks: ``[D, S, S]`` float probabilities over each box.
    boxes: ``[D, 4]`` x1, y1, x2, y2 in the image's pixels; may extend past
      the image. A box with zero or negative width or height, or non-finite
      coordinates, gives an empty mask.
    height, width: the image size H, W.
    threshold: a pixel is in the mask when its value is >= threshold; must be
      > 0 (pixels the mask cannot reach are 0 and always out).

  Returns:
    ``[D, H, W]`` bool.
  """
  if not threshold > 0:
    raise ValueError(f"threshold must be > 0, got {threshold}")
  masks, boxes = np.asarray(masks), np.asarray(boxes)
  if masks.ndim != 3 or boxes.shape != (masks.shape[0], 4):
    raise ValueError(f"expected masks [D, S, S] and boxes [D, 4], got {masks.shape} and "
                     f"{boxes.shape}")
  out = np.zeros((masks.shape[0], height, width), bool)
  for i, top, left, block in _pasted(masks, boxes, height, width, threshold):
    out[i, top:top + block.shape[0], left:left + block.shape[1]] = block
  return out


def rle_of_block(block: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
  """COCO's compressed RLE of an [H, W] mask that is 0 outside ``block`` at (top, left).

  The same bytes as ``pycocotools.mask.encode`` of the full mask, in time
  proportional to the block instead of the image: the runs are read off the
  block's columns (COCO's RLE runs down columns, starting with 0s), and
  pycocotools compresses the counts.

  Args:
    block: ``[h, w]`` bool, inside the image.
    top, left: the block's position in the image.
    height, width: H, W.

  Returns:
    ``{"size": [H, W], "counts": str}``.
  """
  h = block.shape[0]
  # Down each column (with a 0 above and below): +1 where a run of 1s starts,
  # -1 after it ends. The nonzero places, in column-major order, alternate
  # start, end, start, ...
  edges = np.diff(block.T.view(np.int8), axis=1, prepend=np.int8(0), append=np.int8(0))
  column, row = np.divmod(np.flatnonzero(edges), h + 1)
  bounds = (left + column) * height + top + row  # pixel indices in the flattened image
  if h == height and len(bounds) > 2:
    # A run that reaches the bottom of a column and goes on at the top of the
    # next is one run of the flattened mask: its end meets the next start.
    joined = np.flatnonzero(bounds[1:-1:2] == bounds[2::2])
    bounds = np.delete(bounds, np.concatenate([2 * joined + 1, 2 * joined + 2]))
  counts = np.diff(bounds, prepend=0, append=height * width)
  if len(counts) > 1 and counts[-1] == 0:  # a run of 1s to the last pixel ends the RLE
    counts = counts[:-1]
  rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]},
                               height, width)
  return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def _encode_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                  threshold: float) -> List[dict]:
  """Pastes and RLE-encodes ``masks`` [n, S, S] over ``boxes`` [n, 4]; counts as str."""
  empty = np.zeros((0, 0), bool)
  blocks = [(empty, 0, 0)] * len(masks)  # a mask that pastes nothing is all 0s
  for i, top, left, block in _pasted(masks, boxes, height, width, threshold):
    blocks[i] = (block, top, left)
  return [rle_of_block(block, top, left, height, width) for block, top, left in blocks]


# ------------------------------------------------------------------ results
def image_results(dets_one_image: Mapping[str, np.ndarray], scale, original_size, image_id: int,
                  coco_ids: Sequence[int], keypoint_category_ids: Iterable[int] = (),
                  score_threshold: float = 0.0, mask_threshold: float = 0.5) -> List[dict]:
  """One image's detections as COCO result dicts (json-serialisable).

  Args:
    dets_one_image: ``boxes [D, 4]`` (canvas x1, y1, x2, y2), ``scores [D]``,
      ``classes [D]`` (contiguous 0..K-1), ``valid [D]``; optional
      ``masks [D, S, S]`` (probabilities over each box) and
      ``keypoints [D, Kp, 3]`` (canvas x, y, score; continuous coordinates).
    scale: (sy, sx), original -> canvas pixels.
    original_size: (h, w) of the original image.
    image_id: the COCO image id.
    coco_ids: contiguous class i <-> COCO category id ``coco_ids[i]``.
    keypoint_category_ids: COCO ids of the categories that have keypoints;
      only their detections carry ``keypoints``.
    score_threshold: keep detections with score >= this (and valid).
    mask_threshold: binarisation threshold of the pasted mask probabilities.

  Returns:
    One dict per kept detection, in input order: ``image_id``,
    ``category_id``, ``bbox`` [x, y, w, h] (original pixels, clipped to the
    image), ``score``; ``segmentation`` (RLE, counts as str) when masks are
    given; ``keypoints`` [x, y, score] * Kp (original pixels, COCO's integer
    convention) when keypoints are given and the category has keypoints.
  """
  d = {k: np.asarray(v) for k, v in dets_one_image.items()}
  keep = np.flatnonzero(d["valid"].astype(bool) & (d["scores"] >= score_threshold))
  if len(keep) == 0:
    return []
  sy, sx = (float(v) for v in np.asarray(scale).reshape(2))
  height, width = (int(v) for v in np.asarray(original_size).reshape(2))
  boxes = d["boxes"][keep].astype(np.float64) / np.array([sx, sy, sx, sy])  # (n, 4) original
  boxes = np.clip(boxes, 0, [width, height, width, height])
  scores = d["scores"][keep].astype(np.float64)
  classes = d["classes"][keep].astype(np.int64)
  coco_ids = np.asarray(coco_ids, np.int64)
  if classes.min() < 0 or classes.max() >= len(coco_ids):
    raise ValueError(f"classes must lie in [0, {len(coco_ids)}), got {classes.min()}.."
                     f"{classes.max()}")
  category_ids = coco_ids[classes]
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
  results = [{"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
             for c, b, s in zip(category_ids, xywh.tolist(), scores)]
  if "masks" in d:
    rles = _encode_masks(d["masks"][keep], boxes, height, width, mask_threshold)
    for r, rle in zip(results, rles):
      r["segmentation"] = rle
  kp_cats = set(int(c) for c in keypoint_category_ids)
  if "keypoints" in d and kp_cats:
    kps = d["keypoints"][keep].astype(np.float64)  # (n, Kp, 3)
    kps[..., 0] = kps[..., 0] / sx - 0.5
    kps[..., 1] = kps[..., 1] / sy - 0.5
    flat = kps.reshape(len(keep), -1).tolist()
    for r, c, k in zip(results, category_ids, flat):
      if int(c) in kp_cats:
        r["keypoints"] = k
  return results


# ------------------------------------------------------------------ COCOeval
def _fill_defaults(dataset: dict, path: str) -> None:
  """Gives ground-truth annotations without ``iscrowd`` or ``area`` (which COCOeval
  reads) 0 and their box's area, in place; the converter's ground_truth.json has both."""
  filled = 0
  for ann in dataset.get("annotations", []):
    if "iscrowd" not in ann or "area" not in ann:
      filled += 1
      ann.setdefault("iscrowd", 0)
      bbox = ann.get("bbox") or [0, 0, 0, 0]
      ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
  if filled:
    logging.warning("%s: %d annotations had no iscrowd or area; set to 0 and the box's area",
                    path, filled)


class COCOEvaluator:
  """Accumulates batches of detections, then runs COCOeval.

      evaluator = COCOEvaluator(meta["source_annotations"], meta["coco_ids"],
                                meta["keypoint_category_ids"])
      for batch in eval_batches:
        evaluator.add(jax.device_get(model.detect(...)), batch["image_info"])
      metrics = evaluator.evaluate()   # {"bbox/AP": ..., "segm/AP50": ...}
      json.dump(evaluator.results, f)  # predictions.json

  Only the images passed to ``add`` (with ``image_info["valid"]``) are
  evaluated: COCOeval's ``imgIds`` is restricted to them, so a partial pass
  over a split scores just that part. "segm" runs when masks were given,
  "keypoints" when keypoints were given and the dataset has keypoint
  categories (COCOeval then sees only those categories).

  Several processes: each ``add``s its own images, process 0 ``merge``s the
  others' ``shard()`` and evaluates (``evaluation.distributed``).
  """

  def __init__(self, annotation_file_or_COCO: Union[str, dict, COCO], coco_ids: Sequence[int],
               keypoint_category_ids: Iterable[int] = (),
               iou_types: Sequence[str] = ("bbox", "segm", "keypoints"),
               oks_sigmas: Optional[Sequence[float]] = None,
               keypoint_score: str = "box", backend: str = "pycocotools", workers: int = 0):
    """
    Args:
      annotation_file_or_COCO: the split's COCO JSON path or URI (meta.json's
        ``source_annotations``), its content as a dict (used as it is) or a
        loaded ``pycocotools.coco.COCO``.
      coco_ids: contiguous class i <-> COCO category id ``coco_ids[i]``.
      keypoint_category_ids: COCO ids of the categories with keypoints.
      iou_types: which of "bbox", "segm", "keypoints" to evaluate.
      oks_sigmas: per-keypoint OKS sigmas ``[Kp]``; default COCO's when
        Kp == 17, else ``DEFAULT_OKS_SIGMA`` for every keypoint.
      keypoint_score: how keypoint results are ranked, one of
        ``KEYPOINT_SCORES`` (see there).
      backend: the COCOeval implementation, one of ``backends.BACKENDS``.
      workers: processes that paste and encode masks (``evaluation.workers``);
        0 does it in this process, in ``add``.
    """
    if keypoint_score not in KEYPOINT_SCORES:
      raise ValueError(f"keypoint_score: expected one of {KEYPOINT_SCORES}, got "
                       f"{keypoint_score!r}")
    unknown = set(iou_types) - set(METRIC_NAMES)
    if unknown:
      raise ValueError(f"iou_types: unknown {sorted(unknown)}; expected a subset of "
                       f"{sorted(METRIC_NAMES)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
      raise ValueError(f"workers: expected an integer >= 0, got {workers!r}")
    backends.check_backend(backend)
    if isinstance(annotation_file_or_COCO, COCO):
      self.ground_truth = backends.GroundTruth(annotation_file_or_COCO.dataset, backend)
    elif isinstance(annotation_file_or_COCO, dict):
      _fill_defaults(annotation_file_or_COCO, "the ground truth")
      self.ground_truth = backends.GroundTruth(annotation_file_or_COCO, backend)
    else:
      dataset = storage.read_json(annotation_file_or_COCO)
      _fill_defaults(dataset, annotation_file_or_COCO)
      self.ground_truth = backends.GroundTruth(dataset, backend)
    self.coco_gt = self.ground_truth.coco
    self.coco_ids = [int(c) for c in coco_ids]
    self.keypoint_category_ids = [int(c) for c in keypoint_category_ids]
    self.iou_types = tuple(iou_types)
    self.oks_sigmas = None if oks_sigmas is None else np.asarray(oks_sigmas, np.float64)
    self.keypoint_score = keypoint_score
    self._workers = None
    if workers:
      from mrcnn_jax.evaluation import workers as workers_lib  # pylint: disable=g-import-not-at-top
      self._workers = workers_lib.ResultWorkers(workers)
    self.reset()

  def reset(self):
    """Forgets every added image."""
    self._pending: List = []  # per batch: a list of result lists, or a worker's future
    self._results: List[dict] = []
    self._image_ids: List[int] = []
    self._seen = set()
    self.num_padding = 0      # examples skipped because image_info["valid"] was False
    self.num_duplicates = 0   # images skipped because their id was already added
    self._has_masks = False
    self._num_keypoints = None  # Kp, once keypoints were given

  def close(self) -> None:
    """Stops the worker processes (if any)."""
    if self._workers is not None:
      self._workers.close()
      self._workers = None

  @property
  def results(self) -> List[dict]:
    """Every COCO result dict so far (json-serialisable), e.g. for predictions.json."""
    for batch in self._pending:
      for image in (batch.result() if hasattr(batch, "result") else batch):
        self._results.extend(image)
    self._pending = []
    return self._results

  @property
  def image_ids(self) -> List[int]:
    """COCO ids of the images added, in order."""
    return list(self._image_ids)

  @property
  def num_images(self) -> int:
    return len(self._image_ids)

  def add(self, detections: Mapping[str, np.ndarray], image_info: Mapping[str, np.ndarray]):
    """Adds one batch.

    Args:
      detections: ``MaskRCNN.detect``'s output, ``[B, D, ...]`` arrays (NumPy
        or anything ``np.asarray`` takes).
      image_info: ``scale [B, 2]``, ``original_size [B, 2]``,
        ``image_id [B]``, ``valid [B]`` (False on padding examples, which
        are skipped and counted in ``num_padding``).
    """
    dets = {k: np.asarray(v) for k, v in detections.items()}
    info = {k: np.asarray(v) for k, v in image_info.items()}
    batch = len(info["image_id"])
    valid = info["valid"].astype(bool) if "valid" in info else np.ones(batch, bool)
    self._has_masks |= "masks" in dets
    if "keypoints" in dets:
      self._num_keypoints = dets["keypoints"].shape[2]
    jobs = []
    for b in range(batch):
      if not valid[b]:
        self.num_padding += 1
        continue
      image_id = int(info["image_id"][b])
      if image_id in self._seen:
        self.num_duplicates += 1
        logging.warning("COCOEvaluator: image id %d added twice; the repeat is ignored",
                        image_id)
        continue
      self._seen.add(image_id)
      self._image_ids.append(image_id)
      rows = np.flatnonzero(dets["valid"][b])  # only these reach the workers
      jobs.append(dict(dets_one_image={k: v[b][rows] for k, v in dets.items()},
                       scale=info["scale"][b], original_size=info["original_size"][b],
                       image_id=image_id, coco_ids=self.coco_ids,
                       keypoint_category_ids=self.keypoint_category_ids))
    if self._workers is not None:
      self._pending.append(self._workers.submit(jobs))
    else:
      self._pending.append([image_results(**job) for job in jobs])

  def shard(self) -> dict:
    """What this evaluator holds, for ``merge`` on another process (picklable)."""
    return {"image_ids": self.image_ids, "results": self.results,
            "has_masks": self._has_masks, "num_keypoints": self._num_keypoints,
            "num_padding": self.num_padding, "num_duplicates": self.num_duplicates}

  def merge(self, shard: dict) -> None:
    """Adds another evaluator's ``shard()`` (its images must be new to this one)."""
    repeated = self._seen.intersection(shard["image_ids"])
    if repeated:
      raise ValueError(f"merge: {len(repeated)} image ids were added twice, e.g. "
                       f"{sorted(repeated)[:5]}")
    self.results.extend(shard["results"])
    self._image_ids.extend(shard["image_ids"])
    self._seen.update(shard["image_ids"])
    self._has_masks |= shard["has_masks"]
    if shard["num_keypoints"] is not None:
      self._num_keypoints = shard["num_keypoints"]
    self.num_padding += shard["num_padding"]
    self.num_duplicates += shard["num_duplicates"]

  def _sigmas(self) -> np.ndarray:
    kp = self._num_keypoints
    if self.oks_sigmas is not None:
      if len(self.oks_sigmas) != kp:
        raise ValueError(f"oks_sigmas has {len(self.oks_sigmas)} values for {kp} keypoints")
      return self.oks_sigmas
    return COCO_PERSON_SIGMAS if kp == 17 else np.full(kp, DEFAULT_OKS_SIGMA)

  def _results_for(self, iou_type: str) -> List[dict]:
    """Shallow copies (loadRes writes into them) holding what ``iou_type`` reads.

    segm results drop ``bbox`` so that loadRes takes each detection's area
    from its mask (detectron2 does the same); keypoint results keep ``bbox``,
    whose area decides the area range of unmatched detections, and are
    ranked as ``keypoint_score`` says.
    """
    keys = {"bbox": ("image_id", "category_id", "bbox", "score"),
            "segm": ("image_id", "category_id", "segmentation", "score"),
            "keypoints": ("image_id", "category_id", "bbox", "keypoints", "score")}[iou_type]
    need = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    results = [{k: r[k] for k in keys} for r in self.results if need in r]
    if iou_type == "keypoints" and self.keypoint_score == "box_x_keypoints":
      for r in results:
        r["score"] *= float(np.mean(r["keypoints"][2::3]))
    return results

  def evaluate(self, quiet: bool = False) -> Dict[str, float]:
    """Runs COCOeval per IoU type and prints its tables (unless ``quiet``).

    Returns:
      ``{"bbox/AP": ..., "bbox/AP50": ..., ..., "segm/...", "keypoints/..."}``
      as fractions; NaN where COCOeval has no ground truth for a metric. A
      type with no results at all scores 0 (with a warning).
    """
    types = [t for t in self.iou_types
             if t == "bbox" or (t == "segm" and self._has_masks)
             or (t == "keypoints" and self._num_keypoints and self.keypoint_category_ids)]
    missing = set(self._image_ids) - set(self.coco_gt.getImgIds())
    if missing:
      raise ValueError(f"{len(missing)} image ids are not in the annotations, e.g. "
                       f"{sorted(missing)[:5]}")
    if "keypoints" in types:
      for cat in self.coco_gt.loadCats(self.keypoint_category_ids):
        if len(cat.get("keypoints", [])) != self._num_keypoints:
          raise ValueError(f"category {cat['id']} has {len(cat.get('keypoints', []))} "
                           f"keypoints; the detections have {self._num_keypoints}")
    if not self._image_ids:
      logging.warning("COCOEvaluator: no image was added")
    metrics = {}
    for iou_type in types:
      names = METRIC_NAMES[iou_type]
      results = self._results_for(iou_type)
      if not results:
        logging.warning("COCOEvaluator: no %s results over %d images; %s metrics are 0",
                        iou_type, self.num_images, iou_type)
        metrics.update({f"{iou_type}/{n}": 0.0 for n in names})
        continue
      start = time.time()
      if not quiet:
        print(f"COCOeval {iou_type} over {self.num_images} images:")
      keypoints = iou_type == "keypoints"
      stats = self.ground_truth.evaluate(
          results, iou_type, self._image_ids,
          category_ids=self.keypoint_category_ids if keypoints else None,
          oks_sigmas=self._sigmas() if keypoints else None, quiet=quiet)
      logging.info("COCOeval %s (%s) took %.1fs", iou_type, self.ground_truth.backend,
                   time.time() - start)
      metrics.update(backends.stats_as_metrics(iou_type, names, stats[:len(names)]))
    return metrics
