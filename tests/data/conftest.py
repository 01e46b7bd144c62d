"""A small synthetic COCO dataset, converted once per session, and a data config."""

import ml_collections
import pytest

from tests.conftest import make_shapes_dataset


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
  """(raw COCO dir, converted dir) of a 16-train / 8-val synthetic dataset."""
  return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=16, val=8, size=96,
                             seed=3, shards=3)


def data_config(tf_dir, **data_overrides):
  cfg = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 4, "eval_batch_size": 3,
      "data": {"train_dir": str(tf_dir / "train"), "eval_dir": str(tf_dir / "val"),
               "canvas_size": (128, 128), "max_instances": 12, "mask_size": 28,
               "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "channel_order": "rgb",
               "flip": True, "scale_range": None, "filter_empty": True}})
  cfg.data.update(data_overrides)
  return cfg
