"""Input pipeline: static batches, exact eval pass, process shards, resume, flip, masks, crowd.

Two datasets: the session's synthetic shapes (16 train / 8 val, 96 px) and a
hand-made COCO split (``tiny``) whose every instance is known: an image with
no annotation, one with a keypointed "person", one with five squares of
distinct areas (more than ``max_instances``).
"""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_jax.data import coco, input_pipeline, transforms
from mrcnn_jax.data.input_pipeline import make_dataset, num_eval_steps
from mrcnn_jax.data.records import CorruptRecordError, RecordFile, parse
from tests.data.conftest import data_config

TINY_HW = (64, 80)  # every tiny image is 64 tall, 80 wide
# Squares on the "many" image, in file order: (x, y, side). Areas 36, 196, 16, 324, 100.
SQUARES = [(2, 2, 6), (10, 2, 14), (30, 2, 4), (40, 20, 18), (2, 30, 10)]
# The person (a lopsided triangle, so its mask is not mirror-symmetric): nose
# unlabelled, left_eye at the smaller x (synthetic's convention).
PERSON_BOX = [20, 10, 40, 30]  # x, y, w, h
PERSON_KEYPOINTS = [0, 0, 0, 30, 20, 2, 50, 20, 1]


def _coco(path):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(COCO JSON path, converted dir) of 3 noise images: empty, person, many squares."""
  root = tmp_path_factory.mktemp("tiny")
  (root / "images").mkdir()
  rng = np.random.default_rng(0)
  names = ["empty.png", "person.png", "many.png"]
  for name in names:  # PNG: lossless, so pixels can be followed through the pipeline
    Image.fromarray(rng.integers(0, 256, TINY_HW + (3,), dtype=np.uint8)).save(root / "images" / name)
  square = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]
  x, y, w, h = PERSON_BOX
  anns = [{"id": 10, "image_id": 2, "category_id": 3, "iscrowd": 0, "bbox": PERSON_BOX,
           "area": w * h / 2, "segmentation": [[x, y + h, x + w / 4, y, x + w, y + h]],
           "keypoints": PERSON_KEYPOINTS, "num_keypoints": 2}]
  for k, (sx, sy, s) in enumerate(SQUARES):
    anns.append({"id": 20 + k, "image_id": 3, "category_id": 1, "iscrowd": 0,
                 "bbox": [sx, sy, s, s], "area": s * s, "segmentation": square(sx, sy, s)})
  data = {"images": [{"id": i + 1, "file_name": n, "height": TINY_HW[0], "width": TINY_HW[1]}
                     for i, n in enumerate(names)],
          "annotations": anns,
          "categories": [{"id": 1, "name": "thing"},
                         {"id": 3, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"],
                          "skeleton": [[1, 2], [1, 3]]}]}
  path = root / "instances.json"
  path.write_text(json.dumps(data))
  coco.convert(str(root / "images"), str(path), str(root / "tf"), num_shards=2, workers=1)
  return path, root / "tf"


def tiny_config(tf_dir, **overrides):
  return data_config(tf_dir, train_dir=str(tf_dir), eval_dir=str(tf_dir), **overrides)


def _batches(config, split, num=None, **kwargs):
  """The first ``num`` batches (all of them for eval) as numpy dicts."""
  ds = make_dataset(config, split, **kwargs)
  if num is not None:
    ds = ds.take(num)
  return list(ds.as_numpy_iterator())


def _assert_bitwise_equal(a, b):
  """Same structure, and every leaf the same dtype, shape and bytes."""
  tf.nest.assert_same_structure(a, b)
  paths = [p for p, _ in _flatten_with_paths(a)]
  for path, x, y in zip(paths, tf.nest.flatten(a), tf.nest.flatten(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    if x.dtype == object:  # tf.string: bytes objects, compared by value
      assert x.tolist() == y.tolist(), path
    else:
      assert x.tobytes() == y.tobytes(), path


def _flatten_with_paths(tree, prefix=""):
  if isinstance(tree, dict):
    return [kv for k in sorted(tree) for kv in _flatten_with_paths(tree[k], f"{prefix}/{k}")]
  if isinstance(tree, (tuple, list)):
    return [kv for i, v in enumerate(tree) for kv in _flatten_with_paths(v, f"{prefix}/{i}")]
  return [(prefix, tree)]


def _concat(batches):
  return tf.nest.map_structure(lambda *xs: np.concatenate(xs), *batches)


# ------------------------------------------------------------------ shapes
def test_batches_are_static_and_keep_the_largest_instances(tiny):
  """0, 1 and 5 (> G = 3) instances give the same documented shapes and dtypes."""
  _, tf_dir = tiny
  g, m, canvas = 3, 8, (96, 96)
  cfg = tiny_config(tf_dir, max_instances=g, mask_size=m, canvas_size=canvas)
  ds = make_dataset(cfg, "eval", batch_size=3)
  expected = {
      "images": ((3, 96, 96, 3), tf.float32),
      "image_info": {"image_size": ((3, 2), tf.int32), "original_size": ((3, 2), tf.int32),
                     "scale": ((3, 2), tf.float32), "image_id": ((3,), tf.int32),
                     "valid": ((3,), tf.bool), "num_dropped": ((3,), tf.int32)},
      "gt_boxes": ((3, g, 4), tf.float32), "gt_classes": ((3, g), tf.int32),
      "gt_valid": ((3, g), tf.bool), "gt_is_crowd": ((3, g), tf.bool),
      "gt_masks": ((3, g, m, m), tf.float32), "gt_keypoints": ((3, g, 3, 3), tf.float32),
  }
  spec = tf.nest.map_structure(lambda s: (tuple(s.shape.as_list()), s.dtype), ds.element_spec)
  assert spec == expected  # static: no None anywhere
  (batch,) = list(ds.as_numpy_iterator())
  got = tf.nest.map_structure(lambda x: (x.shape, tf.as_dtype(x.dtype)), batch)
  assert got == expected

  info = batch["image_info"]
  assert info["image_id"].tolist() == [1, 2, 3] and info["valid"].all()
  assert batch["gt_valid"].sum(1).tolist() == [0, 1, 3]
  assert info["num_dropped"].tolist() == [0, 0, 2]
  np.testing.assert_array_equal(info["original_size"], [TINY_HW] * 3)
  # Fit scale min(96 / 64, 96 / 80) = 1.2: 64 x 80 -> round(76.8) x 96, so sy = 77 / 64.
  np.testing.assert_array_equal(info["image_size"], [[77, 96]] * 3)
  np.testing.assert_allclose(info["scale"], [[77 / 64, 1.2]] * 3, rtol=1e-6)
  # The three largest squares (sides 14, 18, 10), in file order.
  kept = [SQUARES[i] for i in (1, 3, 4)]
  np.testing.assert_allclose(batch["gt_boxes"][2] / [1.2, 77 / 64, 1.2, 77 / 64],
                             [[x, y, x + s, y + s] for x, y, s in kept], atol=1e-4)
  assert batch["gt_classes"][2].tolist() == [0, 0, 0]
  np.testing.assert_allclose(batch["gt_masks"][2], 1.0)  # squares fill their boxes
  assert batch["gt_classes"][1, 0] == 1  # COCO id 3 -> contiguous 1
  # Padding rows are all zero.
  for key in ("gt_boxes", "gt_masks", "gt_keypoints", "gt_classes"):
    assert not batch[key][0].any() and not batch[key][1, 1:].any(), key
  assert not batch["gt_is_crowd"].any()


@pytest.mark.parametrize("split", ["train", "eval"])
def test_padding_is_zero_after_normalisation(tiny, split):
  """Outside each image's size the batch is exactly 0 (the references pad the
  normalised image with 0), and inside it is the normalised image."""
  _, tf_dir = tiny
  config = tiny_config(tf_dir, canvas_size=(96, 128), scale_range=(0.5, 0.9))
  batch = _batches(config, split, 1)[0]
  images, sizes = batch["images"], batch["image_info"]["image_size"]
  assert any(h < 96 or w < 128 for h, w in sizes), "no padding to check"
  for image, (h, w) in zip(images, sizes):
    assert not image[h:].any() and not image[:, w:].any()
    assert image[:h, :w].std() > 0.1


@pytest.mark.parametrize("rounding,expected", [("round", [[800, 1067]]), ("floor", [[800, 1066]])])
def test_resize_rounding_follows_each_reference(rounding, expected):
  """A 480 x 640 photo at 800 / 1333: 1066.67 wide, rounded by detectron2 and floored by
  torchvision; the short side is exactly 800 in float64 (in float32 it floors to 799)."""
  scale = transforms.fit_scale(tf.constant([480, 640]), (1344, 1344), 800, 1333)
  size = transforms.resized_size(tf.constant([480, 640]), scale, rounding)
  assert size.numpy().astype(int).tolist() == expected[0]
  half = transforms.resized_size(tf.constant([3, 5]), 0.5, rounding).numpy().tolist()
  assert half == ([2.0, 3.0] if rounding == "round" else [1.0, 2.0])  # 1.5 and 2.5 round up
  with pytest.raises(ValueError, match="rounding"):
    transforms.resized_size(tf.constant([3, 5]), 0.5, "nearest")


def test_filter_empty_only_affects_training(tiny):
  _, tf_dir = tiny
  seen = lambda cfg: {int(i) for b in _batches(cfg, "train", 6, batch_size=2)
                      for i in b["image_info"]["image_id"]}
  assert seen(tiny_config(tf_dir, filter_empty=True)) == {2, 3}
  assert seen(tiny_config(tf_dir, filter_empty=False)) == {1, 2, 3}
  (batch,) = _batches(tiny_config(tf_dir, filter_empty=True), "eval", batch_size=3)
  assert batch["image_info"]["image_id"].tolist() == [1, 2, 3]


# ------------------------------------------------------------------ eval
@pytest.mark.parametrize("batch_size", [3, 5])
def test_eval_visits_every_image_exactly_once(shapes_dataset, batch_size):
  raw, tf_dir = shapes_dataset
  cfg = data_config(tf_dir, canvas_size=(96, 96), mask_size=8)
  batches = _batches(cfg, "eval", batch_size=batch_size)
  assert len(batches) == num_eval_steps(cfg, batch_size) == -(-8 // batch_size)
  info = _concat(batches)["image_info"]
  ids = info["image_id"][info["valid"]]
  assert sorted(ids.tolist()) == sorted(_coco(raw / "annotations" / "instances_val.json").getImgIds())
  assert len(set(ids.tolist())) == len(ids) == 8
  assert info["valid"].tolist() == [True] * 8 + [False] * (len(batches) * batch_size - 8)


# ------------------------------------------------------------------ processes
@pytest.mark.parametrize("split", ["train", "eval"])
def test_two_processes_split_the_global_batch(shapes_dataset, split):
  """Each process's local batch is its half of the single-process global batch."""
  _, tf_dir = shapes_dataset
  cfg = data_config(tf_dir, canvas_size=(96, 96), mask_size=8)
  steps = 3 if split == "train" else None
  whole = _batches(cfg, split, steps, batch_size=6)
  halves = [_batches(cfg, split, steps, batch_size=6, process_index=i, process_count=2)
            for i in (0, 1)]
  assert len(halves[0]) == len(halves[1]) == len(whole)
  for step, batch in enumerate(whole):
    _assert_bitwise_equal(_concat([halves[0][step], halves[1][step]]), batch)
  # Disjoint: within one epoch (train: step 0; eval: the whole pass) no image repeats.
  first = [halves[i][0]["image_info"] for i in (0, 1)] if split == "train" else [
      _concat(halves[i])["image_info"] for i in (0, 1)]
  ids = [set(info["image_id"][info["valid"]].tolist()) for info in first]
  assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_batch_size_must_divide_among_processes(shapes_dataset):
  _, tf_dir = shapes_dataset
  with pytest.raises(ValueError, match="not divisible by 2"):
    make_dataset(data_config(tf_dir), "train", batch_size=3, process_count=2)


