"""Canvases: which image goes where, the training order by canvas, and the pipeline's
batches of one canvas (train, resume, processes, evaluation)."""

import collections

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from mrcnn_jax.data import canvases, transforms
from mrcnn_jax.data.input_pipeline import make_dataset, num_eval_steps
from mrcnn_jax.data.records import RecordFile
from tests.data.conftest import data_config
from tests.data.test_input_pipeline import _assert_bitwise_equal, _batches, _concat

PAIR_800 = ((832, 1344), (1344, 832))  # configs/torchvision_mask_rcnn.py
PAIR_1024 = ((768, 1024), (1024, 768))  # configs/coco_mask_rcnn_r50_fpn_1x.py
LANDSCAPE, PORTRAIT = (96, 128), (128, 96)  # (h, w) for the 67..96-pixel test images


# ------------------------------------------------------------------ choice
@pytest.mark.parametrize("size, rule, canvases_, want, resized", [
    # 800/1333, floored: 480 x 640 -> 800 x 1066.67 -> 1066 wide, in the landscape canvas.
    ((480, 640), (800, 1333, "floor"), PAIR_800, 0, (800, 1066)),
    ((640, 480), (800, 1333, "floor"), PAIR_800, 1, (1066, 800)),
    # 427 x 640: 800 / 427 = 1.8735, 640 x it = 1199.06; rounded half up.
    ((427, 640), (800, 1333, "round"), PAIR_800, 0, (800, 1199)),
    # Square: both canvases hold 800 x 800 with the same padding; the first wins.
    ((500, 500), (800, 1333, "round"), PAIR_800, 0, (800, 800)),
    # A panorama: the 1333 cap, 400 x 1333.
    ((300, 1000), (800, 1333, "round"), PAIR_800, 0, (400, 1333)),
    # Fit rule: 4:3 fills 768 x 1024 exactly; 3:2 is 683 x 1024; a square is 768 x 768.
    ((480, 640), (0, 0, "round"), PAIR_1024, 0, (768, 1024)),
    ((640, 427), (0, 0, "round"), PAIR_1024, 1, (1024, 683)),
    ((500, 500), (0, 0, "round"), PAIR_1024, 0, (768, 768)),
    # A square canvas beside the pair takes the squares, at their full 1024.
    ((500, 500), (0, 0, "round"), PAIR_1024 + ((1024, 1024),), 2, (1024, 1024)),
    ((480, 640), (0, 0, "round"), PAIR_1024 + ((1024, 1024),), 0, (768, 1024)),
])
def test_each_image_goes_to_the_canvas_that_fits_it_best(size, rule, canvases_, want, resized):
  assert canvases.choose(size, canvases_, *rule) == want
  assert canvases.resized_size(size, canvases_[want], *rule) == resized


