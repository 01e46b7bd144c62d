"""A prepared TFDS detection dataset as a source: records by number, in our schema.

    --config.data.source=tfds --config.data.tfds_name=NAME[/CONFIG][:VERSION]
        [--config.data.tfds_data_dir=DIR] [--config.data.tfds_train_split=train
        --config.data.tfds_eval_split=validation]

The dataset must be prepared already (nothing is downloaded). Every record
is read by its number, so batches, their order and a resumed run are exactly
those of a converted split (``input_pipeline``): through TFDS's random access
(``tfds.data_source``) for ``file_format="array_record"``, and for TFDS's
default, TFRecord shards, through an index of their framing
(``TfrecordShards``: each record's offset, read from the headers when the
split is opened; reads check both CRCs, as a converted split's do).

Features read (COCO's layout in TFDS): ``image`` (encoded JPEG or PNG),
``objects/bbox`` (normalised ymin, xmin, ymax, xmax), ``objects/label`` (a
ClassLabel: its names are the categories); optional: ``image/id`` (default:
the record's number), ``image/filename``, ``objects/is_crowd`` (default 0),
``objects/area`` (default: the mask's, else the box's) and per-object masks
``objects/segmentation`` or ``objects/mask`` (full-image single-channel
images, foreground > 0; LVIS's layout). Without masks the dataset is
box-only (meta ``has_masks`` false): TFDS's ``coco/2017`` has none, so mask
AP needs a converted split. A missing required feature is named
(``records.SourceError``).

``TfdsSplit`` offers what ``records.RecordFile`` offers: ``read(i)`` gives
record i in the converted schema (``records.to_example``: the image bytes as
stored, boxes in absolute xyxy pixels clipped to the image, masks cropped to
their box's pixel window), and ``ground_truth()`` the COCO JSON built from
the same instances (categories numbered from 1 in label order), which
evaluation scores against. An object whose box has no area inside the image
is left out of both, as the converter leaves it out. Opening a split reads
every record once for its index (instances per image, image sizes and ids).
"""

import io
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from mrcnn_jax import storage
from mrcnn_jax.data import records as records_lib

REQUIRED = ("image", "objects/bbox", "objects/label")
MASK_FEATURES = ("objects/segmentation", "objects/mask")
INT32_MAX = 2 ** 31 - 1


def _values(feature) -> list:
  kind = feature.WhichOneof("kind")
  return list(getattr(feature, kind).value) if kind else []


def _builder(name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError, bad names
    where = f" in {data_dir}" if data_dir else ""
    raise records_lib.SourceError(
        f"TFDS dataset {name}{where}: cannot be opened ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200]})") from None


def _feature_names(features, prefix: str = "") -> List[str]:
  """Flat names ("objects/bbox") of a FeaturesDict, Sequences of dicts looked into."""
  names = []
  inner = getattr(features, "feature", features)  # a Sequence holds its dict
  for key in getattr(inner, "keys", lambda: [])():
    names.append(prefix + key)
    names.extend(_feature_names(inner[key], f"{prefix}{key}/"))
  return names


class _BadRecord(Exception):
  """A record that cannot be read or used (the reason; the caller names the record)."""


def _mask(png: bytes, h: int, w: int) -> np.ndarray:
  """A full-image mask feature -> ``[h, w]`` bool (foreground > 0)."""
  try:
    with Image.open(io.BytesIO(png)) as im:
      mask = np.asarray(im)
  except Exception as e:  # pylint: disable=broad-except  # any decoder failure
    raise _BadRecord(f"undecodable mask ({type(e).__name__}: {str(e)[:120]})") from None
  mask = mask.reshape(mask.shape[0], mask.shape[1], -1)[..., 0] > 0
  if mask.shape != (h, w):
    raise _BadRecord(f"a mask is {mask.shape[1]}x{mask.shape[0]}, the image {w}x{h}")
  return mask


def _boxes(feature, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
  """(absolute xyxy boxes clipped to the image [N, 4], which of them have an area [N])."""
  yxyx = np.asarray(_values(feature["objects/bbox"]), np.float32).reshape(-1, 4)
  labels = _values(feature["objects/label"])
  if len(labels) != len(yxyx):
    raise _BadRecord(f"{len(yxyx)} boxes but {len(labels)} labels")
  boxes = np.stack([yxyx[:, 1] * w, yxyx[:, 0] * h, yxyx[:, 3] * w, yxyx[:, 2] * h], 1)
  boxes = np.clip(boxes, 0, np.asarray([w, h, w, h], np.float32))
  return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class TfrecordShards:
  """Random access to the records of TFRecord shards (a TFDS split prepared as
  tfrecord), through an index of their framing built when opened (thread-safe).
  A read that fails after retries raises ``storage.ReadError``."""

  def __init__(self, paths: List[str]):
    self._files = [storage.RangeReader(p) for p in paths]
    self.paths = paths
    parts = [records_lib.scan_framing(f) for f in self._files]
    self._shard = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)]
                                 ).astype(np.int64) if parts else np.zeros(0, np.int64)
    self._offset, self._length = (np.concatenate(parts).T if parts
                                  else np.zeros((2, 0), np.int64))

  def __len__(self):
    return len(self._shard)

  def __getitem__(self, i: int) -> bytes:
    """Record ``i``'s payload; ``ValueError`` when its CRCs fail."""
    reader, offset, length = self._files[self._shard[i]], int(self._offset[i]), int(self._length[i])
    raw = storage.retried(lambda: reader.read_once(offset, length + records_lib.RECORD_OVERHEAD),
                          f"{reader.path} byte offset {offset}")
    problem, data = records_lib.check_framing(raw, length)
    if problem:
      raise ValueError(f"{problem} ({reader.path} byte offset {offset})")
    return data

  def close(self) -> None:
    for f in self._files:
      f.close()


