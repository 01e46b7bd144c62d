"""Canvases: the few static shapes images are padded to, which image goes to which, and
the order in which training visits them.

A config names its canvases as ``config.data.canvas_sizes = ((h, w), ...)``
or, for one canvas, ``config.data.canvas_size = (h, w)``; exactly one of the
two is set (the other left empty, ``()``). Each canvas compiles once (one
train-step and one detect program per canvas in a run). Several canvases
must be multiples of ``model.size_divisibility``, so that each image's
padded extent fits whichever holds it and its results do not depend on the
canvas. The choice reads each record's image size from the split's index
(older conversions: its ground truth).

Which canvas (``choose``): the image is resized by its rule
(``transforms.fit_scale``: fit the canvas, or shortest edge ``min_size``
capped by ``max_size``) within each canvas; it goes to the canvas where it
is largest, i.e. one that holds it at its rule's scale when any does, and
among those to the one with the least padding (the first in the config's
order on a tie). The rule's scale is the one it has in the bounding canvas
(the largest height x the largest width): with 832x1344 and 1344x832 for
the 800/1333 rule every image keeps that rule's scale (a portrait image in
the portrait canvas); with 768x1024 and 1024x768 for the fit rule an image
of aspect 4:3 or longer keeps its longer side at 1024, a squarer one is
fitted to 768 on its shorter side. An image no canvas holds at its rule's
scale is shrunk to fit: never cropped.

Training order (``TrainOrder``): every global batch (step) is of one canvas.
Canvas c's training images form their own stream: its epoch e is the
training permutation of epoch e (seeded by (seed, e), over all usable
records, as with one canvas) restricted to c's images. Steps come in
rounds of ``K = sum_c k_c`` steps, ``k_c = max(1, round(n_c / B))`` for a
canvas with n_c > 0 images (B the global batch; none for an empty one), in
an order shuffled per round by (seed, round); canvas c's m-th step takes
items m*B .. m*B + B - 1 of its stream. Everything is a pure function of
(seed, step), so a resumed run sees the batches an uninterrupted one would,
and every process of a multi-host run computes the same canvas for each
step. With one canvas this is exactly the one-canvas order: step s takes
positions s*B .. of the epoch permutations.
"""

import threading
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

Canvas = Tuple[int, int]
_ROUND_TAG = 0x63616e76  # "canv": keeps the round shuffle's seeds apart from the epochs'


def canvas_sizes(config) -> List[Canvas]:
  """The config's canvases, checked: ``data.canvas_sizes``, else ``[data.canvas_size]``."""
  d = config.data
  several, one = tuple(d.get("canvas_sizes") or ()), tuple(d.get("canvas_size") or ())
  if several and one:
    raise ValueError(
        f"config.data: canvas_size {one} and canvas_sizes {several} are both set; set one "
        f"(e.g. --config.data.canvas_size='()' to use canvas_sizes)")
  if not several and not one:
    raise ValueError("config.data: no canvas (set canvas_size or canvas_sizes)")
  sizes, name = (list(several), "canvas_sizes") if several else ([one], "canvas_size")
  canvases = []
  for c in sizes:
    c = tuple(c) if isinstance(c, (tuple, list)) else (c,)
    if len(c) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                              and v > 0 for v in c):
      raise ValueError(f"config.data.{name}: each canvas is (height, width), positive "
                       f"integers; got {c!r}")
    canvases.append((int(c[0]), int(c[1])))
  if len(set(canvases)) != len(canvases):
    raise ValueError(f"config.data.canvas_sizes: a canvas is listed twice in {canvases}")
  step = config.get("model", {}).get("size_divisibility", 0)
  if len(canvases) > 1 and step and any(v % step for c in canvases for v in c):
    # An image's padded extent (its size rounded up to this) must fit every canvas,
    # else a canvas would cut it and results would depend on the canvas.
    raise ValueError(f"config.data.canvas_sizes {canvases}: with several canvases each side "
                     f"must be a multiple of model.size_divisibility ({step})")
  return canvases


