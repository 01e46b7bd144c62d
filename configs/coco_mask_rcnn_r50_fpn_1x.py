"""Mask R-CNN R50-FPN, the 1x schedule on COCO 2017 (detectron2's recipe).

    # once: download train2017/, val2017/ and annotations/ from cocodataset.org, then
    python -m mrcnn_jax.data.coco --images data/coco/train2017 \\
        --annotations data/coco/annotations/instances_train2017.json --output data/coco/tf/train2017
    python -m mrcnn_jax.data.coco --images data/coco/val2017 \\
        --annotations data/coco/annotations/instances_val2017.json --output data/coco/tf/val2017
    python -m mrcnn_jax.train --config=configs/coco_mask_rcnn_r50_fpn_1x.py --workdir=workdirs/mrcnn_r50_1x

Batch 16, SGD lr 0.02 (scaled linearly for other batch sizes), 1000 warm-up
steps, decay by 10x at 60k and 80k of 90k steps, frozen BN with the stem and
res2 frozen. Start from ImageNet weights with ``--config.init_checkpoint=``
(a backbone converted by ``mrcnn_jax.convert``) and ``--config.init_keep=backbone``;
from scratch, use ``--config.model.backbone.norm=gn`` and a longer schedule.
Images are fitted (aspect kept) into a landscape 768x1024 or a portrait
1024x768 canvas rather than detectron2's 800/1333 resize, each batch of
one canvas, so that there are two static shapes (mrcnn_jax/data/canvases.py):
COCO's 4:3 and 3:2 photos keep their longer side at 1024 with at most 11%
padding (25-33% in one 1024x1024 canvas), squarer ones have their shorter
side at 768. ``--config.data.canvas_sizes='((1024,1024),)'`` is the one
square canvas (Google's TPU Mask R-CNN recipe).
"""

import ml_collections

from mrcnn_jax.mlperf import mlperf_config
from mrcnn_jax.modeling import build
from mrcnn_jax.optim import optim_config
from mrcnn_jax.sharding import mesh_config

CANVASES = ((768, 1024), (1024, 768))  # (h, w): landscape 4:3 and portrait 3:4, longer side 1024
MAX_INSTANCES = 100


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 16
  config.eval_batch_size = 16
  config.total_steps = 90000
  config.data = ml_collections.ConfigDict({
      "train_dir": "data/coco/tf/train2017", "eval_dir": "data/coco/tf/val2017",
      "eval_annotations": "",  # default: what the converter kept (eval_dir/ground_truth.json)
      # Where records come from: "records" (the converted splits above) or
      # "tfds", a prepared TFDS detection dataset (tfds_name
      # "NAME[/CONFIG][:VERSION]" in tfds_data_dir, default TFDS's
      # own; see mrcnn_jax/data/tfds_source.py). TFDS's coco/2017 has no
      # masks: with it, set model.mask_head.enabled=False.
      "source": "records", "tfds_name": "", "tfds_data_dir": "",
      "tfds_train_split": "train", "tfds_eval_split": "validation",
      # canvas_sizes: each image to the one that fits it best; canvas_size
      # (h, w) instead, for one canvas (then canvas_sizes=()).
      "canvas_size": (), "canvas_sizes": CANVASES,
      "max_instances": MAX_INSTANCES, "mask_size": 28,
      "mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375),  # torchvision
      "channel_order": "rgb", "resize_rounding": "round",  # or "floor" (torchvision)
      "flip": True, "scale_range": None,
      "filter_empty": True, "threads": 0, "prefetch": 2,
      "parallel_calls": 0,  # decode calls in flight; 0 = tf.data autotuning

      # A record that fails its CRC or does not decode: "fail" (exit 2, named)
      # or "skip" (named, counted in metrics.jsonl; the batch is filled on).
      "on_corrupt": "fail",
  })
  config.model = build.model_config(num_classes=80)  # R50-FPN, frozen BN, freeze_at 2
  config.optim = optim_config()  # SGD 0.02 @ 16, warm-up 1000, steps 60k/80k
  config.train = ml_collections.ConfigDict({
      "log_every": 100, "checkpoint_every": 5000, "keep_checkpoints": 3,
      "eval_every": 10000, "eval_steps": 0, "best_metric": "segm/AP",
      "max_nonfinite": 20, "progress": True,

      # A checkpoint save that fails (no space, permission): "stop" (exit 4,
      # named) or "warn" (named, training goes on; the next save tries again).
      "checkpoint_failures": "stop",
  })
  # () = COCO's 17 sigmas for 17 keypoints; keypoint results ranked by their
  # box's score, as detectron2 does (see evaluation/coco.py KEYPOINT_SCORES).
  # COCOeval by faster-coco-eval (pycocotools' numbers, evaluation/backends.py);
  # masks pasted and encoded by 4 worker processes per host (0: in process).
  config.eval = ml_collections.ConfigDict({"oks_sigmas": (), "keypoint_score": "box",
                                           "backend": "faster_coco_eval", "workers": 4})
  # MLPerf time-to-accuracy mode: --config.mlperf.enabled=True (mrcnn_jax/mlperf.py).
  config.mlperf = mlperf_config()
  # Devices splitting each image's height: --config.mesh.space=N (mrcnn_jax/sharding.py).
  config.mesh = mesh_config()
  config.init_checkpoint = ""
  config.init_keep = "backbone"
  return config
