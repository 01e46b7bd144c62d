"""COCO results, mask pasting, COCOeval and drawing (mrcnn_jax.evaluation)."""

import json
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_jax.data import coco as coco_data
from mrcnn_jax.data import synthetic
from mrcnn_jax.evaluation import coco as ev
from mrcnn_jax.evaluation import draw as draw_lib

S = 28  # mask head resolution


# ------------------------------------------------------------------ paste_masks
def test_paste_constant_mask_fills_integer_box_exactly():
  ones = np.ones((3, S, S), np.float32)
  boxes = np.array([[2, 3, 7, 9],      # small: many mask cells per pixel
                    [1, 0, 11, 12],    # touches the border
                    [-4, -5, 5, 4]],   # partly outside: clipped to the image
                   np.float32)
  out = ev.paste_masks(ones, boxes, 12, 14)
  assert out.shape == (3, 12, 14) and out.dtype == bool
  for m, (x1, y1, x2, y2) in zip(out, boxes.astype(int)):
    expect = np.zeros((12, 14), bool)
    expect[max(y1, 0):y2, max(x1, 0):x2] = True
    np.testing.assert_array_equal(m, expect)
  # Coarse masks (cells of 4 px; exact when cells are <= 1 px): the edge
  # pixels' centres sit 1/8 cell inside the box, at 0.625 of the ramp down to
  # the zero padding; the corners read 0.625^2 = 0.39 and drop out.
  out = ev.paste_masks(np.ones((1, 2, 2), np.float32), np.array([[2, 2, 10, 10]], np.float32),
                       12, 12)
  expect = np.zeros((12, 12), bool)
  expect[2:10, 2:10] = True
  expect[[2, 2, 9, 9], [2, 9, 2, 9]] = False
  np.testing.assert_array_equal(out[0], expect)


