"""tf.data pipelines: converted COCO splits -> static-shaped batches.

``make_dataset(config, split, ...)`` yields numpy dicts whose shapes never
change:

    images        [B, H, W, 3] float32, normalised (config.data.mean/std/channel_order)
    image_info    image_size [B, 2] (h, w inside the canvas), original_size [B, 2],
                  scale [B, 2] (sy, sx: original -> canvas pixels), image_id [B],
                  valid [B] (False on eval padding), num_dropped [B]
    gt_boxes      [B, G, 4]   gt_classes [B, G]   gt_valid [B, G]   gt_is_crowd [B, G]
    gt_masks      [B, G, M, M] (box-cropped)      gt_keypoints [B, G, K, 3]

Order is a pure function of the seed and the step: the training example at
global position p is record ``perm_e[p mod n]`` of epoch ``e = p // n``
(``perm_e`` a permutation seeded by (seed, e)), and its augmentation is
seeded by (seed, p). A run resumed at step k therefore sees exactly the
batches an uninterrupted run would. Records are read by number through the
converter's byte-offset index. With several processes, each reads only its
own contiguous slice of every global batch.

Evaluation visits every record once, in file order; the last global batch is
padded with copies of record 0 flagged ``valid = False``.
"""

import json
import numbers
import os
import threading
from typing import Optional

import numpy as np
import tensorflow as tf

from mrcnn_jax.data import transforms


class RecordFile:
  """Random access to a converted split: record bytes by number (thread-safe)."""

  def __init__(self, directory: str):
    self.directory = directory
    try:
      with open(os.path.join(directory, "index.json")) as f:
        index = json.load(f)
      with open(os.path.join(directory, "meta.json")) as f:
        self.meta = json.load(f)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{directory}: not a converted split ({e.filename} missing); "
                              f"run python -m mrcnn_jax.data.coco first") from None
    records = np.asarray(index["records"], np.int64).reshape(-1, 5)
    self.shard, self.offset, self.length, self.num_instances, self.image_id = records.T
    self._fds = [os.open(os.path.join(directory, s), os.O_RDONLY) for s in index["shards"]]
    self.num_keypoints = len(self.meta["keypoint_names"])
    self.num_classes = len(self.meta["coco_ids"])

  def close(self):
    """Closes the shard files; ``read`` fails after this."""
    fds, self._fds = getattr(self, "_fds", []), []
    for fd in fds:
      os.close(fd)

  def __del__(self):  # so that RecordFile(d).meta does not leak the shards' descriptors
    self.close()

  def __len__(self):
    return len(self.shard)

  def read(self, i: int) -> bytes:
    """Serialized example ``i`` (os.pread needs no shared file position)."""
    if not self._fds:
      raise ValueError(f"{self.directory}: read from a closed RecordFile")
    header = 12  # u64 length + u32 crc before the payload
    return os.pread(self._fds[self.shard[i]], int(self.length[i]), int(self.offset[i]) + header)


class _EpochOrder:
  """Record of global training position ``p``: ``usable[perm_e[p mod n]]``, ``e = p // n``.

  ``perm_e`` is seeded by (seed, e). Called from tf.data's map threads: the
  cache keeps the last two epochs' permutations (the map runs a few examples
  ahead, so it can straddle an epoch boundary) and is guarded by a lock.
  """

  def __init__(self, usable: np.ndarray, seed: int):
    self.usable, self.seed = usable, seed
    self._lock = threading.Lock()
    self._cache = {}

  def __call__(self, position) -> np.int64:
    epoch, j = divmod(int(position), len(self.usable))
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))
        self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}
        self._cache[epoch] = perm
    return np.int64(self.usable[perm[j]])


