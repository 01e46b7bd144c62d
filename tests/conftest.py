"""Shared test fixtures.

Reference tests against torch/torchvision use the ``torchvision`` fixture: it
skips when torch is missing, unless MRCNN_REQUIRE_PARITY=1 (set by .ci/run),
under which a missing torch is a failure.
"""

import os

import numpy as np
import pytest

try:
  # torch must be imported before TensorFlow: the other order segfaults while
  # torchvision imports triton (torch 2.14.1 / tensorflow-cpu 2.21.0).
  import torch  # noqa: F401  pylint: disable=unused-import
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass


def _import_torchvision():
  try:
    import torch
    import torchvision
  except ImportError as e:  # pragma: no cover - depends on the environment
    if os.environ.get("MRCNN_REQUIRE_PARITY") == "1":
      pytest.fail(f"MRCNN_REQUIRE_PARITY=1 but torch/torchvision cannot be imported: {e}")
    pytest.skip("torch/torchvision not installed (scripts/test.sh --parity installs them)")
  torch.set_num_threads(1)
  return torch, torchvision


@pytest.fixture
def torchvision():
  """The torchvision module ; see module docstring."""
  return _import_torchvision()[1]


@pytest.fixture
def torch():
  """The torch module, under the same skip/fail rule as ``torchvision``."""
  return _import_torchvision()[0]


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def random_boxes(rng, n, canvas=100.0, min_size=1.0, max_size=40.0):
  """``[n, 4]`` float32 xyxy boxes with top-left corners inside the canvas."""
  xy = rng.uniform(0, canvas, size=(n, 2))
  wh = rng.uniform(min_size, max_size, size=(n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def make_shapes_dataset(root, train: int, val: int, size: int, seed: int, shards: int):
  """Writes a synthetic COCO dataset under ``root/raw`` and converts it to ``root/tf/<split>``."""
  from mrcnn_jax.data import coco, synthetic  # pylint: disable=g-import-not-at-top
  synthetic.main(["--output", str(root / "raw"), "--train", str(train), "--val", str(val),
                  "--size", str(size), "--seed", str(seed), "--workers", "1"])
  for split in ("train", "val"):
    coco.convert(str(root / "raw" / split),
                 str(root / "raw" / "annotations" / f"instances_{split}.json"),
                 str(root / "tf" / split), num_shards=shards, workers=1)
  return root / "raw", root / "tf"
