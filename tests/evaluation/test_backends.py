"""Fast evaluation: RLE from the pasted block, faster-coco-eval against pycocotools,
worker processes and merged shards against one in-process evaluator."""

import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mrcnn_jax.evaluation import backends
from mrcnn_jax.evaluation import coco as ev
from tests.evaluation import benchmark_coco_eval as bench


def test_rle_of_block_hand_computed():
  # A 3 x 4 image; the block [[1, 0], [1, 1]] at (top 1, left 1). Column-major
  # pixels: column 0 = 0 0 0, column 1 = 0 1 1, column 2 = 0 0 1, column 3 = 0 0 0
  # -> runs 4 zeros, 2 ones, 2 zeros, 1 one, 3 zeros.
  block = np.array([[1, 0], [1, 1]], bool)
  rle = ev.rle_of_block(block, 1, 1, 3, 4)
  assert rle["size"] == [3, 4]
  assert rle["counts"] == mask_utils.frPyObjects(
      {"counts": [4, 2, 2, 1, 3], "size": [3, 4]}, 3, 4)["counts"].decode("ascii")
  np.testing.assert_array_equal(
      mask_utils.decode(dict(rle, counts=rle["counts"].encode("ascii"))),
      [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]])


def test_rle_of_block_equals_pycocotools_encode():
  rng = np.random.default_rng(0)
  for trial in range(400):
    height, width = (int(v) for v in rng.integers(1, 30, 2))
    top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
    h, w = int(rng.integers(0, height - top + 1)), int(rng.integers(0, width - left + 1))
    if trial % 4 == 0:  # full-height blocks: runs that go on into the next column
      top, h = 0, height
    block = rng.uniform(size=(h, w)) < rng.choice([0.05, 0.5, 0.97, 1.0])
    full = np.zeros((height, width), np.uint8, order="F")
    full[top:top + h, left:left + w] = block
    expected = mask_utils.encode(full)
    assert ev.rle_of_block(block, top, left, height, width) == {
        "size": [height, width], "counts": expected["counts"].decode("ascii")}, trial


@pytest.fixture(scope="module")
def noisy():
  """Ground truth (5 categories, one with 17 keypoints) and imperfect detections."""
  rng = np.random.default_rng(1)
  gt = bench.make_ground_truth(rng, 16, 96, 5)
  ids = sorted(gt.getImgIds())
  batches = [bench.make_batch(rng, gt, ids[i:i + 4], 96, 20) for i in range(0, len(ids), 4)]
  scale = 1.25  # make_batch's canvas scale
  for detections, info in batches:  # the ground truth's copies: masks and keypoints near it
    for i, image_id in enumerate(info["image_id"]):
      for j, a in enumerate(gt.imgToAnns[int(image_id)]):
        holes = rng.uniform(size=(28, 28)) < rng.uniform(0, 0.5)
        detections["masks"][i, j] = np.where(holes, 0.1, 0.9)
        if a.get("keypoints"):
          k = np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
          detections["keypoints"][i, j, :, :2] = (k[:, :2] + 0.5 + rng.normal(0, 3, (
              len(k), 2))) * scale
  return gt, batches


def _metrics(gt, batches, **options):
  evaluator = ev.COCOEvaluator(gt, bench.COCO_IDS, [bench.COCO_IDS[0]], **options)
  for detections, info in batches:
    evaluator.add(detections, info)
  metrics = evaluator.evaluate(quiet=True)
  evaluator.close()
  return metrics, evaluator.results


def test_faster_coco_eval_gives_pycocotools_numbers(noisy):
  gt, batches = noisy
  reference, _ = _metrics(gt, batches)
  faster, _ = _metrics(gt, batches, backend="faster_coco_eval")
  assert len(reference) == 12 + 12 + 10
  assert 0.02 < reference["segm/AP"] < 0.95 and 0.02 < reference["keypoints/AP"] < 0.95
  assert set(faster) == set(reference)
  for key, value in reference.items():
    if np.isnan(value):
      assert np.isnan(faster[key]), key
    else:
      assert faster[key] == pytest.approx(value, abs=1e-12), key


def test_worker_processes_give_the_same_results(noisy):
  gt, batches = noisy
  reference, results = _metrics(gt, batches)
  parallel, parallel_results = _metrics(gt, batches, workers=2)
  assert parallel_results == results
  np.testing.assert_equal(parallel, reference)  # NaN where COCOeval has no such objects


def test_merged_shards_score_as_one_evaluator(noisy, capsys):
  gt, batches = noisy
  reference, _ = _metrics(gt, batches)
  main, other = (ev.COCOEvaluator(gt, bench.COCO_IDS, [bench.COCO_IDS[0]]) for _ in range(2))
  for k, (detections, info) in enumerate(batches):  # as two processes' slices
    (main if k % 2 else other).add(detections, info)
  shard = other.shard()
  main.merge(shard)
  assert sorted(main.image_ids) == sorted(gt.getImgIds())
  np.testing.assert_equal(main.evaluate(), reference)
  assert capsys.readouterr().out.count("Average Precision") == 6 + 6 + 5
  with pytest.raises(ValueError, match="added twice"):
    main.merge(shard)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="eval.backend: expected one of"):
    backends.check_backend("detectron2")
  gt = bench.make_ground_truth(np.random.default_rng(0), 1, 32, 1)
  with pytest.raises(ValueError, match="workers: expected an integer >= 0"):
    ev.COCOEvaluator(gt, bench.COCO_IDS, workers=-1)


def test_workers_run_one_blas_thread_and_leave_the_parent_as_it_was(monkeypatch):
  from mrcnn_jax.evaluation import workers  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")
  monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
  pool = workers.ResultWorkers(1)
  try:
    assert pool.submit([]).result() == []  # starts the worker
    child = [pool._pool.submit(os.getenv, k).result()  # pylint: disable=protected-access
             for k in workers._ONE_THREAD]  # pylint: disable=protected-access
  finally:
    pool.close()
  assert child == ["1"] * 3
  assert os.environ["OPENBLAS_NUM_THREADS"] == "7" and "OMP_NUM_THREADS" not in os.environ
