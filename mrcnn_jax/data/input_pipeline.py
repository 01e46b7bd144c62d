"""tf.data pipelines: a split's records -> static-shaped batches.

The records come from a converted split (``records.RecordFile``) or a
prepared TFDS dataset (``tfds_source.TfdsSplit``), per ``config.data.source``
(``open_split``); both give records of the one schema (``records.parse``) by
number. ``make_dataset(config, split, ...)`` yields numpy dicts whose shapes
never change (``records.batch_spec``):

    images        [B, H, W, 3] float32, normalised (config.data.mean/std/channel_order)
    image_info    image_size [B, 2] (h, w inside the canvas), original_size [B, 2],
                  scale [B, 2] (sy, sx: original -> canvas pixels), image_id [B],
                  valid [B] (False on eval padding), num_dropped [B]
    gt_boxes      [B, G, 4]   gt_classes [B, G]   gt_valid [B, G]   gt_is_crowd [B, G]
    gt_masks      [B, G, M, M] (box-cropped)      gt_keypoints [B, G, K, 3]

Every batch is of one canvas (``config.data.canvas_sizes``, or the one
``canvas_size``; see ``canvases``), so ``images`` is [B, H, W, 3] of that
canvas's H and W; the batches of a run come in as many shapes as it has
canvases.

Order is a pure function of the seed and the step (``canvases.TrainOrder``):
with one canvas, the training example at global position p = step * B + i
is record ``perm_e[p mod n]`` of epoch ``e = p // n`` (``perm_e`` a
permutation seeded by (seed, e)); with several, each step's canvas is
drawn per round of steps and its images are that canvas's share of the same
permutations. The augmentation of the example at global position p is
seeded by (seed, p). A run resumed at step k therefore sees exactly the
batches an uninterrupted run would. Records are read by number (a converted
split's byte-offset index; a TFDS split's random access). With several
processes, each reads only its own contiguous slice of every global batch,
all of one canvas.

Evaluation visits every record once: each canvas's records in file order,
canvas after canvas; each canvas's last global batch is padded with copies
of record 0 flagged ``valid = False``.

Corrupt records: every read checks the TFRecord framing's two masked CRC32Cs
(of the length and of the data), and a record that fails them or does not
decode (image or mask) is dropped from the stream and named in
``RecordFaults`` (split, shard, record, image id, file name).
``config.data.on_corrupt`` says what the caller (train, evaluate) does:
"fail" (the default) stops with ``records.CorruptRecordError``; "skip" logs and
counts it, and the batch is filled from the next records, so it keeps its
shape (a resumed run then sees the batches shifted by the skipped records).
A record whose bytes cannot be read (a bucket that keeps failing after
``storage.READ_TRIES`` tries) is not bad data: ``records.UnreadableRecordError``
names it and stops the run whatever on_corrupt says.

Converted splits may lie on any filesystem ``storage`` reaches (gs://,
file://, ...): records are read by byte offset through ``storage.RangeReader``.
"""

import numbers
import threading
from typing import List, Optional

import numpy as np
import tensorflow as tf

from mrcnn_jax.data import canvases as canvas_lib
from mrcnn_jax.data import records as records_lib
from mrcnn_jax.data import transforms


SOURCES = ("records", "tfds")  # config.data.source


def open_split(config, split: str):
  """The reader of ``split`` ("train" or "eval") from ``config.data.source``: a converted
  split (``records.RecordFile`` of data.train_dir / data.eval_dir, the default) or a
  prepared TFDS dataset (``tfds_source.TfdsSplit`` of data.tfds_name's
  data.tfds_train_split / data.tfds_eval_split)."""
  d = config.data
  if split not in ("train", "eval"):
    raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
  source = d.get("source", "records")
  if source not in SOURCES:
    raise records_lib.SourceError(f"config.data.source: expected one of {SOURCES}, got "
                                  f"{source!r}")
  if source == "tfds":
    if not d.get("tfds_name"):
      raise records_lib.SourceError("config.data.source is 'tfds' but config.data.tfds_name "
                                    "is empty; set it to NAME[/CONFIG][:VERSION]")
    from mrcnn_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSplit(
        d.tfds_name, d.get("tfds_train_split", "train") if split == "train"
        else d.get("tfds_eval_split", "validation"), d.get("tfds_data_dir") or None)
  return records_lib.RecordFile(d.train_dir if split == "train" else d.eval_dir)


