"""COCOeval implementations: pycocotools (the reference) or faster-coco-eval.

``config.eval.backend`` picks one. faster-coco-eval (a C++ port of the same
algorithm: matching, accumulation and the 101-point interpolated precision)
gives pycocotools' numbers on bbox, segm and keypoints
(tests/evaluation/test_backends.py compares every metric, and
``scripts/benchmark_eval.py`` reports the largest difference at COCO size)
in a fraction of the time. Both print the same summary tables.
"""

import contextlib
import io
from typing import Dict, List, Optional, Sequence

import numpy as np

BACKENDS = ("pycocotools", "faster_coco_eval")


def check_backend(backend: str) -> None:
  """Raises ValueError for an unknown backend, ImportError when it is not installed."""
  if backend not in BACKENDS:
    raise ValueError(f"eval.backend: expected one of {BACKENDS}, got {backend!r}")
  if backend == "faster_coco_eval":
    try:
      import faster_coco_eval  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ImportError("eval.backend=faster_coco_eval needs the faster-coco-eval package "
                        "(pip install faster-coco-eval==1.8.0)") from None


class GroundTruth:
  """A COCO ground-truth dict indexed once by the chosen backend's ``COCO``."""

  def __init__(self, dataset: dict, backend: str = "pycocotools"):
    check_backend(backend)
    self.backend = backend
    if backend == "pycocotools":
      from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
      self.coco = COCO()
      self.coco.dataset = dataset
      with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
        self.coco.createIndex()
    else:
      from faster_coco_eval import COCO  # pylint: disable=g-import-not-at-top
      self.coco = COCO(dataset)

  def evaluate(self, results: List[dict], iou_type: str, image_ids: Sequence[int],
               category_ids: Optional[Sequence[int]] = None,
               oks_sigmas: Optional[np.ndarray] = None, quiet: bool = False) -> np.ndarray:
    """COCOeval's ``stats`` for ``results`` (dicts as ``loadRes`` reads them; copied
    by the caller, since loadRes writes ids and areas into them) over ``image_ids``.
    Prints the summary table unless ``quiet``."""
    coco_dt = self._load_results(results)
    if self.backend == "pycocotools":
      from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
      coco_eval = COCOeval(self.coco, coco_dt, iou_type)
    else:
      from faster_coco_eval import COCOeval_faster  # pylint: disable=g-import-not-at-top
      coco_eval = COCOeval_faster(self.coco, coco_dt, iou_type, print_function=print,
                                  kpt_oks_sigmas=oks_sigmas)
    coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    if category_ids is not None:
      coco_eval.params.catIds = sorted(int(c) for c in category_ids)
    if oks_sigmas is not None:
      coco_eval.params.kpt_oks_sigmas = np.asarray(oks_sigmas, np.float64)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    return np.asarray(coco_eval.stats, np.float64)

  def _load_results(self, results: List[dict]):
    with contextlib.redirect_stdout(io.StringIO()):  # "Loading and preparing results..."
      return self.coco.loadRes(results)


def stats_as_metrics(iou_type: str, names: Sequence[str], stats: np.ndarray) -> Dict[str, float]:
  """``{"bbox/AP": ...}``; COCOeval's -1 (no such objects) as NaN."""
  return {f"{iou_type}/{n}": float(v) if v >= 0 else float("nan")
          for n, v in zip(names, stats)}