def test_the_host_arithmetic_is_the_pipelines():
  """canvases.resized_size is transforms.fit_scale + resized_size to the pixel."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    size = tuple(int(v) for v in rng.integers(1, 2000, 2))
    canvas = tuple(int(v) for v in rng.integers(32, 1400, 2))
    rule = [(0, 0), (800, 1333), (800, 0), (int(rng.integers(1, 900)), 1333)][rng.integers(4)]
    for rounding in transforms.ROUNDINGS:
      scale = transforms.fit_scale(tf.constant(size), canvas, *rule)
      want = transforms.resized_size(tf.constant(size), scale, rounding).numpy()
      assert canvases.resized_size(size, canvas, *rule, rounding) == tuple(want), (size, canvas)


def test_an_image_no_canvas_holds_is_shrunk_to_the_largest_fit():
  # 800/1333 gives 400 x 1333; neither 512 x 640 nor 640 x 512 holds it: 640 / 1000 of it.
  assert canvases.padded_pixels((300, 1000), ((512, 640), (640, 512)), 800, 1333) == (
      (512, 640), (192, 640), 512 * 640 - 192 * 640)


def _config(**data):
  return ml_collections.ConfigDict({"data": {"canvas_size": (64, 64), "canvas_sizes": (),
                                             **data}})


def test_canvas_settings_are_checked():
  assert canvases.canvas_sizes(_config()) == [(64, 64)]
  assert canvases.canvas_sizes(_config(canvas_size=(), canvas_sizes=PAIR_800)) == list(PAIR_800)
  with pytest.raises(ValueError, match="canvas_size .* and canvas_sizes .* are both set"):
    canvases.canvas_sizes(_config(canvas_sizes=PAIR_800))
  for bad in (((64,),), ((64, 0),), ((64.0, 64),), ((64, 64), (64, 64))):
    with pytest.raises(ValueError, match="canvas_sizes"):
      canvases.canvas_sizes(_config(canvas_size=(), canvas_sizes=bad))
  with pytest.raises(ValueError, match="no canvas"):
    canvases.canvas_sizes(_config(canvas_size=()))


# ------------------------------------------------------------------ order
def test_training_order_groups_steps_by_canvas_in_proportion():
  usable = np.arange(100, 130)
  canvas_of = np.array([0] * 20 + [1] * 10)
  order = canvases.TrainOrder(usable, canvas_of, 2, batch=5, seed=7)
  assert order.per_round.tolist() == [4, 2] and order.round_length == 6
  steps = [order.canvas_at(s) for s in range(60)]
  assert collections.Counter(steps) == {0: 40, 1: 20}
  assert steps[:6] != steps[6:12] or steps[6:12] != steps[12:18]  # shuffled per round
  again = canvases.TrainOrder(usable, canvas_of, 2, batch=5, seed=7)
  assert [again.canvas_at(s) for s in range(60)] == steps  # a function of (seed, step)
  for c in (0, 1):
    mine = [s for s in range(60) if steps[s] == c]
    assert [order.step_of(c, m) for m in range(len(mine))] == mine
    assert [order.steps_before(c, s) for s in mine] == list(range(len(mine)))
    # Each canvas's stream visits each of its records once per epoch of it.
    n = int(order.counts[c])
    items = [int(order.record(c, q)) for q in range(2 * n)]
    assert sorted(items[:n]) == sorted(items[n:]) == sorted(usable[canvas_of == c].tolist())
    assert items[:n] != items[n:]


def test_one_canvas_keeps_the_one_canvas_order():
  usable = np.arange(3, 20)
  order = canvases.TrainOrder(usable, np.zeros(17, np.int64), 1, batch=4, seed=3)
  perm = lambda e: np.random.default_rng([3, e]).permutation(17)
  assert [order.canvas_at(s) for s in range(9)] == [0] * 9
  assert [order.step_of(0, m) for m in range(9)] == list(range(9))
  assert [int(order.record(0, p)) for p in range(40)] == [
      usable[perm(p // 17)[p % 17]] for p in range(40)]


# ------------------------------------------------------------------ pipeline
def _pair_config(tf_dir, **overrides):
  return data_config(tf_dir, canvas_size=(), canvas_sizes=(LANDSCAPE, PORTRAIT), mask_size=8,
                     **overrides)


def _sizes_by_id(tf_dir, split):
  records = RecordFile(str(tf_dir / split))
  return dict(zip(records.image_id.tolist(), map(tuple, records.image_sizes.tolist())))


def test_training_batches_are_of_one_canvas_and_resume_exactly(shapes_dataset):
  _, tf_dir = shapes_dataset
  cfg = _pair_config(tf_dir, scale_range=(0.8, 1.2))
  sizes = _sizes_by_id(tf_dir, "train")
  assert len({canvases.choose(s, (LANDSCAPE, PORTRAIT)) for s in sizes.values()}) == 2
  batches = _batches(cfg, "train", 8, batch_size=2)
  shapes = [b["images"].shape[1:3] for b in batches]
  assert set(shapes) == {LANDSCAPE, PORTRAIT}
  for b, shape in zip(batches, shapes):
    for image_id, size in zip(b["image_info"]["image_id"], b["image_info"]["image_size"]):
      assert (LANDSCAPE, PORTRAIT)[canvases.choose(sizes[image_id],
                                                   (LANDSCAPE, PORTRAIT))] == shape
      assert size[0] <= shape[0] and size[1] <= shape[1]
  for start in (3, 5):
    resumed = _batches(cfg, "train", 3, batch_size=2, start_step=start)
    for got, want in zip(resumed, batches[start:]):
      _assert_bitwise_equal(got, want)
  halves = [_batches(cfg, "train", 8, batch_size=2, process_index=i, process_count=2)
            for i in (0, 1)]
  for step, batch in enumerate(batches):  # every process on the step's canvas, its half
    _assert_bitwise_equal(_concat([halves[0][step], halves[1][step]]), batch)


def test_evaluation_visits_every_image_once_in_batches_of_one_canvas(shapes_dataset):
  _, tf_dir = shapes_dataset
  cfg = _pair_config(tf_dir)
  sizes = _sizes_by_id(tf_dir, "val")
  per_canvas = collections.Counter(canvases.choose(s, (LANDSCAPE, PORTRAIT))
                                   for s in sizes.values())
  batches = _batches(cfg, "eval", batch_size=3)
  assert len(batches) == num_eval_steps(cfg, 3) == sum(-(-n // 3) for n in per_canvas.values())
  seen = []
  for b in batches:
    canvas = b["images"].shape[1:3]
    info = b["image_info"]
    for image_id in info["image_id"][info["valid"]]:
      assert (LANDSCAPE, PORTRAIT)[canvases.choose(sizes[image_id],
                                                   (LANDSCAPE, PORTRAIT))] == canvas
      seen.append(int(image_id))
  assert sorted(seen) == sorted(sizes)


def test_images_larger_than_every_canvas_are_resized_to_fit_never_cropped(shapes_dataset):
  """Shortest edge 200 asks for ~200 x 250 pixels; the 40 x 56 canvases get the whole
  image, shrunk: its full extent maps to the image's size inside the canvas."""
  _, tf_dir = shapes_dataset
  cfg = data_config(tf_dir, canvas_size=(), canvas_sizes=((40, 56), (56, 40)), mask_size=8,
                    min_size=200, max_size=0)
  for b in _batches(cfg, "eval", batch_size=4):
    canvas = b["images"].shape[1:3]
    info = b["image_info"]
    for original, inside, scale in zip(info["original_size"], info["image_size"], info["scale"]):
      assert tuple(inside) == canvases.resized_size(original, canvas)  # fitted, not ruled
      assert inside[0] == canvas[0] or inside[1] == canvas[1]
      np.testing.assert_allclose(inside / scale, original, rtol=1e-6)  # all of it
    # Nothing past each image is drawn: the padding is 0 (normalised space).
    for image, (h, w) in zip(b["images"], info["image_size"]):
      assert np.all(image[h:] == 0) and np.all(image[:, w:] == 0)


def test_several_canvases_must_be_multiples_of_the_models_padding():
  """An image's padded extent (size rounded up to size_divisibility) must fit every canvas,
  or a canvas would cut it and its results would depend on the canvas."""
  config = _config(canvas_size=(), canvas_sizes=((48, 64), (64, 48)))
  config.model = {"size_divisibility": 32}
  with pytest.raises(ValueError, match=r"multiple of model.size_divisibility \(32\)"):
    canvases.canvas_sizes(config)
  config.model.size_divisibility = 16
  assert canvases.canvas_sizes(config) == [(48, 64), (64, 48)]