def make_dataset(config, split: str, *, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1, batch_size: Optional[int] = None) -> tf.data.Dataset:
  """Batches of ``split`` ("train" or "eval") as documented in the module docstring.

  Args:
    config: the experiment config; reads ``config.data`` and ``config.seed``.
    split: "train" (infinite, shuffled, augmented) or "eval" (one pass).
    start_step: first training step to produce (resuming).
    process_index, process_count: this host and how many read the global batch.
    batch_size: global batch size; default ``config.batch_size`` (train) or
      ``config.eval_batch_size`` (eval).
  """
  d = config.data
  is_train = split == "train"
  if split not in ("train", "eval"):
    raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
  records = RecordFile(d.train_dir if is_train else d.eval_dir)
  global_batch = batch_size or (config.batch_size if is_train else config.eval_batch_size)
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  canvas = tuple(d.canvas_size)
  flip_map = records.meta["keypoint_flip_map"]
  rounding = d.get("resize_rounding", "round")
  if rounding not in transforms.ROUNDINGS:
    raise ValueError(f"config.data.resize_rounding: expected one of {transforms.ROUNDINGS}, "
                     f"got {rounding!r}")

  # This process's positions: in every global batch (step s), the slice
  # [s * global_batch + process_index * local, ... + local). Pure tf.data
  # arithmetic: a Python generator source (from_generator) measurably slowed
  # the XLA train step running next to it (0.71 -> 0.86 s/step on 2 cores).
  def position_of(i):
    step, k = i // local, i % local
    return step * global_batch + process_index * local + k

  if is_train:
    usable = np.arange(len(records))
    if d.get("filter_empty", True):
      usable = usable[records.num_instances > 0]
    if not len(usable):
      raise ValueError(f"{d.train_dir}: no training image has an annotation")
    order = _EpochOrder(usable, config.seed)
    ds = tf.data.Dataset.range(start_step * local, np.iinfo(np.int64).max).map(position_of)
    ds = ds.map(lambda p: (p, tf.ensure_shape(
        tf.numpy_function(order, [p], tf.int64, stateful=False), [])))
  else:
    n = len(records)
    padded = -(-n // global_batch) * global_batch
    ds = tf.data.Dataset.range(padded // process_count).map(position_of)
    ds = ds.map(lambda p: (p, tf.where(p < n, p, tf.constant(-1, tf.int64))))

  def load(position, record):
    serialized = tf.numpy_function(lambda i: records.read(max(int(i), 0)), [record], tf.string,
                                   stateful=False)
    ex = transforms.parse(tf.ensure_shape(serialized, []), records.num_keypoints)
    ex = transforms.keep_largest(ex, d.max_instances)
    ex = transforms.decode_image(ex, d.get("channel_order", "rgb"))
    if is_train:
      seed = tf.stack([tf.constant(config.seed, tf.int64), position])
      scale_range = tuple(d.scale_range) if d.get("scale_range") else None
      scale, offset, flip = transforms.random_geometry(
          ex["original_size"], canvas, seed, d.get("flip", True), scale_range,
          d.get("min_size", 0), d.get("max_size", 0), rounding)
    else:
      scale = transforms.fit_scale(ex["original_size"], canvas, d.get("min_size", 0),
                                   d.get("max_size", 0))
      offset, flip = tf.zeros([2]), tf.constant(False)
    ex = transforms.apply_geometry(ex, canvas, scale, offset, flip, d.mask_size, flip_map,
                                   rounding)
    out = transforms.pad_instances(ex, d.max_instances)
    out["images"] = transforms.normalize(ex["image"], d.mean, d.std,  # channels ordered at decode
                                         image_size=ex["image_size"])
    out["image_info"] = {
        "image_size": ex["image_size"], "original_size": ex["original_size"],
        "scale": ex["scale"], "image_id": tf.cast(ex["image_id"], tf.int32),
        "valid": record >= 0, "num_dropped": ex["num_dropped"],
    }
    return out

  # parallel_calls 0: tf.data's autotuner picks the decode parallelism at run
  # time. It runs a model thread that sleeps up to 60 s between rounds, and
  # on TF 2.21 the iterator's destructor waits for it: up to a minute lost at
  # every process exit. N > 0 fixes the parallelism and turns the tuner off.
  parallel_calls = d.get("parallel_calls", 0)
  if (isinstance(parallel_calls, bool) or not isinstance(parallel_calls, numbers.Integral)
      or parallel_calls < 0):
    raise ValueError(f"config.data.parallel_calls: expected an integer >= 0 (0 = tf.data "
                     f"autotuning), got {parallel_calls!r}")
  ds = ds.map(load, num_parallel_calls=int(parallel_calls) or tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = d.get("threads", 0) or 0
  options.deterministic = True
  options.autotune.enabled = not parallel_calls
  return ds.with_options(options).prefetch(d.get("prefetch", 2))


def num_eval_steps(config, batch_size: Optional[int] = None) -> int:
  """Batches in one eval pass (the last one padded)."""
  n = len(RecordFile(config.data.eval_dir))
  b = batch_size or config.eval_batch_size
  return -(-n // b)