# ------------------------------------------------------------------ resume
def test_resume_reproduces_batches_across_an_epoch_boundary(shapes_dataset):
  _, tf_dir = shapes_dataset
  cfg = data_config(tf_dir, canvas_size=(96, 96), mask_size=8, scale_range=(0.5, 1.5))
  usable = int((RecordFile(str(tf_dir / "train")).num_instances > 0).sum())
  batch_size = next(b for b in (3, 5, 7) if usable % b)
  k = usable // batch_size  # step k holds the last images of epoch 0 and the first of epoch 1
  assert k * batch_size < usable < (k + 1) * batch_size
  uninterrupted = _batches(cfg, "train", k + 2, batch_size=batch_size)
  for start in (1, k):
    resumed = _batches(cfg, "train", 2, batch_size=batch_size, start_step=start)
    _assert_bitwise_equal(resumed[0], uninterrupted[start])
    _assert_bitwise_equal(resumed[1], uninterrupted[start + 1])
  # Epoch 1 is a different permutation (so the test above crossed a real boundary).
  ids = _concat(uninterrupted)["image_info"]["image_id"]
  assert sorted(ids[:usable].tolist()) == sorted(set(ids[:usable].tolist()))
  assert ids[usable:].tolist() != ids[:len(ids) - usable].tolist()


