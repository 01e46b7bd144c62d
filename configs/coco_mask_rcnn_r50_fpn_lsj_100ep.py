"""Mask R-CNN R50-FPN, large-scale jitter, 100 epochs on COCO 2017: the pod recipe.

    # once: convert train2017 and val2017 as configs/coco_mask_rcnn_r50_fpn_1x.py says, then
    python -m mrcnn_jax.train --config=configs/coco_mask_rcnn_r50_fpn_lsj_100ep.py \\
        --workdir=gs://BUCKET/mrcnn_r50_lsj_100ep [--coordinator_address=... on a pod]

detectron2's new baseline ``configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``
(44.6 box / 40.3 mask AP in its MODEL_ZOO), itself after the TPU detection
recipe (tensorflow/tpu models/official/detection) and Ghiasi et al. 2021
(large-scale jitter): trained from scratch with nothing frozen;
BatchNorm over the global batch (synchronised BN) in the ResNet, the FPN and
the box head's convs; two 3x3 convs in the RPN head; a 4conv1fc box head;
each training image resized to a random 0.1-2.0x of the size that fits the
1024x1024 canvas, then randomly cropped and padded to it, and flipped; batch
64, SGD lr 0.1, momentum 0.9, weight decay 4e-5, 500 warm-up steps from
0.067x, decay 10x at 163889 and 177546 of 184375 steps (100 epochs of
118k images). Compute in bfloat16 (detectron2 trains with AMP).

Where it differs: the mask head's convs use GroupNorm, not BatchNorm (its
fixed foreground slots include padding, whose features would enter batch
statistics); evaluation fits each image into the 1024 canvas rather than
detectron2's 800/1333 resize. ``--config.model.batch_norm_group_size=N``
takes BatchNorm statistics over groups of N devices instead of the pod.
"""

import ml_collections

from mrcnn_jax.mlperf import mlperf_config
from mrcnn_jax.modeling import build
from mrcnn_jax.optim import optim_config
from mrcnn_jax.sharding import mesh_config

CANVAS = 1024
MAX_INSTANCES = 100
BATCH = 64
TOTAL_STEPS = 184375  # 100 epochs x 118k images / 64


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = BATCH
  config.eval_batch_size = BATCH
  config.total_steps = TOTAL_STEPS
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
      "canvas_size": (CANVAS, CANVAS), "max_instances": MAX_INSTANCES, "mask_size": 28,
      "mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375),  # torchvision
      "channel_order": "rgb", "resize_rounding": "round",
      # detectron2's ResizeScale(0.1, 2.0) of the canvas + FixedSizeCrop + RandomFlip.
      "flip": True, "scale_range": (0.1, 2.0),
      "filter_empty": True, "threads": 0, "prefetch": 2, "parallel_calls": 0,
      "on_corrupt": "fail",
  })
  model = build.model_config(num_classes=80, dtype="bfloat16", fpn_norm="bn",
                             batch_norm_group_size=0)
  model.backbone.update(norm="bn", freeze_at=0)
  model.rpn.num_convs = 2
  model.box_head.update(num_convs=4, conv_dim=256, fc_dims=(1024,), norm="bn")
  model.mask_head.norm = "gn"
  config.model = model
  config.optim = optim_config(
      lr=0.1, reference_batch_size=BATCH, weight_decay=4e-5, warmup_steps=500,
      warmup_factor=0.067, decay_steps=(163889, 177546), decay_factor=0.1)
  config.train = ml_collections.ConfigDict({
      "log_every": 100, "checkpoint_every": 5000, "keep_checkpoints": 3,
      "eval_every": 1844,  # about one epoch
      "eval_steps": 0, "best_metric": "segm/AP", "max_nonfinite": 20, "progress": True,
      "checkpoint_failures": "stop",
  })
  # COCOeval by faster-coco-eval (pycocotools' numbers, evaluation/backends.py),
  # masks pasted and encoded by 4 worker processes per host (0: in process).
  config.eval = ml_collections.ConfigDict({"oks_sigmas": (), "keypoint_score": "box",
                                           "backend": "faster_coco_eval", "workers": 4})
  # MLPerf time-to-accuracy mode: --config.mlperf.enabled=True (mrcnn_jax/mlperf.py).
  config.mlperf = mlperf_config()
  # Devices splitting each image's height: --config.mesh.space=N (mrcnn_jax/sharding.py).
  config.mesh = mesh_config()
  config.init_checkpoint = ""  # from scratch, as the recipe trains
  config.init_keep = "all"
  return config