class TfdsSplit:
  """One split of a prepared TFDS detection dataset (module docstring), read by number."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _builder(name, data_dir)
    self.directory = f"TFDS {builder.info.full_name} split {split}"
    features = builder.info.features
    names = set(_feature_names(features))
    for required in REQUIRED:
      if required not in names:
        raise records_lib.SourceError(
            f"{self.directory}: has no feature '{required}' (a detection dataset needs "
            f"{', '.join(REQUIRED)}; it has {', '.join(sorted(names))})")
    if split not in builder.info.splits:
      raise records_lib.SourceError(f"{self.directory}: no such split (it has "
                                    f"{', '.join(builder.info.splits)})")
    self._mask_key = next((k for k in MASK_FEATURES if k in names), None)
    if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
      self._source = TfrecordShards([str(p) for p in builder.info.splits[split].filepaths])
    else:
      try:
        self._source = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
      except NotImplementedError:
        raise records_lib.SourceError(
            f"{self.directory}: stored as {builder.info.file_format.value}, which has no "
            f"random access; prepare it as array_record or tfrecord") from None
    labels = features["objects"]["label"]
    self.meta = {
        "coco_ids": list(range(1, labels.num_classes + 1)),  # contiguous class i <-> id i + 1
        "names": list(labels.names), "keypoint_names": [], "keypoint_flip_map": [],
        "skeleton": [], "keypoint_category_ids": [], "has_masks": self._mask_key is not None,
        "source": self.directory,
    }
    self.num_keypoints, self.num_classes = 0, labels.num_classes
    self._ground_truth = None
    self._index()

  def __len__(self):
    return len(self._source)

  def close(self):
    """Closes TFRecord shards (TFDS's ArrayRecord source closes its files itself)."""
    if isinstance(self._source, TfrecordShards):
      self._source.close()

  def _index(self) -> None:
    """Instances, image size and id of every record (one pass over the split); a record
    that cannot be read stops it (``records.CorruptRecordError`` naming the record)."""
    n = len(self._source)
    counts, sizes, ids = np.zeros(n, np.int64), np.zeros((n, 2), np.int64), np.zeros(n, np.int64)
    self.file_names = []
    for i in range(n):
      try:
        feature, (h, w) = self._example(i)
        counts[i] = int(_boxes(feature, h, w)[1].sum())
      except _BadRecord as e:
        raise records_lib.CorruptRecordError(self.describe(i, str(e))) from None
      sizes[i] = h, w
      ids[i] = self._image_id(i, feature)
      name = _values(feature["image/filename"]) if "image/filename" in feature else []
      self.file_names.append(name[0].decode() if name else str(i))
    unique, uses = np.unique(ids, return_counts=True)
    if n and uses.max() > 1:
      repeated = unique[np.argmax(uses)]
      raise records_lib.SourceError(
          f"{self.directory}: image id {repeated} is used by records "
          f"{np.flatnonzero(ids == repeated)[:4].tolist()} (evaluation needs unique ids)")
    self.num_instances, self.image_sizes, self.image_id = counts, sizes, ids
    # Annotation ids 1, 2, ... in record order (ground truth and records agree).
    self._first_annotation = np.concatenate([[1], 1 + np.cumsum(counts)])[:n]

  def _example(self, i: int):
    """(the record's features, (h, w) of its image from the encoded header)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      feature = tf.train.Example.FromString(self._source[i]).features.feature
      with Image.open(io.BytesIO(_values(feature["image"])[0])) as im:
        w, h = im.size
    except storage.ReadError as e:  # an I/O failure, not bad data: never skipped
      raise records_lib.UnreadableRecordError(self.describe(i, f"unreadable: {e}")) from None
    except Exception as e:  # pylint: disable=broad-except  # a corrupt record or image
      raise _BadRecord(f"unreadable ({type(e).__name__}: {str(e)[:160]})") from None
    return feature, (h, w)

  def _image_id(self, i: int, feature) -> int:
    if "image/id" not in feature:
      return i
    value = int(_values(feature["image/id"])[0])
    if not 0 <= value <= INT32_MAX:
      raise records_lib.SourceError(self.describe(
          i, f"image/id {value} does not fit in int32 (the input pipeline carries image ids "
             f"as int32)"))
    return value

  # ---------------------------------------------------------------- records
  def instances(self, i: int) -> Dict[str, object]:
    """Record ``i`` as the converter's record fields (``records.to_example``'s ``rec``),
    with its image id, file name and full-image masks (None when box-only); raises
    ``records.CorruptRecordError`` naming it when it cannot be read."""
    try:
      return self._instances(i)
    except _BadRecord as e:
      raise records_lib.CorruptRecordError(self.describe(i, str(e))) from None

  def _instances(self, i: int) -> Dict[str, object]:
    from mrcnn_jax.data import coco  # pylint: disable=g-import-not-at-top
    feature, (h, w) = self._example(i)
    boxes, keep = _boxes(feature, h, w)
    get = lambda key, default: (np.asarray(_values(feature[key])) if key in feature
                                else np.full(len(boxes), default))[keep]
    masks = None
    if self._mask_key:
      pngs = _values(feature[self._mask_key])
      if len(pngs) != len(boxes):
        raise _BadRecord(f"{len(boxes)} boxes but {len(pngs)} masks in {self._mask_key}")
      masks = [_mask(png, h, w) for png, k in zip(pngs, keep) if k]
    boxes = boxes[keep]
    if "objects/area" in feature:
      area = get("objects/area", 0)
    elif masks is not None:
      area = [m.sum() for m in masks]
    else:
      area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Each mask is stored cropped to its box's integer pixels, as the converter does.
    windows = np.stack([np.floor(boxes[:, 0]), np.floor(boxes[:, 1]),
                        np.ceil(boxes[:, 2]), np.ceil(boxes[:, 3])], 1).astype(np.int64)
    crops = [masks[k][y0:y1, x0:x1] if masks is not None else np.zeros((y1 - y0, x1 - x0), bool)
             for k, (x0, y0, x1, y1) in enumerate(windows.tolist())]
    windows[:, 2:] -= windows[:, :2]  # x, y, w, h
    first = int(self._first_annotation[i])
    return {
        "image_id": int(self.image_id[i]), "file_name": self.file_names[i], "masks": masks,
        "record": {
            "image": _values(feature["image"])[0], "height": h, "width": w,
            "boxes": boxes.astype(np.float32), "classes": get("objects/label", 0),
            "is_crowd": get("objects/is_crowd", 0).astype(np.int64),
            "areas": np.asarray(area, np.float32).reshape(-1),
            "ann_ids": np.arange(first, first + len(boxes), dtype=np.int64),
            "keypoints": np.zeros((len(boxes), 0, 3), np.float32),
            "mask_png": [coco.mask_png(c) for c in crops], "mask_window": windows,
        },
    }

  def read(self, i: int) -> bytes:
    """Record ``i`` serialized in the converted schema (``records.parse`` reads it)."""
    out = self.instances(i)
    return records_lib.to_example(out["image_id"], out["file_name"], out["record"])

  def problem(self, i: int) -> Optional[str]:
    """Why record ``i`` cannot be used (None: it can)."""
    try:
      return records_lib.problem_of(records_lib.to_example(
          int(self.image_id[i]), self.file_names[i], self._instances(i)["record"]))
    except _BadRecord as e:
      return str(e)

  def describe(self, i: int, problem: str) -> str:
    """One line naming record ``i`` (and its image id once indexed): the problem."""
    known = getattr(self, "image_id", None)
    image = f", image id {int(known[i])}" if known is not None else ""
    return f"{self.directory}: record {i}{image}: {problem}"

  # ---------------------------------------------------------------- evaluation
  def ground_truth(self) -> dict:
    """The split's COCO JSON (images, annotations with RLE masks when it has masks,
    categories), built from the records' instances; computed once."""
    if self._ground_truth is not None:
      return self._ground_truth
    from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
    images, annotations = [], []
    for i in range(len(self)):
      out = self.instances(i)
      rec = out["record"]
      images.append({"id": out["image_id"], "file_name": out["file_name"],
                     "height": int(rec["height"]), "width": int(rec["width"])})
      for k, (x1, y1, x2, y2) in enumerate(rec["boxes"].tolist()):
        ann = {"id": int(rec["ann_ids"][k]), "image_id": out["image_id"],
               "category_id": self.meta["coco_ids"][int(rec["classes"][k])],
               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(rec["areas"][k]),
               "iscrowd": int(rec["is_crowd"][k])}
        if out["masks"] is not None:
          rle = mask_utils.encode(np.asfortranarray(out["masks"][k].astype(np.uint8)))
          ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        annotations.append(ann)
    categories = [{"id": cid, "name": name}
                  for cid, name in zip(self.meta["coco_ids"], self.meta["names"])]
    self._ground_truth = {"images": images, "annotations": annotations,
                          "categories": categories}
    return self._ground_truth