def resize_rule(config) -> Tuple[float, float, str]:
  """(min_size, max_size, rounding) of ``config.data``, as the pipeline reads them."""
  d = config.data
  return d.get("min_size", 0), d.get("max_size", 0), d.get("resize_rounding", "round")


def resized_size(size, canvas: Canvas, min_size: float = 0, max_size: float = 0,
                 rounding: str = "round") -> Tuple[int, int]:
  """(h, w) of an image of ``size`` (h, w) placed in ``canvas``: NumPy float64, the
  same arithmetic as ``transforms.fit_scale`` and ``transforms.resized_size``."""
  h, w = float(size[0]), float(size[1])
  scale = min(canvas[0] / h, canvas[1] / w)
  if min_size > 0:
    scale = min(scale, min_size / min(h, w))
    if max_size > 0:
      scale = min(scale, max_size / max(h, w))
  scaled = np.asarray([h, w], np.float64) * np.float64(scale)
  out = np.floor(scaled + 0.5) if rounding == "round" else np.floor(scaled)
  return tuple(int(v) for v in np.maximum(out, 1.0))


def choose(size, canvases: Sequence[Canvas], min_size: float = 0, max_size: float = 0,
           rounding: str = "round") -> int:
  """Index of the canvas for an image of ``size`` (h, w): the largest placement, then the
  least padding, then the config's order (module docstring)."""
  def key(i):
    h, w = resized_size(size, canvases[i], min_size, max_size, rounding)
    return (-h * w, canvases[i][0] * canvases[i][1] - h * w, i)
  return min(range(len(canvases)), key=key)


def assign(sizes: np.ndarray, canvases: Sequence[Canvas], min_size: float = 0,
           max_size: float = 0, rounding: str = "round") -> np.ndarray:
  """``[N]`` canvas index of each of ``sizes [N, 2]`` (h, w); all 0 for one canvas."""
  sizes = np.asarray(sizes).reshape(-1, 2)
  if len(canvases) == 1:
    return np.zeros(len(sizes), np.int64)
  chosen = {}
  out = np.empty(len(sizes), np.int64)
  for i, s in enumerate(map(tuple, sizes.tolist())):
    if s not in chosen:  # photos come in few sizes: each is worked out once
      chosen[s] = choose(s, canvases, min_size, max_size, rounding)
    out[i] = chosen[s]
  return out


def record_canvases(records, config) -> np.ndarray:
  """``[N]`` canvas index of every record of a split's reader under ``config``."""
  canvases = canvas_sizes(config)
  if len(canvases) == 1:
    return np.zeros(len(records), np.int64)
  return assign(image_sizes(records), canvases, *resize_rule(config))


def image_sizes(records) -> np.ndarray:
  """``[N, 2]`` (h, w) of every record: the index's ``image_sizes`` (written by the
  converter), else the split's ground truth images, by image id."""
  if records.image_sizes is not None:
    return records.image_sizes
  try:
    images = records.ground_truth()["images"]
    by_id = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
  except (tf.errors.OpError, OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{records.directory}: image sizes are needed to choose canvases; its "
                     f"index.json has none and its ground truth cannot be read ({e}); "
                     f"convert the split again") from None
  missing = [int(i) for i in records.image_id if int(i) not in by_id]
  if missing:
    raise ValueError(f"{records.directory}: its ground truth has no entry in 'images' for "
                     f"image id {missing[0]} (record "
                     f"{int(np.flatnonzero(records.image_id == missing[0])[0])}); convert the "
                     f"split again")
  return np.asarray([by_id[int(i)] for i in records.image_id], np.int64).reshape(-1, 2)


def eval_groups(canvas_of_record: np.ndarray, num_canvases: int) -> List[np.ndarray]:
  """Each canvas's records in file order (evaluation batches images of one canvas)."""
  return [np.flatnonzero(canvas_of_record == c) for c in range(num_canvases)]