def test_training_order_is_the_documented_function_of_seed_and_step(shapes_dataset):
  """Process i's examples at step s are records usable[perm_e[p mod n]] for its positions p."""
  _, tf_dir = shapes_dataset
  cfg = data_config(tf_dir, canvas_size=(64, 64), mask_size=8)
  records = RecordFile(str(tf_dir / "train"))
  usable = np.flatnonzero(records.num_instances > 0)
  n, global_batch, start, steps = len(usable), 6, 1, 4  # steps 1..4 cross into epoch 1
  assert (start + steps) * global_batch > n
  for process in range(2):
    got = _concat(_batches(cfg, "train", steps, batch_size=global_batch, start_step=start,
                           process_index=process, process_count=2))["image_info"]["image_id"]
    positions = [s * global_batch + process * 3 + k
                 for s in range(start, start + steps) for k in range(3)]
    perm = lambda e: np.random.default_rng([cfg.seed, e]).permutation(n)
    want = [records.image_id[usable[perm(p // n)[p % n]]] for p in positions]
    assert got.tolist() == want


@pytest.mark.parametrize("split", ["train", "eval"])
def test_fixed_parallel_calls_give_the_same_batches_with_autotuning_off(shapes_dataset, split):
  _, tf_dir = shapes_dataset
  autotuned = data_config(tf_dir, canvas_size=(64, 64), mask_size=8)  # parallel_calls 0
  assert make_dataset(autotuned, split).options().autotune.enabled is not False
  want = _batches(autotuned, split, 3)
  for n in (1, 3):
    fixed = data_config(tf_dir, canvas_size=(64, 64), mask_size=8, parallel_calls=n)
    assert make_dataset(fixed, split).options().autotune.enabled is False
    got = _batches(fixed, split, 3)
    assert len(got) == len(want)
    for a, b in zip(got, want):
      _assert_bitwise_equal(a, b)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_parallel_calls_must_be_a_count(shapes_dataset, bad):
  _, tf_dir = shapes_dataset
  with pytest.raises(ValueError, match=r"config\.data\.parallel_calls.*" + re.escape(repr(bad))):
    make_dataset(data_config(tf_dir, parallel_calls=bad), "train")


# ------------------------------------------------------------------ transforms
def _in_tf_data(fn, *args):
  """``fn(*args)`` traced inside a tf.data map, as numpy."""
  return next(tf.data.Dataset.from_tensors(args).map(fn).as_numpy_iterator())


def _numpy(tree):
  return tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else np.asarray(x), tree)


def test_every_transform_is_the_same_eagerly_and_in_tf_data(shapes_dataset):
  _, tf_dir = shapes_dataset
  records = RecordFile(str(tf_dir / "train"))
  i = int(np.argmax(records.num_instances))  # the busiest image
  canvas, g, m, flip_map = (96, 112), 12, 14, records.meta["keypoint_flip_map"]
  k = records.num_keypoints
  geometry = lambda size, seed: transforms.random_geometry(size, canvas, seed, True, (0.5, 2.0))
  steps = [
      ("parse", lambda s: parse(s, k)),
      ("keep_largest", lambda ex: transforms.keep_largest(ex, 4)),
      ("decode_image", transforms.decode_image),
  ]
  ex = tf.constant(records.read(i))
  for name, fn in steps:
    eager = fn(ex)
    _assert_bitwise_equal(_in_tf_data(fn, ex), _numpy(eager))
    ex = eager
  assert int(ex["num_dropped"]) > 0  # keep_largest really dropped some
  seed = tf.constant([0, 7], tf.int64)
  scale, offset, flip = geometry(ex["original_size"], seed)
  _assert_bitwise_equal(_in_tf_data(geometry, ex["original_size"], seed),
                        _numpy((scale, offset, flip)))
  for do_flip in (flip, tf.logical_not(flip)):
    apply = lambda e, s, o, f: transforms.apply_geometry(e, canvas, s, o, f, m, flip_map)
    out = apply(ex, scale, offset, do_flip)
    _assert_bitwise_equal(_in_tf_data(apply, ex, scale, offset, do_flip), _numpy(out))
  pad = lambda e: transforms.pad_instances(e, g)
  _assert_bitwise_equal(_in_tf_data(pad, out), _numpy(pad(out)))
  norm = lambda image: transforms.normalize(image, (120.0, 110.0, 100.0), (60.0, 55.0, 50.0), "bgr")
  _assert_bitwise_equal(_in_tf_data(norm, out["image"]), _numpy(norm(out["image"])))
  np.testing.assert_allclose(norm(out["image"])[..., 0], (out["image"][..., 2] - 120.0) / 60.0,
                             rtol=1e-6)


def test_normalize_is_the_same_for_static_and_unknown_shapes():
  """Full-canvas constants (static shape) give the bits of broadcasting (unknown shape).

  Both run where the pipeline runs them, in tf.data (a tf.function would let
  Grappler turn the division into a reciprocal multiply, 1 ulp off).
  """
  image = np.random.default_rng(0).uniform(0, 255, (16, 24, 3)).astype(np.float32)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  norm = lambda x: transforms.normalize(x, mean, std, "bgr")
  unknown = tf.data.Dataset.from_generator(lambda: [image], output_signature=tf.TensorSpec(
      [None, None, 3], tf.float32)).map(lambda x: (norm(x), x.shape.is_fully_defined()))
  (broadcast, was_static), = unknown.as_numpy_iterator()
  static = _in_tf_data(norm, tf.constant(image))
  assert not was_static
  reference = (image[..., ::-1] - np.float32(mean)) / np.float32(std)
  _assert_bitwise_equal(static, reference)
  _assert_bitwise_equal(broadcast, reference)


def test_bgr_batches_are_rgb_batches_with_channels_reversed(tiny):
  """channel_order="bgr" (reversed at decode) = the rgb batch reversed, mean/std in BGR order."""
  _, tf_dir = tiny
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  batch = lambda order, m, s: _batches(tiny_config(tf_dir, channel_order=order, mean=m, std=s,
                                                   scale_range=(0.5, 1.5)), "train", 1)[0]
  rgb, bgr = batch("rgb", mean, std), batch("bgr", mean[::-1], std[::-1])
  np.testing.assert_array_equal(bgr.pop("images"), rgb.pop("images")[..., ::-1])
  _assert_bitwise_equal(bgr, rgb)


# ------------------------------------------------------------------ flip
def _person(tf_dir):
  records = RecordFile(str(tf_dir))
  ex = transforms.decode_image(parse(tf.constant(records.read(1)), 3))
  assert int(ex["image_id"]) == 2
  return ex, records.meta["keypoint_flip_map"]


@pytest.mark.parametrize("canvas,scale,visible_w", [((64, 80), 1.0, 80), ((96, 128), 1.5, 120)])
def test_horizontal_flip_mirrors_and_swaps_left_right(tiny, canvas, scale, visible_w):
  """x' = W - s * (x + 0.5) with W the image's width inside the canvas; left <-> right."""
  _, tf_dir = tiny
  ex, flip_map = _person(tf_dir)
  assert flip_map == [0, 2, 1]
  fit = transforms.fit_scale(ex["original_size"], canvas)
  geo = lambda flip: _numpy(transforms.apply_geometry(ex, canvas, fit, tf.zeros([2]),
                                                      tf.constant(flip), 16, flip_map))
  plain, flipped = geo(False), geo(True)
  assert float(fit) == scale and flipped["image_size"].tolist() == [64 * scale, visible_w]
  # Keypoints (COCO integer pixel indices, centres at +0.5): nose unlabelled stays zero;
  # the right eye (50, 20), v=1, becomes the left eye, mirrored.
  s = scale
  np.testing.assert_allclose(flipped["keypoints"][0], [[0, 0, 0],
                                                       [visible_w - s * 50.5, s * 20.5, 1],
                                                       [visible_w - s * 30.5, s * 20.5, 2]],
                             rtol=1e-6)
  np.testing.assert_allclose(plain["keypoints"][0], [[0, 0, 0], [s * 30.5, s * 20.5, 2],
                                                     [s * 50.5, s * 20.5, 1]], rtol=1e-6)
  x, y, w, h = PERSON_BOX
  np.testing.assert_allclose(flipped["boxes"][0],
                             [visible_w - s * (x + w), s * y, visible_w - s * x, s * (y + h)],
                             rtol=1e-6)
  np.testing.assert_array_equal(flipped["masks"], plain["masks"][:, :, ::-1])
  np.testing.assert_array_equal(flipped["image"][:, :visible_w], plain["image"][:, visible_w - 1::-1])
  assert not flipped["image"][:, visible_w:].any()
  if scale == 1.0:  # the pixel under each flipped keypoint is the one under the original point
    original = ex["image"].numpy()
    for kx, ky, v in flipped["keypoints"][0][1:]:
      src = PERSON_KEYPOINTS[6:8] if kx < 40 else PERSON_KEYPOINTS[3:5]
      np.testing.assert_array_equal(flipped["image"][int(ky), int(kx)], original[src[1], src[0]])


def test_training_flips_some_images_and_leaves_others(tiny):
  """Without jitter a training example is its eval version or that version mirrored."""
  _, tf_dir = tiny
  cfg = tiny_config(tf_dir, canvas_size=(96, 96), mask_size=8, max_instances=3)
  (ev,) = _batches(cfg, "eval", batch_size=3)
  by_id = {int(i): j for j, i in enumerate(ev["image_info"]["image_id"])}
  flips = []
  for batch in _batches(cfg, "train", 8, batch_size=2):
    for b, image_id in enumerate(batch["image_info"]["image_id"]):
      e, w = by_id[int(image_id)], int(ev["image_info"]["image_size"][by_id[int(image_id)], 1])
      same = np.array_equal(batch["images"][b], ev["images"][e])
      mirrored = np.array_equal(batch["images"][b, :, :w], ev["images"][e, :, w - 1::-1])
      assert same != mirrored
      flips.append(mirrored)
      boxes, ev_boxes = batch["gt_boxes"][b], ev["gt_boxes"][e]
      if mirrored:
        ev_boxes = np.stack([w - ev_boxes[:, 2], ev_boxes[:, 1], w - ev_boxes[:, 0],
                             ev_boxes[:, 3]], 1) * ev["gt_valid"][e][:, None]
        np.testing.assert_array_equal(batch["gt_masks"][b], ev["gt_masks"][e][:, :, ::-1])
      np.testing.assert_allclose(boxes, ev_boxes, atol=1e-4)
  assert any(flips) and not all(flips)


# ------------------------------------------------------------------ masks
def _cell_centre_reference(mask, box, m):
  """Bilinear samples of a full ``[h, w]`` 0/1 mask at the ``m x m`` cell centres of ``box``.

  ``box`` is x1, y1, x2, y2 in original pixels (pixel i covers [i, i + 1));
  the mask is 0 outside the image. Plain NumPy, no TF.
  """
  x1, y1, x2, y2 = box
  ys = y1 + (np.arange(m) + 0.5) * (y2 - y1) / m - 0.5  # as pixel indices
  xs = x1 + (np.arange(m) + 0.5) * (x2 - x1) / m - 0.5
  padded = np.pad(mask.astype(np.float64), 1)  # index i + 1 is pixel i
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  at = lambda dy, dx: padded[np.ix_(y0 + 1 + dy, x0 + 1 + dx)]
  return (at(0, 0) * (1 - fy) * (1 - fx) + at(0, 1) * (1 - fy) * fx
          + at(1, 0) * fy * (1 - fx) + at(1, 1) * fy * fx)


def test_masks_match_pycocotools_ann_to_mask(shapes_dataset):
  """gt_masks are annToMask sampled at the box's cell centres, and paste back onto it.

  The reference samples the full-image mask bilinearly in float64; the
  pipeline reads the stored box-window crop with float32 coordinates, so the
  two agree to float32 rounding (1e-4). Pasting the 28 x 28 target back onto
  the image's pixels (each pixel takes its cell's value, >= 0.5) can move the
  boundary by up to a pixel, hence IoU > 0.9, and only for objects at least
  16 px on each side (not crowds: a cluster of small blobs is mostly boundary).
  """
  raw, tf_dir = shapes_dataset
  m = 28
  gt = _coco(raw / "annotations" / "instances_val.json")
  cfg = data_config(tf_dir, canvas_size=(96, 96), mask_size=m)
  batch = _concat(_batches(cfg, "eval", batch_size=4))
  info = batch["image_info"]
  assert (info["scale"] == 1.0).all(1).any()  # some image fills the canvas at scale 1
  checked = pasted = 0
  for b in np.flatnonzero(info["valid"]):
    sy, sx = info["scale"][b]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=int(info["image_id"][b]), iscrowd=None))
    assert batch["gt_valid"][b].sum() == len(anns)  # G = 12 keeps them all, file order
    for g, ann in enumerate(anns):
      x, y, w, h = ann["bbox"]
      box = np.array([x, y, x + w, y + h])
      np.testing.assert_allclose(batch["gt_boxes"][b, g], box * [sx, sy, sx, sy], rtol=1e-5)
      full = gt.annToMask(ann)
      ref = _cell_centre_reference(full, batch["gt_boxes"][b, g] / [sx, sy, sx, sy], m)
      np.testing.assert_allclose(batch["gt_masks"][b, g], ref, atol=1e-4)
      checked += 1
      if min(w, h) >= 16 and not ann["iscrowd"]:
        x1, y1, x2, y2 = int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))
        rows = np.clip(((np.arange(y1, y2) + 0.5 - y) / h * m).astype(int), 0, m - 1)
        cols = np.clip(((np.arange(x1, x2) + 0.5 - x) / w * m).astype(int), 0, m - 1)
        paste = np.zeros_like(full)
        paste[y1:y2, x1:x2] = batch["gt_masks"][b, g][np.ix_(rows, cols)] >= 0.5
        iou = (paste & full).sum() / (paste | full).sum()
        assert iou > 0.9, (ann["id"], iou)
        pasted += 1
  assert checked == len(gt.getAnnIds()) and pasted >= 3