class RecordFaults:
  """The records a pipeline dropped, in stream order, each named by ``RecordFile.describe``.

  Filled from tf.data's thread that sees the stream after the dropping; the
  caller reads ``new()`` after each batch (train and evaluate do) and fails
  or counts per ``config.data.on_corrupt``.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._items: List[str] = []
    self._unreadable: List[str] = []
    self._read = 0

  def add(self, description: str) -> None:
    with self._lock:
      self._items.append(description)

  def add_unreadable(self, description: str) -> None:
    """A record that could not be read: ``new`` raises it (whatever on_corrupt says)."""
    with self._lock:
      self._unreadable.append(description)

  def new(self) -> List[str]:
    """Descriptions added since the last call; raises ``records.UnreadableRecordError`` for
    a record that could not be read."""
    with self._lock:
      if self._unreadable:
        raise records_lib.UnreadableRecordError(self._unreadable[0])
      items, self._read = self._items[self._read:], len(self._items)
    return items

  def __len__(self):
    """How many were handed out by ``new`` (those the caller has acted on)."""
    with self._lock:
      return self._read


def make_dataset(config, split: str, *, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1, batch_size: Optional[int] = None,
                 faults: Optional[RecordFaults] = None, records=None) -> tf.data.Dataset:
  """Batches of ``split`` ("train" or "eval") as documented in the module docstring.

  Args:
    config: the experiment config; reads ``config.data`` and ``config.seed``.
    split: "train" (infinite, shuffled, augmented) or "eval" (one pass).
    start_step: first training step to produce (resuming).
    process_index, process_count: this host and how many read the global batch.
    batch_size: global batch size; default ``config.batch_size`` (train) or
      ``config.eval_batch_size`` (eval).
    faults: collects the records dropped as corrupt, for the caller to act on
      per ``config.data.on_corrupt``; without it, a corrupt record fails the
      iteration (a TensorFlow error whose text names it) unless on_corrupt is "skip".
    records: the split's reader (``open_split``), when the caller has it open.
  """
  d = config.data
  is_train = split == "train"
  if split not in ("train", "eval"):
    raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
  if records is None:
    records = open_split(config, split)
  global_batch = batch_size or (config.batch_size if is_train else config.eval_batch_size)
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  canvases = canvas_lib.canvas_sizes(config)
  canvas_of = canvas_lib.record_canvases(records, config)
  flip_map = records.meta["keypoint_flip_map"]
  min_size, max_size, rounding = canvas_lib.resize_rule(config)
  if rounding not in transforms.ROUNDINGS:
    raise ValueError(f"config.data.resize_rounding: expected one of {transforms.ROUNDINGS}, "
                     f"got {rounding!r}")
  on_corrupt = d.get("on_corrupt", "fail")
  if on_corrupt not in ("fail", "skip"):
    raise ValueError(f"config.data.on_corrupt: expected 'fail' or 'skip', got {on_corrupt!r}")
  # parallel_calls 0: tf.data's autotuner picks the decode parallelism at run
  # time. It runs a model thread that sleeps up to 60 s between rounds, and
  # on TF 2.21 the iterator's destructor waits for it: up to a minute lost at
  # every process exit. N > 0 fixes the parallelism and turns the tuner off.
  parallel_calls = d.get("parallel_calls", 0)
  if (isinstance(parallel_calls, bool) or not isinstance(parallel_calls, numbers.Integral)
      or parallel_calls < 0):
    raise ValueError(f"config.data.parallel_calls: expected an integer >= 0 (0 = tf.data "
                     f"autotuning), got {parallel_calls!r}")

  def load_into(canvas):
    def load(index, position, record):
      serialized = tf.numpy_function(lambda i: records.read(max(int(i), 0)), [record],
                                     tf.string, stateful=False)
      ex = records_lib.parse(tf.ensure_shape(serialized, []), records.num_keypoints)
      ex = transforms.keep_largest(ex, d.max_instances)
      ex = transforms.decode_image(ex, d.get("channel_order", "rgb"))
      if is_train:
        seed = tf.stack([tf.constant(config.seed, tf.int64), position])
        scale_range = tuple(d.scale_range) if d.get("scale_range") else None
        scale, offset, flip = transforms.random_geometry(
            ex["original_size"], canvas, seed, d.get("flip", True), scale_range,
            min_size, max_size, rounding)
      else:
        scale = transforms.fit_scale(ex["original_size"], canvas, min_size, max_size)
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
      return index, out
    return load

  def batches(canvas, locate, start_index, end_index):
    """This process's batches of one canvas: its i-th item (from ``start_index``; up to
    ``end_index`` for evaluation) is ``locate(i)`` = (global position, record; -1 for
    an eval batch's padding)."""
    ds = tf.data.Dataset.range(start_index, end_index or np.iinfo(np.int64).max)
    # One host call per item gives its position and record (a Python generator
    # source measurably slowed the XLA train step running next to it).
    ds = ds.map(lambda i: (i, *[tf.ensure_shape(t, []) for t in tf.numpy_function(
        lambda i: tuple(np.int64(v) for v in locate(int(i))), [i], [tf.int64, tf.int64],
        stateful=False)]))
    load = load_into(canvas)
    ds = ds.map(load, num_parallel_calls=int(parallel_calls) or tf.data.AUTOTUNE,
                deterministic=True)
    if not is_train:  # fill the batches a dropped record shortens (evaluate takes their number)
      pad = tf.data.Dataset.from_tensors(tuple(tf.constant(-1, tf.int64) for _ in range(3)))
      ds = ds.concatenate(pad.repeat(local).map(load))

    # A dropped (corrupt) item shows as a gap in the indices, seen in order by
    # one sequential map after ignore_errors. The eval stream's fill (index -1)
    # marks its end: gaps up to there are reported too.
    expected, last = [start_index], [-1]
    def note_gaps(index):
      final = index < 0
      if not final and index <= last[0]:  # the dataset is iterated anew
        expected[0] = start_index
      last[0] = max(last[0], index)
      while True:
        i = expected[0]
        if final and i >= end_index:
          return np.bool_(True)
        expected[0] += 1
        if not final and i >= index:
          return np.bool_(True)
        record = max(int(locate(i)[1]), 0)
        try:
          why = records.problem(record) or "the input pipeline could not decode it"
        except records_lib.UnreadableRecordError as e:  # an I/O failure: never skipped
          if faults is None:
            raise
          faults.add_unreadable(str(e))
          continue
        description = records.describe(record, why)
        if faults is not None:
          faults.add(description)
        elif on_corrupt == "fail":
          raise records_lib.CorruptRecordError(description)

    def checked(index, out):
      ok = tf.numpy_function(note_gaps, [index], tf.bool, stateful=True)
      with tf.control_dependencies([ok]):
        return tf.nest.map_structure(tf.identity, out)

    return ds.ignore_errors().map(checked).batch(local, drop_remainder=True)

  # This process's items in every global batch: [process_index * local, ... + local).
  if is_train:
    usable = np.arange(len(records))
    if d.get("filter_empty", True):
      usable = usable[records.num_instances > 0]
    if not len(usable):
      raise ValueError(f"{records.directory}: no training image has an annotation")
    order = canvas_lib.TrainOrder(usable, canvas_of[usable], len(canvases), global_batch,
                                  config.seed)
    parts = []
    for c in order.canvases_used:
      def locate(i, c=c):
        m, k = divmod(i, local)
        offset = process_index * local + k
        return (order.step_of(c, m) * global_batch + offset,
                order.record(c, m * global_batch + offset))
      parts.append(batches(canvases[c], locate, order.steps_before(c, start_step) * local,
                           None))
    ds = parts[0]
    if len(parts) > 1:
      used = order.canvases_used
      selector = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(
          lambda s: tf.ensure_shape(tf.numpy_function(
              lambda s: np.int64(used.index(order.canvas_at(int(s)))), [s], tf.int64,
              stateful=False), []))
      ds = tf.data.Dataset.choose_from_datasets(parts, selector)
  else:
    parts = []
    for c, group in enumerate(canvas_lib.eval_groups(canvas_of, len(canvases))):
      if not len(group):
        continue
      padded = -(-len(group) // global_batch) * global_batch
      def locate(i, group=group):
        step, k = divmod(i, local)
        q = step * global_batch + process_index * local + k
        return q, (group[q] if q < len(group) else -1)
      # take: the padding's extra batch never shows.
      parts.append(batches(canvases[c], locate, 0, padded // process_count)
                   .take(padded // global_batch))
    if not parts:
      raise ValueError(f"{records.directory}: the split holds no record")
    ds = parts[0]
    for part in parts[1:]:
      ds = ds.concatenate(part)
  options = tf.data.Options()
  options.threading.private_threadpool_size = d.get("threads", 0) or 0
  options.deterministic = True
  options.autotune.enabled = not parallel_calls
  return ds.with_options(options).prefetch(d.get("prefetch", 2))


def num_eval_steps(config, batch_size: Optional[int] = None, records=None) -> int:
  """Batches in one eval pass (each canvas's last one padded); ``records``: the eval
  split's reader when the caller has it open."""
  if records is None:
    records = open_split(config, "eval")
  return canvas_lib.num_eval_batches(canvas_lib.record_canvases(records, config),
                                     len(canvas_lib.canvas_sizes(config)),
                                     batch_size or config.eval_batch_size)