def num_eval_batches(canvas_of_record: np.ndarray, num_canvases: int, batch: int) -> int:
  """Global batches in one eval pass: each canvas's images, its last batch padded."""
  return sum(-(-len(g) // batch) for g in eval_groups(canvas_of_record, num_canvases))


class TrainOrder:
  """Which canvas each training step uses and which records fill it (module docstring).

  ``usable`` are the training records (numbers in the split), ``canvas_of``
  their canvas indices. Thread-safe (tf.data calls it from its map threads);
  the few most recent epochs and rounds are cached.
  """

  def __init__(self, usable: np.ndarray, canvas_of: np.ndarray, num_canvases: int,
               batch: int, seed: int):
    self.usable, self.canvas_of = np.asarray(usable), np.asarray(canvas_of)
    self.batch, self.seed = batch, seed
    self.counts = np.bincount(self.canvas_of, minlength=num_canvases)
    self.per_round = np.where(
        self.counts > 0, np.maximum(1, np.rint(self.counts / batch)), 0).astype(np.int64)
    if len(self.counts) == 1 or np.count_nonzero(self.counts) == 1:
      self.per_round = (self.counts > 0).astype(np.int64)
    self.round_length = int(self.per_round.sum())
    self._lock = threading.Lock()
    self._epochs, self._rounds = {}, {}

  @property
  def canvases_used(self) -> List[int]:
    return [int(c) for c in np.flatnonzero(self.per_round)]

  def _round(self, r: int):
    """(canvas of each step of round r, index of each step among its canvas's steps)."""
    with self._lock:
      cached = self._rounds.get(r)
    if cached is None:
      steps = np.repeat(np.arange(len(self.per_round)), self.per_round)
      if len(self.canvases_used) > 1:
        steps = np.random.default_rng([self.seed, r, _ROUND_TAG]).permutation(steps)
      nth = np.zeros(len(steps), np.int64)
      for c in self.canvases_used:
        nth[steps == c] = np.arange(self.per_round[c])
      cached = (steps, nth)
      with self._lock:
        self._rounds = {k: v for k, v in self._rounds.items() if k >= r - 2}
        self._rounds[r] = cached
    return cached

  def canvas_at(self, step: int) -> int:
    r, j = divmod(int(step), self.round_length)
    return int(self._round(r)[0][j])

  def steps_before(self, canvas: int, step: int) -> int:
    """How many of the steps before ``step`` are of ``canvas``."""
    r, j = divmod(int(step), self.round_length)
    steps, _ = self._round(r)
    return r * int(self.per_round[canvas]) + int(np.count_nonzero(steps[:j] == canvas))

  def step_of(self, canvas: int, m: int) -> int:
    """The global step of ``canvas``'s m-th step (0-based)."""
    r, t = divmod(int(m), int(self.per_round[canvas]))
    steps, nth = self._round(r)
    return r * self.round_length + int(np.flatnonzero((steps == canvas) & (nth == t))[0])

  def record(self, canvas: int, q: int) -> np.int64:
    """Record number of item ``q`` of ``canvas``'s stream."""
    epoch, j = divmod(int(q), int(self.counts[canvas]))
    with self._lock:
      group = self._epochs.get((canvas, epoch))
    if group is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))
      group = self.usable[perm][self.canvas_of[perm] == canvas]
      with self._lock:  # per canvas (their epochs drift apart): this one's last two
        self._epochs = {k: v for k, v in self._epochs.items()
                        if k[0] != canvas or k[1] in (epoch - 1, epoch + 1)}
        self._epochs[canvas, epoch] = group
    return np.int64(group[j])


def padded_pixels(size, canvases: Sequence[Canvas], min_size: float = 0, max_size: float = 0,
                  rounding: str = "round") -> Tuple[Canvas, Tuple[int, int], int]:
  """(chosen canvas, resized (h, w), padded pixels) of an image of ``size`` (h, w)."""
  c = canvases[choose(size, canvases, min_size, max_size, rounding)]
  h, w = resized_size(size, c, min_size, max_size, rounding)
  return c, (h, w), c[0] * c[1] - h * w
