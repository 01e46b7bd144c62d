"""The converted split: its example schema (write and parse), its index, its reader,
and the static batch every pipeline yields.

A converted split is a directory of

    data-SSSSS-of-NNNNN.tfrecord  TFRecord shards; record r goes to shard r mod N
    index.json         {"shards": [names], "records": [[shard, byte offset, length,
                       instances, image id], ...], "image_sizes": [[h, w], ...]}
    meta.json          class-id mapping, names, keypoint metadata, has_masks, summary
    ground_truth.json  the COCO JSON of exactly what was converted (evaluation's)
    problems.txt       one line per input problem the converter met

Each record is a ``tf.train.Example`` (``to_example`` writes it, ``parse``
reads it): the encoded image, its id, size and file name; per instance the
box (xyxy, original pixels), contiguous class, iscrowd, area, annotation id,
keypoints (COCO integer pixels, [x, y, v] per keypoint) and the mask as a PNG
of the box's integer pixel window (``objects/mask_window``: x, y, w, h).

TFRecord framing, which ``RecordFile`` checks on every read: u64 length,
u32 masked CRC32C of the length, the payload, u32 masked CRC32C of the
payload (``RECORD_OVERHEAD`` bytes around each payload).
"""

import dataclasses
import functools
import io
import struct
from typing import Any, Dict, Optional, Tuple

import google_crc32c
import numpy as np
import tensorflow as tf

from mrcnn_jax import storage

RECORD_OVERHEAD = 16  # TFRecord framing: u64 length, u32 crc, data, u32 crc
GROUND_TRUTH = "ground_truth.json"  # beside the shards: what evaluation scores against
_CRC_MASK_DELTA = 0xa282ead8  # TFRecord's masked CRC32C (tsl/lib/hash/crc32c.h)


def masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xffffffff


def check_framing(raw: bytes, length: int) -> Tuple[Optional[str], bytes]:
  """(problem or None, payload) of ``raw``: one framed record whose payload the index
  says is ``length`` bytes (module docstring's framing)."""
  if len(raw) < length + RECORD_OVERHEAD:
    return f"the shard ends {length + RECORD_OVERHEAD - len(raw)} bytes early (truncated)", b""
  (stored,), (length_crc,) = struct.unpack("<Q", raw[:8]), struct.unpack("<I", raw[8:12])
  if masked_crc(raw[:8]) != length_crc or stored != length:
    return "corrupt framing (length or its CRC does not match the index)", b""
  data = raw[12:12 + length]
  if masked_crc(data) != struct.unpack("<I", raw[12 + length:])[0]:
    return "data CRC mismatch (corrupt bytes)", b""
  return None, data


def scan_framing(reader: storage.RangeReader) -> np.ndarray:
  """``[N, 2]`` (byte offset, payload length) of every record of a TFRecord file, read
  from the framing's headers alone; raises ``CorruptRecordError`` naming the file and
  offset where a header is cut short or fails its CRC."""
  found, offset = [], 0
  while True:
    head = storage.retried(functools.partial(reader.read_once, offset, 12),
                           f"{reader.path} byte offset {offset}")
    if not head:
      return np.asarray(found, np.int64).reshape(-1, 2)
    if len(head) < 12 or masked_crc(head[:8]) != struct.unpack("<I", head[8:12])[0]:
      raise CorruptRecordError(f"{reader.path}: record {len(found)} (byte offset {offset}): "
                               f"corrupt or truncated framing")
    (length,) = struct.unpack("<Q", head[:8])
    found.append((offset, length))
    offset += length + RECORD_OVERHEAD


# ------------------------------------------------------------------ schema
def to_example(image_id: int, file_name: str, rec: dict) -> bytes:
  """One image's record fields (``coco.convert_image``'s ``record``) -> serialized Example."""
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
  # deterministic: the features map in a fixed order, so the same input gives the same
  # bytes (protobuf's default map order varies from run to run).
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)


FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.int64),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "objects/bbox": tf.io.VarLenFeature(tf.float32),
    "objects/class": tf.io.VarLenFeature(tf.int64),
    "objects/is_crowd": tf.io.VarLenFeature(tf.int64),
    "objects/area": tf.io.VarLenFeature(tf.float32),
    "objects/keypoints": tf.io.VarLenFeature(tf.float32),
    "objects/mask_png": tf.io.VarLenFeature(tf.string),
    "objects/mask_window": tf.io.VarLenFeature(tf.int64),
}