# ------------------------------------------------------------------ crowd
@pytest.mark.parametrize("split", ["train", "val"])
def test_crowd_regions_are_kept_as_crowd_entries(shapes_dataset, split):
  """Every iscrowd annotation arrives with gt_is_crowd and gt_valid; objects are the rest."""
  raw, tf_dir = shapes_dataset
  gt = _coco(raw / "annotations" / f"instances_{split}.json")
  cfg = data_config(tf_dir, eval_dir=str(tf_dir / split), canvas_size=(96, 96), mask_size=8)
  batch = _concat(_batches(cfg, "eval", batch_size=4))
  info = batch["image_info"]
  crowd_images = 0
  for b in np.flatnonzero(info["valid"]):
    image_id = int(info["image_id"][b])
    crowd = gt.getAnnIds(imgIds=image_id, iscrowd=True)
    objects = gt.getAnnIds(imgIds=image_id, iscrowd=False)
    valid, is_crowd = batch["gt_valid"][b], batch["gt_is_crowd"][b]
    assert (valid & is_crowd).sum() == len(crowd), image_id
    assert (valid & ~is_crowd).sum() == len(objects), image_id
    assert not (is_crowd & ~valid).any()
    crowd_images += bool(crowd)
    if crowd:  # the crowd's mask (a cluster of ellipses) came through too
      assert batch["gt_masks"][b][is_crowd].max() > 0.5
  assert crowd_images == len({a["image_id"] for a in gt.loadAnns(gt.getAnnIds(iscrowd=True))})
  if split == "val":
    assert crowd_images > 0  # seed 3 puts a crowd on a val image


