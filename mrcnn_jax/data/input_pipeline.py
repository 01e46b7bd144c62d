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
import os
from typing import Iterator, Optional

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

  def __len__(self):
    return len(self.shard)

  def read(self, i: int) -> bytes:
    """Serialized example ``i`` (os.pread needs no shared file position)."""
    header = 12  # u64 length + u32 crc before the payload
    return os.pread(self._fds[self.shard[i]], int(self.length[i]), int(self.offset[i]) + header)


def _index_stream(num: int, seed: int, start: int, stride: int, width: int,
                  first_offset: int) -> Iterator:
  """Global positions of this process's examples with their epoch permutation slot."""
  cache = {}
  step = start
  while True:
    base = step * stride + first_offset
    for p in range(base, base + width):
      epoch, j = divmod(p, num)
      if epoch not in cache:
        cache.clear()
        cache[epoch] = np.random.default_rng([seed, epoch]).permutation(num)
      yield p, int(cache[epoch][j])
    step += 1


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

  if is_train:
    usable = np.arange(len(records))
    if d.get("filter_empty", True):
      usable = usable[records.num_instances > 0]
    if not len(usable):
      raise ValueError(f"{d.train_dir}: no training image has an annotation")
    stream = lambda: ((p, usable[j]) for p, j in _index_stream(
        len(usable), config.seed, start_step, global_batch, local, process_index * local))
  else:
    n = len(records)
    padded = -(-n // global_batch) * global_batch
    def stream():
      for step in range(padded // global_batch):
        base = step * global_batch + process_index * local
        for p in range(base, base + local):
          yield p, p if p < n else -1
  ds = tf.data.Dataset.from_generator(
      stream, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)))

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
          d.get("min_size", 0), d.get("max_size", 0))
    else:
      scale = transforms.fit_scale(ex["original_size"], canvas, d.get("min_size", 0),
                                   d.get("max_size", 0))
      offset, flip = tf.zeros([2]), tf.constant(False)
    ex = transforms.apply_geometry(ex, canvas, scale, offset, flip, d.mask_size, flip_map)
    out = transforms.pad_instances(ex, d.max_instances)
    out["images"] = transforms.normalize(ex["image"], d.mean, d.std)  # channels ordered at decode
    out["image_info"] = {
        "image_size": ex["image_size"], "original_size": ex["original_size"],
        "scale": ex["scale"], "image_id": tf.cast(ex["image_id"], tf.int32),
        "valid": record >= 0, "num_dropped": ex["num_dropped"],
    }
    return out

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = d.get("threads", 0) or 0
  options.deterministic = True
  return ds.with_options(options).prefetch(d.get("prefetch", 2))


def num_eval_steps(config, batch_size: Optional[int] = None) -> int:
  """Batches in one eval pass (the last one padded)."""
  n = len(RecordFile(config.data.eval_dir))
  b = batch_size or config.eval_batch_size
  return -(-n // b)