def parse(serialized: tf.Tensor, num_keypoints: int) -> Dict[str, tf.Tensor]:
  """A serialized record -> dict of dense tensors (N instances, image still encoded).

  COCO keypoints are integer pixel indices: 0.5 is added to labelled ones, so
  they are continuous coordinates (pixel centres at i + 0.5), as detectron2 does.
  """
  f = tf.io.parse_single_example(serialized, FEATURES)
  dense = lambda k: tf.sparse.to_dense(f[k])
  n = tf.shape(f["objects/class"], out_type=tf.int64)[0]  # instances (-1 fails for 0 keypoints)
  keypoints = tf.reshape(dense("objects/keypoints"), [n, num_keypoints, 3])
  labelled = keypoints[..., 2:] > 0
  keypoints = tf.concat([tf.where(labelled, keypoints[..., :2] + 0.5, 0.0), keypoints[..., 2:]],
                        axis=-1)
  return {
      "encoded": f["image/encoded"],
      "image_id": f["image/id"],
      "original_size": tf.cast(tf.stack([f["image/height"], f["image/width"]]), tf.int32),
      "boxes": tf.reshape(dense("objects/bbox"), [-1, 4]),
      "classes": tf.cast(dense("objects/class"), tf.int32),
      "is_crowd": tf.cast(dense("objects/is_crowd"), tf.bool),
      "areas": dense("objects/area"),
      "keypoints": keypoints,
      "mask_png": dense("objects/mask_png"),
      "mask_window": tf.cast(tf.reshape(dense("objects/mask_window"), [-1, 4]), tf.float32),
  }


# ------------------------------------------------------------------ reader
class SourceError(ValueError):
  """A data source that cannot be used as configured (the CLIs name it and exit 2)."""


class CorruptRecordError(ValueError):
  """A record that fails its checksum or does not decode (the CLIs exit 2)."""


class UnreadableRecordError(CorruptRecordError):
  """A record whose bytes could not be read after ``storage.READ_TRIES`` tries.

  An input/output failure, not bad data: it stops the run whatever
  ``data.on_corrupt`` says (a skip would silently train on less).
  """


def problem_of(serialized: bytes) -> Optional[str]:
  """Why a serialized record does not decode (None: it does): the Example, then the
  image and every mask PNG, decoded on the host (PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    feature = tf.train.Example.FromString(serialized).features.feature
    with Image.open(io.BytesIO(feature["image/encoded"].bytes_list.value[0])) as im:
      im.load()
  except Exception as e:  # pylint: disable=broad-except  # any decoder failure
    return f"undecodable image ({type(e).__name__}: {str(e)[:120]})"
  for k, png in enumerate(feature["objects/mask_png"].bytes_list.value):
    try:
      with Image.open(io.BytesIO(png)) as im:
        im.load()
    except Exception as e:  # pylint: disable=broad-except
      return f"undecodable mask {k} ({type(e).__name__}: {str(e)[:120]})"
  return None


class RecordFile:
  """Random access to a converted split: record bytes by number (thread-safe).

  What every source gives the input pipeline and evaluation (``tfds_source``
  gives the same): ``len``, ``read(i)`` (one serialized record of this
  schema), ``problem(i)``, ``describe(i, problem)``, per record
  ``num_instances``, ``image_id`` and ``image_sizes`` [N, 2] (None for splits
  converted before the index held them), ``meta`` and ``ground_truth()``.
  """

  def __init__(self, directory: str):
    self.directory = directory
    try:
      index = storage.read_json(storage.join(directory, "index.json"))
      self.meta = storage.read_json(storage.join(directory, "meta.json"))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{directory}: not a converted split ({e.filename} missing); "
                              f"run python -m mrcnn_jax.data.coco first") from None
    except Exception as e:  # pylint: disable=broad-except  # OSError or a bucket's tf.errors
      raise storage.UnreachableError(f"{directory}: cannot read the converted split "
                                     f"({type(e).__name__}: {str(e)[:200]})") from None
    records = np.asarray(index["records"], np.int64).reshape(-1, 5)
    self.shard, self.offset, self.length, self.num_instances, self.image_id = records.T
    sizes = index.get("image_sizes")
    self.image_sizes = None if sizes is None else np.asarray(sizes, np.int64).reshape(-1, 2)
    self.shard_names = list(index["shards"])
    self._files = [storage.RangeReader(storage.join(directory, s)) for s in index["shards"]]
    self.num_keypoints = len(self.meta["keypoint_names"])
    self.num_classes = len(self.meta["coco_ids"])
    self._ground_truth = None

  def close(self):
    """Closes the shard files; ``read`` fails after this."""
    files, self._files = getattr(self, "_files", []), []
    for f in files:
      f.close()

  def __del__(self):  # so that RecordFile(d).meta does not leak the shards' descriptors
    self.close()

  def __len__(self):
    return len(self.shard)

  def ground_truth_path(self) -> str:
    """The converter's ground_truth.json (older conversions: the source annotations)."""
    if "ground_truth" in self.meta:
      return storage.join(self.directory, self.meta["ground_truth"])
    return self.meta["source_annotations"]

  def ground_truth(self) -> dict:
    """The split's COCO ground truth, read once and kept (callers must not change it)."""
    if self._ground_truth is None:
      self._ground_truth = storage.read_json(self.ground_truth_path())
    return self._ground_truth

  def read(self, i: int) -> bytes:
    """Serialized example ``i``, its framing checked. Raises ``CorruptRecordError``
    naming the record, ``UnreadableRecordError`` when reading it failed after retries."""
    problem, data = self._read_checked(i)
    if problem:
      raise CorruptRecordError(self.describe(i, problem))
    return data

  def _read_checked(self, i: int):
    """(problem or None, payload), the framing checked (module docstring)."""
    if not self._files:
      raise ValueError(f"{self.directory}: read from a closed RecordFile")
    n = int(self.length[i])
    shard = self._files[self.shard[i]]
    try:
      raw = storage.retried(lambda: shard.read_once(int(self.offset[i]), n + RECORD_OVERHEAD),
                            f"{shard.path} byte offset {int(self.offset[i])}")
    except storage.ReadError as e:
      raise UnreadableRecordError(self.describe(i, f"unreadable: {e}")) from None
    return check_framing(raw, n)

  def describe(self, i: int, problem: str) -> str:
    """One line naming record ``i``: split, shard, record number, image id, file name."""
    shard = int(self.shard[i])
    number = int(np.count_nonzero(self.shard[:i] == shard))
    return (f"{self.directory}: shard {self.shard_names[shard]} record {number} "
            f"(record {i} of the split, byte offset {int(self.offset[i])}), image id "
            f"{int(self.image_id[i])}, file {self._file_name(int(self.image_id[i]))}: {problem}")

  def _file_name(self, image_id: int) -> str:
    try:
      images = self.ground_truth()["images"]
      return next((im["file_name"] for im in images if im["id"] == image_id), "?")
    except Exception:  # pylint: disable=broad-except  # naming is best effort
      return "?"

  def problem(self, i: int) -> Optional[str]:
    """Why record ``i`` cannot be used (None: it can): its framing, then ``problem_of``."""
    problem, data = self._read_checked(i)
    return problem or problem_of(data)