def _flip_byte(split_dir, record):
  """Flips one byte in the middle of ``record``'s data (its CRC then fails)."""
  records = RecordFile(str(split_dir))
  path = split_dir / records.shard_names[int(records.shard[record])]
  where = int(records.offset[record]) + 12 + int(records.length[record]) // 2
  data = bytearray(path.read_bytes())
  data[where] ^= 0xFF
  path.write_bytes(bytes(data))
  return int(records.image_id[record])


def test_corrupt_records_are_named_and_skipped_or_failed(shapes_dataset, tmp_path):
  """A failed CRC in the last eval record (nothing after it in the stream) and in a
  training record: named by ``RecordFaults``; the eval pass keeps its batch count,
  the dropped image's slot filled with an invalid copy; ``read`` raises on it."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(shapes_dataset[1], tmp_path / "tf")
  n = len(RecordFile(str(tmp_path / "tf" / "val")))
  bad_eval = _flip_byte(tmp_path / "tf" / "val", n - 1)
  bad_train = _flip_byte(tmp_path / "tf" / "train", 2)
  with pytest.raises(CorruptRecordError, match="data CRC mismatch"):
    RecordFile(str(tmp_path / "tf" / "val")).read(n - 1)

  config = data_config(tmp_path / "tf", on_corrupt="skip")
  faults = input_pipeline.RecordFaults()
  batches = list(make_dataset(config, "eval", faults=faults).as_numpy_iterator())
  assert len(batches) == num_eval_steps(config)
  valid = np.concatenate([b["image_info"]["valid"] for b in batches])
  ids = np.concatenate([b["image_info"]["image_id"] for b in batches])[valid]
  assert valid.sum() == n - 1 and bad_eval not in ids
  (line,) = faults.new()
  assert f"image id {bad_eval}," in line and "data CRC mismatch" in line, line
  assert re.search(rf"record \d+ \(record {n - 1} of the split", line), line

  faults = input_pipeline.RecordFaults()
  data = make_dataset(config, "train", faults=faults).as_numpy_iterator()
  for _ in range(-(-16 // config.batch_size)):  # one epoch: every record once
    assert next(data)["images"].shape == (config.batch_size, 128, 128, 3)
  assert any(f"image id {bad_train}," in line for line in faults.new())

  # Without a RecordFaults to report to, "fail" fails the iteration, naming the record.
  config = data_config(tmp_path / "tf")
  with pytest.raises(tf.errors.OpError, match=f"image id {bad_eval},"):
    list(make_dataset(config, "eval").as_numpy_iterator())