def test_paste_half_mask_splits_at_the_middle():
  half = np.zeros((1, S, S), np.float32)
  half[0, :, :S // 2] = 1.0  # left half on
  # Box 56 x 28 px: each cell is 2 x 1 px. Cell 13 (on) covers x in [30, 32),
  # cell 14 (off) [32, 34): pixel 31 (centre 31.5) reads 0.75, pixel 32 0.25.
  out = ev.paste_masks(half, np.array([[4, 2, 60, 30]], np.float32), 32, 64)[0]
  expect = np.zeros((32, 64), bool)
  expect[2:30, 4:32] = True
  np.testing.assert_array_equal(out, expect)
  # Top half on, transposed geometry.
  out = ev.paste_masks(np.swapaxes(half, 1, 2), np.array([[0, 0, 10, 28]], np.float32),
                       40, 12)[0]
  assert out[:14, :10].all() and not out[14:].any() and not out[:, 10:].any()


def test_paste_degenerate_and_outside_boxes_are_empty():
  ones = np.ones((5, S, S), np.float32)
  boxes = np.array([[5, 5, 5, 9],          # zero width
                    [5, 9, 8, 3],          # negative height
                    [np.nan, 0, 4, 4],     # not finite
                    [20, 20, 30, 30],      # beyond the image
                    [-9, 2, -1, 6]],       # left of the image
                   np.float32)
  assert not ev.paste_masks(ones, boxes, 16, 16).any()
  tiny = np.array([[3, 3, 3 + 1e-5, 8], [0, 0, 1e-38, 4]], np.float32)  # between pixel centres
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not ev.paste_masks(ones[:2], tiny, 16, 16).any()
  assert ev.paste_masks(np.zeros((0, S, S)), np.zeros((0, 4)), 7, 9).shape == (0, 7, 9)
  with pytest.raises(ValueError):
    ev.paste_masks(ones, boxes, 16, 16, threshold=0.0)


def _torch_paste_values(torch, masks, boxes, height, width):
  """detectron2's _do_paste_mask (whole image, no skip_empty) before thresholding."""
  import torch.nn.functional as F
  m = torch.from_numpy(masks)[:, None].float()
  x0, y0, x1, y1 = torch.split(torch.from_numpy(boxes).float(), 1, dim=1)  # (D, 1) each
  ys = (torch.arange(height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1  # (D, H)
  xs = (torch.arange(width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1  # (D, W)
  d = len(masks)
  grid = torch.stack([xs[:, None, :].expand(d, height, width),
                      ys[:, :, None].expand(d, height, width)], dim=3)
  return F.grid_sample(m, grid, align_corners=False)[:, 0].numpy()


@pytest.mark.parity
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_paste_matches_detectron2_grid_sample(torch, threshold):
  rng = np.random.default_rng(1)
  height, width, d = 50, 70, 120
  xy = rng.uniform(-25, 75, (d, 2))
  wh = np.exp(rng.uniform(np.log(0.3), np.log(80), (d, 2)))  # sub-pixel to larger than the image
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  masks = rng.uniform(0, 1, (d, S, S)).astype(np.float32)
  masks[: d // 4] = 1.0  # saturated masks put exact 0.5s on box edges
  masks[d // 4: d // 2] = (masks[d // 4: d // 2] > 0.5)
  values = _torch_paste_values(torch, masks, boxes, height, width)
  ours = ev.paste_masks(masks, boxes, height, width, threshold)
  differ = ours != (values >= threshold)
  assert np.all(np.abs(values[differ] - threshold) < 1e-5), np.abs(values[differ] - threshold)
  assert ours.sum() > 1000  # the comparison is not vacuous


# ------------------------------------------------------------------ image_results
def _dets(boxes, classes, scores, valid, **extra):
  out = {"boxes": np.asarray(boxes, np.float32), "classes": np.asarray(classes, np.int32),
         "scores": np.asarray(scores, np.float32), "valid": np.asarray(valid, bool)}
  out.update({k: np.asarray(v, np.float32) for k, v in extra.items()})
  return out


def test_image_results_boxes_classes_threshold():
  dets = _dets([[20, 10, 60, 50], [0, 0, 400, 300], [4, 4, 8, 8], [1, 1, 2, 2]],
               classes=[1, 0, 2, 1], scores=[0.9, 0.6, 0.2, 0.99], valid=[1, 1, 1, 0])
  # scale (sy, sx) = (2, 4): original = canvas / scale; the image is 100 x 60.
  res = ev.image_results(dets, (2.0, 4.0), (100, 60), 42, coco_ids=[3, 8, 20],
                         score_threshold=0.5)
  assert len(res) == 2  # the score-0.2 row is below the threshold, the last is invalid
  assert res[0] == {"image_id": 42, "category_id": 8, "bbox": pytest.approx([5, 5, 10, 20]),
                    "score": pytest.approx(0.9)}
  assert res[1]["category_id"] == 3
  assert res[1]["bbox"] == pytest.approx([0, 0, 60, 100])  # clipped to 60 x 100
  assert json.loads(json.dumps(res)) == res
  assert len(ev.image_results(dets, (2.0, 4.0), (100, 60), 42, [3, 8, 20])) == 3
  assert ev.image_results(dict(dets, valid=np.zeros(4, bool)), (2, 4), (100, 60), 1,
                          [3, 8, 20]) == []


def test_image_results_masks_and_keypoints():
  kp = np.zeros((2, 3, 3), np.float32)
  kp[0] = [[10.5, 20.5, 0.9], [31, 41, 0.1], [0, 0, 0]]
  dets = _dets([[10, 20, 30, 40], [0, 0, 10, 10]], classes=[1, 0], scores=[0.8, 0.7],
               valid=[1, 1], masks=np.ones((2, S, S)), keypoints=kp)
  res = ev.image_results(dets, (1.0, 1.0), (50, 60), 7, coco_ids=[2, 7],
                         keypoint_category_ids=[7])
  assert json.loads(json.dumps(res)) == res
  # Continuous canvas coordinates -> COCO's integer pixel indices: -0.5.
  assert res[0]["keypoints"] == pytest.approx([10, 20, 0.9, 30.5, 40.5, 0.1, -0.5, -0.5, 0])
  assert "keypoints" not in res[1]  # category 2 has no keypoints
  for r, (x1, y1, x2, y2) in zip(res, [(10, 20, 30, 40), (0, 0, 10, 10)]):
    assert r["segmentation"]["size"] == [50, 60] and isinstance(r["segmentation"]["counts"], str)
    expect = np.zeros((50, 60), np.uint8)
    expect[y1:y2, x1:x2] = 1
    np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), expect)
  # Scaled: keypoints divide by (sx, sy) before the -0.5.
  res = ev.image_results(dets, (2.0, 4.0), (50, 60), 7, [2, 7], [7])
  assert res[0]["keypoints"][:2] == pytest.approx([10.5 / 4 - 0.5, 20.5 / 2 - 0.5])


# ------------------------------------------------------------------ ground truth as detections
@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
  """(COCO of a 12-image synthetic val split, its category meta)."""
  root = tmp_path_factory.mktemp("shapes_eval")
  synthetic.main(["--output", str(root), "--train", "1", "--val", "12", "--size", "96",
                  "--seed", "1", "--workers", "1"])
  path = str(root / "annotations" / "instances_val.json")
  gt = COCO(path)
  return gt, coco_data.category_meta(gt.dataset["categories"])


def _roi_align_mask(full: np.ndarray, box, size: int = S, ratio: int = 2) -> np.ndarray:
  """``[size, size]``: a full-image mask read over ``box`` (x1, y1, x2, y2) like
  RoIAlign (aligned, ``ratio`` x ``ratio`` bilinear samples averaged per cell),
  i.e. the target a perfect mask head would predict."""
  x1, y1, x2, y2 = box
  h, w = full.shape
  offsets = (np.arange(size * ratio) + 0.5) / (size * ratio)
  xs, ys = x1 + offsets * (x2 - x1) - 0.5, y1 + offsets * (y2 - y1) - 0.5  # pixel-index coords

  def weights(coords, n):  # (len(coords), n) bilinear weights, edge-clamped
    c = np.clip(coords, 0, n - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    t = c - lo
    out = np.zeros((len(c), n))
    out[np.arange(len(c)), lo] += 1 - t
    out[np.arange(len(c)), hi] += t
    return out

  samples = weights(ys, h) @ full.astype(np.float64) @ weights(xs, w).T
  return samples.reshape(size, ratio, size, ratio).mean((1, 3)).astype(np.float32)


def _gt_as_detections(gt: COCO, meta: dict, image_ids, canvas: int, num_dets: int, rng):
  """Per image: (detections [D, ...], image_info) of its non-crowd ground truth."""
  class_of = {c: i for i, c in enumerate(meta["coco_ids"])}
  kp = len(meta["keypoint_names"])
  out = []
  for image_id in image_ids:
    info = gt.imgs[image_id]
    h, w = info["height"], info["width"]
    # As the input pipeline: aspect-kept fit to the canvas, rounded size.
    s = canvas / max(h, w)
    sy, sx = round(h * s) / h, round(w * s) / w
    anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
    d = {"boxes": rng.uniform(0, canvas / 2, (num_dets, 4)).astype(np.float32),
         "scores": rng.uniform(0, 1, num_dets).astype(np.float32),
         "classes": rng.integers(0, len(class_of), num_dets).astype(np.int32),
         "valid": np.zeros(num_dets, bool),
         "masks": rng.uniform(0, 1, (num_dets, S, S)).astype(np.float32),
         "keypoints": rng.uniform(0, canvas, (num_dets, kp, 3)).astype(np.float32)}
    d["boxes"][:, 2:] += d["boxes"][:, :2]  # garbage rows, all invalid
    for i, a in enumerate(anns):
      x, y, bw, bh = a["bbox"]
      box = np.array([x, y, x + bw, y + bh])
      d["boxes"][i] = box * [sx, sy, sx, sy]
      d["classes"][i] = class_of[a["category_id"]]
      d["scores"][i] = 0.5 + 0.5 * rng.uniform()
      d["valid"][i] = True
      d["masks"][i] = _roi_align_mask(gt.annToMask(a), box)
      if a.get("keypoints"):
        k = np.asarray(a["keypoints"], np.float32).reshape(kp, 3)
        # +0.5 (the pipeline's continuous coordinates), then into the canvas.
        d["keypoints"][i] = np.stack([(k[:, 0] + 0.5) * sx, (k[:, 1] + 0.5) * sy,
                                      (k[:, 2] > 0).astype(np.float32)], 1)
    image_info = {"image_size": np.array([round(h * sy), round(w * sx)]),
                  "original_size": np.array([h, w]), "scale": np.array([sy, sx], np.float32),
                  "image_id": np.array(image_id), "valid": np.array(True)}
    out.append((d, image_info))
  return out


def _batches(examples, batch_size):
  """Stacks examples into batches; the last is padded with junk marked invalid."""
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    pads = batch_size - len(chunk)
    for d, info in examples[:pads]:  # real ids and valid detections: must be ignored
      chunk.append((dict(d, boxes=d["boxes"][::-1].copy(), valid=np.ones_like(d["valid"])),
                    dict(info, valid=np.array(False))))
    dets = {k: np.stack([d[k] for d, _ in chunk]) for k in chunk[0][0]}
    info = {k: np.stack([i[k] for _, i in chunk]) for k in chunk[0][1]}
    yield dets, info


def test_ground_truth_scores_ap_one(shapes_val, capsys):
  gt, meta = shapes_val
  assert meta["coco_ids"] == [2, 5, 7, 9, 11] and meta["keypoint_category_ids"] == [7]
  assert any(a["iscrowd"] for a in gt.anns.values())  # crowd regions present, never detected
  rng = np.random.default_rng(0)
  examples = _gt_as_detections(gt, meta, sorted(gt.getImgIds()), canvas=160, num_dets=12,
                               rng=rng)
  evaluator = ev.COCOEvaluator(gt, meta["coco_ids"], meta["keypoint_category_ids"])
  for dets, info in _batches(examples, 5):  # 12 images: 5 + 5 + (2 + 3 padding)
    evaluator.add(dets, info)
  assert evaluator.num_images == 12 and evaluator.num_padding == 3
  assert evaluator.num_duplicates == 0
  assert len(evaluator.results) == sum(not a["iscrowd"] for a in gt.anns.values())
  json.dumps(evaluator.results)
  metrics = evaluator.evaluate()
  printed = capsys.readouterr().out
  assert printed.count("Average Precision") == 6 + 6 + 5
  assert set(metrics) == ({f"bbox/{n}" for n in ev.BOX_METRICS}
                          | {f"segm/{n}" for n in ev.BOX_METRICS}
                          | {f"keypoints/{n}" for n in ev.KEYPOINT_METRICS})
  assert metrics["bbox/AP"] == 1.0 and metrics["bbox/AR100"] == 1.0
  # Masks go through a 28 x 28 RoIAlign crop and back (bilinear paste, 0.5
  # threshold), which is lossy: boundary pixels of large or thin regions
  # move. Here every mask IoU is >= 0.988 and segm AP is 1.0, but an
  # instance just under the strictest IoU threshold (0.95) on other data
  # would cost AP without anything being wrong, hence >= 0.99.
  assert metrics["segm/AP"] >= 0.99 and metrics["segm/AP50"] == 1.0
  assert metrics["keypoints/AP"] == pytest.approx(1.0)


def test_only_added_images_are_evaluated(shapes_val):
  gt, meta = shapes_val
  ids = sorted(gt.getImgIds())[:5]  # the others' ground truth must not count as missed
  examples = _gt_as_detections(gt, meta, ids, 128, 10, np.random.default_rng(2))
  evaluator = ev.COCOEvaluator(gt, meta["coco_ids"], meta["keypoint_category_ids"],
                               iou_types=("bbox",))
  for dets, info in _batches(examples, 5):
    evaluator.add({k: v for k, v in dets.items() if k != "masks"}, info)
  assert evaluator.image_ids == ids
  metrics = evaluator.evaluate()
  assert set(metrics) == {f"bbox/{n}" for n in ev.BOX_METRICS}
  assert metrics["bbox/AP"] == 1.0 and metrics["bbox/AR100"] == 1.0


def test_empty_detections_do_not_crash(shapes_val, capsys):
  gt, meta = shapes_val
  evaluator = ev.COCOEvaluator(gt, meta["coco_ids"], meta["keypoint_category_ids"])
  assert evaluator.evaluate() == {f"bbox/{n}": 0.0 for n in ev.BOX_METRICS}  # nothing added
  examples = _gt_as_detections(gt, meta, sorted(gt.getImgIds())[:3], 128, 6,
                               np.random.default_rng(3))
  for dets, info in _batches(examples, 4):
    evaluator.add(dict(dets, valid=np.zeros_like(dets["valid"])), info)
  assert evaluator.num_images == 3 and evaluator.results == []
  metrics = evaluator.evaluate()
  assert len(metrics) == 12 + 12 + 10 and all(v == 0.0 for v in metrics.values())


def test_unknown_image_id_is_reported(shapes_val):
  gt, meta = shapes_val
  (dets, info), = _gt_as_detections(gt, meta, sorted(gt.getImgIds())[:1], 128, 4,
                                    np.random.default_rng(4))
  evaluator = ev.COCOEvaluator(gt, meta["coco_ids"], iou_types=("bbox",))
  evaluator.add({k: v[None] for k, v in dets.items()},
                {k: np.asarray(v)[None] for k, v in dict(info, image_id=10 ** 6).items()})
  with pytest.raises(ValueError, match="not in the annotations"):
    evaluator.evaluate()


def test_keypoint_count_mismatch_is_reported(shapes_val):
  gt, meta = shapes_val
  (dets, info), = _gt_as_detections(gt, meta, sorted(gt.getImgIds())[:1], 128, 4,
                                    np.random.default_rng(4))
  evaluator = ev.COCOEvaluator(gt, meta["coco_ids"], meta["keypoint_category_ids"])
  dets = dict(dets, keypoints=np.zeros((4, 5, 3), np.float32))  # the triangle has 3
  evaluator.add({k: v[None] for k, v in dets.items()},
                {k: np.asarray(v)[None] for k, v in info.items()})
  with pytest.raises(ValueError, match="keypoints"):
    evaluator.evaluate()


def test_oks_sigmas():
  gt = COCO()
  gt.dataset = {"images": [{"id": 1, "height": 8, "width": 8}], "annotations": [],
                "categories": [{"id": 1, "name": "a"}]}
  gt.createIndex()
  evaluator = ev.COCOEvaluator(gt, [1], [1])
  evaluator._num_keypoints = 17
  np.testing.assert_allclose(evaluator._sigmas(), ev.COCO_PERSON_SIGMAS)
  evaluator._num_keypoints = 3
  np.testing.assert_allclose(evaluator._sigmas(), [ev.DEFAULT_OKS_SIGMA] * 3)
  evaluator = ev.COCOEvaluator(gt, [1], [1], oks_sigmas=[0.1, 0.2])
  evaluator._num_keypoints = 3
  with pytest.raises(ValueError, match="oks_sigmas"):
    evaluator._sigmas()


def test_keypoint_score_ranks_keypoint_results_only():
  """Two triangles; the surer box has wrong keypoints. Hand-computed AP either way."""
  kp_gt = [[[10, 10, 2], [5, 30, 2], [15, 30, 2]], [[50, 10, 2], [45, 30, 2], [55, 30, 2]]]
  gt = COCO()
  gt.dataset = {
      "images": [{"id": 1, "height": 64, "width": 64}],
      "categories": [{"id": 7, "name": "triangle", "keypoints": ["a", "b", "c"]}],
      "annotations": [{"id": i + 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
                       "bbox": [x, 10, 10, 20], "area": 200.0, "num_keypoints": 3,
                       "keypoints": np.ravel(k).tolist()}
                      for i, (x, k) in enumerate(zip((5, 45), kp_gt))]}
  gt.createIndex()
  kps = np.array(kp_gt, np.float32) + [0.5, 0.5, 0]  # continuous coordinates
  kps[0, :, :2] += 8  # the first detection's keypoints are far off (OKS ~0)
  kps[:, :, 2] = [[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]  # and its heatmaps were unsure
  dets = _dets([[[5, 10, 15, 30], [45, 10, 55, 30]]], classes=[[0, 0]], scores=[[0.9, 0.8]],
               valid=[[1, 1]], keypoints=kps[None])
  info = {"scale": [[1.0, 1.0]], "original_size": [[64, 64]], "image_id": [1], "valid": [1]}
  ap = {}
  for rank in ev.KEYPOINT_SCORES:
    evaluator = ev.COCOEvaluator(gt, [7], [7], iou_types=("bbox", "keypoints"),
                                 keypoint_score=rank)
    evaluator.add(dets, info)
    ap[rank] = evaluator.evaluate()["keypoints/AP"]
    assert [r["score"] for r in evaluator._results_for("bbox")] == pytest.approx([0.9, 0.8])
    if rank == "box_x_keypoints":
      assert [r["score"] for r in evaluator._results_for("keypoints")] == pytest.approx(
          [0.9 * 0.2, 0.8 * 0.8])
  # Ranked by box: a false positive, then a true one (precision 1/2 up to recall
  # 1/2); ranked with the keypoints: the true one first (precision 1). COCOeval
  # averages precision over 101 recall points, of which 51 lie at or below 1/2.
  assert ap["box"] == pytest.approx(51 * 0.5 / 101)
  assert ap["box_x_keypoints"] == pytest.approx(51 / 101)
  with pytest.raises(ValueError, match="keypoint_score"):
    ev.COCOEvaluator(gt, [7], [7], keypoint_score="oks")


# ------------------------------------------------------------------ draw
def test_draw_changes_pixels_where_results_are(shapes_val):
  gt, meta = shapes_val
  image_id = next(i for i in sorted(gt.getImgIds())
                  if any(a["category_id"] == 7 and a.get("num_keypoints")
                         for a in gt.imgToAnns[i]))
  (dets, info), = _gt_as_detections(gt, meta, [image_id], 128, 10, np.random.default_rng(5))
  results = ev.image_results(dets, info["scale"], info["original_size"], image_id,
                             meta["coco_ids"], meta["keypoint_category_ids"])
  h, w = info["original_size"]
  image = np.full((h, w, 3), 128, np.uint8)
  names = dict(zip(meta["coco_ids"], meta["names"]))
  out = draw_lib.draw(image, results, names, meta["skeleton"], meta["keypoint_category_ids"])
  assert out.shape == image.shape and out.dtype == np.uint8
  changed = np.any(out != image, axis=2)
  for r in results:
    x, y, bw, bh = (int(round(v)) for v in r["bbox"])
    assert changed[y:y + bh + 1, x:x + bw + 1].any()
    inside = mask_utils.decode(r["segmentation"]).astype(bool)
    assert changed[inside].mean() > 0.9  # the translucent overlay
  assert changed.mean() < 0.99  # background away from every result is untouched
  assert not changed[~np.any([mask_utils.decode(r["segmentation"]) for r in results], 0)
                     ].all()
  np.testing.assert_array_equal(
      out, draw_lib.draw(image, results, names, meta["skeleton"], meta["keypoint_category_ids"]))
  assert draw_lib.category_colour(7) == draw_lib.category_colour(7)
  assert draw_lib.category_colour(7) != draw_lib.category_colour(9)
  np.testing.assert_array_equal(draw_lib.draw(image, [], names), image)


def test_draw_enlarges_small_images(shapes_val):
  """min_side: a 128-px image is drawn 4x (nearest neighbour) with its results scaled."""
  gt, meta = shapes_val
  image_id = sorted(gt.getImgIds())[0]
  (dets, info), = _gt_as_detections(gt, meta, [image_id], 128, 10, np.random.default_rng(5))
  results = ev.image_results(dets, info["scale"], info["original_size"], image_id,
                             meta["coco_ids"], meta["keypoint_category_ids"])
  h, w = info["original_size"]
  image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
  names = dict(zip(meta["coco_ids"], meta["names"]))
  zoom = -(-512 // max(h, w))
  big = draw_lib.draw(image, results, names, min_side=512)
  assert big.shape == (h * zoom, w * zoom, 3) and max(big.shape[:2]) >= 512
  np.testing.assert_array_equal(draw_lib.draw(image, [], names, min_side=512),
                                image.repeat(zoom, 0).repeat(zoom, 1))
  native = draw_lib.draw(image, results, names)
  changed = np.any(big != image.repeat(zoom, 0).repeat(zoom, 1), axis=2)
  for r in results:  # each box's outline lies on the enlarged box
    x, y, bw, bh = (int(round(zoom * v)) for v in r["bbox"])
    assert changed[y:y + bh + 1, x].any() and changed[y, x:x + bw + 1].any()
  assert native.shape == image.shape
  with pytest.raises(ValueError):
    draw_lib.draw(image[..., :2], [], names, min_side=512)


def test_benchmark_smoke():
  from tests.evaluation import benchmark_coco_eval
  added, evaluated, metrics = benchmark_coco_eval.run(num_images=4, size=64, dets=20)
  assert added > 0 and evaluated > 0 and len(metrics) == 12 + 12 + 10