# ------------------------------------------------------------------ batch
@dataclasses.dataclass(frozen=True)
class ArraySpec:
  """Shape and NumPy dtype of one batch array (a leaf for ``jax.tree``)."""
  shape: Tuple[int, ...]
  dtype: Any


def batch_spec(batch_size: int, canvas: Tuple[int, int], max_instances: int, mask_size: int,
               num_keypoints: int) -> Dict[str, Any]:
  """The shapes and dtypes of one padded batch, as ``input_pipeline.make_dataset``
  yields it (B images of one canvas (H, W), G instance slots, M x M masks, K keypoints)."""
  b, (h, w), g = batch_size, canvas, max_instances
  s = lambda shape, dtype=np.float32: ArraySpec((b, *shape), np.dtype(dtype))
  return {
      "images": s((h, w, 3)),
      "image_info": {"image_size": s((2,), np.int32), "original_size": s((2,), np.int32),
                     "scale": s((2,)), "image_id": s((), np.int32), "valid": s((), bool),
                     "num_dropped": s((), np.int32)},
      "gt_boxes": s((g, 4)), "gt_classes": s((g,), np.int32), "gt_valid": s((g,), bool),
      "gt_is_crowd": s((g,), bool), "gt_masks": s((g, mask_size, mask_size)),
      "gt_keypoints": s((g, num_keypoints, 3)),
  }


def placeholder_batch(spec: Dict[str, Any]) -> Dict[str, Any]:
  """A batch of ``spec`` holding no instances: zero images filling their canvas
  (image_size = original_size = the canvas, scale 1, every image valid)."""
  out = {k: v for k, v in spec.items() if k != "image_info"}
  out = {k: np.zeros(v.shape, v.dtype) for k, v in out.items()}
  info = {k: np.zeros(v.shape, v.dtype) for k, v in spec["image_info"].items()}
  canvas = spec["images"].shape[1:3]
  info["image_size"][:] = canvas
  info["original_size"][:] = canvas
  info["scale"][:] = 1
  info["valid"][:] = True
  out["image_info"] = info
  return out
