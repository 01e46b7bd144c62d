"""The main job on the synthetic shapes dataset, sized for a 2-core CPU.

    python -m mrcnn_jax.data.synthetic --output data/shapes --train 2000 --val 200 --size 128 \\
        --min_object_size 16
    python -m mrcnn_jax.data.coco --images data/shapes/train \\
        --annotations data/shapes/annotations/instances_train.json --output data/shapes/tf/train
    python -m mrcnn_jax.data.coco --images data/shapes/val \\
        --annotations data/shapes/annotations/instances_val.json --output data/shapes/tf/val
    python -m mrcnn_jax.train --config=configs/shapes.py --workdir=workdirs/shapes

(scripts/demo.sh runs exactly this, then evaluate and predict.) All three
heads are on. The paper's sizes would not train in minutes on a CPU, so this
config shrinks what the shapes allow: a ResNet-18 layout at half its width
with GroupNorm trained from scratch, a 128-pixel canvas with anchors a
quarter of COCO's, 64 channels in the FPN, narrow heads, and fewer
proposals and RoIs. Every op and head is the same as in the COCO configs;
the keypoint head also trains its sub-pixel decoding (position_loss_weight,
below).
``--config=configs/shapes.py:tiny`` is a seconds-long variant for tests;
``--config=configs/shapes.py:cascade`` is Cascade Mask R-CNN (three box
stages, modeling/cascade.py) on the same data and schedule.

Current figures: README.md; the measurements and variants tried behind each
setting: docs/experiments.md.
"""

import os

import ml_collections

from mrcnn_jax.mlperf import mlperf_config
from mrcnn_jax.modeling import build, cascade
from mrcnn_jax.optim import optim_config
from mrcnn_jax.sharding import mesh_config

CANVAS = 128
MAX_INSTANCES = 16  # the generator draws at most 8 objects + a crowd region
NUM_KEYPOINTS = 3  # triangle: apex, left_base, right_base


def get_config(arg=None):
  if arg not in (None, "", "tiny", "cascade"):
    raise ValueError(f"configs/shapes.py: expected no argument, 'tiny' or 'cascade', got {arg!r}")
  tiny = arg == "tiny"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.eval_batch_size = 16
  config.total_steps = 30 if tiny else 1900  # ~0.36 s each: the demo's 15 minutes

  config.data = ml_collections.ConfigDict({
      "train_dir": "data/shapes/tf/train", "eval_dir": "data/shapes/tf/val",
      "eval_annotations": "",  # default: what the converter kept (eval_dir/ground_truth.json)
      # Where records come from: "records" (the converted splits above) or
      # "tfds", a prepared TFDS detection dataset (tfds_name
      # "NAME[/CONFIG][:VERSION]" in tfds_data_dir, default TFDS's
      # own; see mrcnn_jax/data/tfds_source.py).
      "source": "records", "tfds_name": "", "tfds_data_dir": "",
      "tfds_train_split": "train", "tfds_eval_split": "validation",
      "canvas_size": (CANVAS, CANVAS), "max_instances": MAX_INSTANCES, "mask_size": 28,
      # Several canvases instead of canvas_size (then set to ()): ((h, w), ...),
      # see mrcnn_jax/data/canvases.py.
      "canvas_sizes": (),
      # ImageNet statistics on 0..255 RGB, as torchvision's transform does.
      "mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375),
      "channel_order": "rgb", "resize_rounding": "round",  # or "floor" (torchvision)
      "flip": True, "scale_range": (0.8, 1.25),
      "filter_empty": True, "threads": 0, "prefetch": 2,
      # A 128-px image decodes fast: a quarter of the cores keep ahead of the
      # step and leave the rest to XLA. Fixed, so tf.data's autotuner is off
      # and its minute-long wait at exit with it (see data/input_pipeline.py).
      "parallel_calls": max(1, (os.cpu_count() or 1) // 4),

      # A record that fails its CRC or does not decode: "fail" (exit 2, named)
      # or "skip" (named, counted in metrics.jsonl; the batch is filled on).
      "on_corrupt": "fail",
  })

  model = build.model_config(num_classes=5)
  model.backbone.update(depth="tiny" if tiny else "18", width=8 if tiny else 32,
                        norm="gn", freeze_at=0)
  model.fpn_channels = 32 if tiny else 64
  # A quarter of COCO's anchor sizes for a canvas an eighth of COCO's side.
  model.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
  model.rpn.update(pre_nms_topk_train=500, post_nms_topk_train=200,
                   pre_nms_topk_test=300, post_nms_topk_test=100, batch_size_per_image=128)
  # 64 RoIs per image, up to half foreground (~20 per image here): as good as
  # 128 with up to a quarter, for a shorter step (docs/experiments.md).
  model.roi.update(batch_size_per_image=64, positive_fraction=0.5, num_mask_rois=8,
                   num_keypoint_rois=8)
  if tiny:
    model.box_head.fc_dims = (32, 32)
  else:  # detectron2's conv head, narrow: see docs/experiments.md
    model.box_head.update(num_convs=2, conv_dim=64, fc_dims=(128,))
  if arg == "cascade":  # detectron2's cascade stages, class-agnostic boxes
    model.box_head.class_agnostic = True
    model.cascade.update(iou_thresholds=cascade.DETECTRON2_IOU_THRESHOLDS,
                         box_weights=cascade.DETECTRON2_BOX_WEIGHTS)
  model.mask_head.update(num_convs=2, conv_dim=32)
  # Heatmaps over boxes 1.4x the detection's: a triangle's corners lie on its
  # box (see docs/experiments.md).
  # Sub-pixel keypoints (a local soft-argmax, see modeling/keypoint_head.py):
  # on small triangles half a pixel is much of the OKS tolerance.
  model.keypoint_head.update(enabled=True, num_keypoints=NUM_KEYPOINTS, num_convs=2,
                             conv_dim=32, loss_weight=1.0 if tiny else 0.05, box_scale=1.4,
                             decode="local_mean", flip_map=(0, 2, 1),  # the base corners swap
                             position_loss_weight=1.0)  # trains the decoding (docs/experiments.md)
  # Masks and keypoints averaged over the plain, 1.5x and 2x views and their
  # mirrors (boxes from the plain view): see docs/experiments.md.
  model.test.update(detections_per_image=20, score_threshold=0.05, flip=not tiny,
                    scales=(1.0,) if tiny else (1.0, 1.5, 2.0))
  config.model = model

  config.optim = optim_config(
      name="adamw", lr=2e-3, reference_batch_size=8, weight_decay=1e-4,
      warmup_steps=10 if tiny else 100, warmup_factor=0.01, schedule="cosine",
      clip_grad_norm=10.0)

  config.train = ml_collections.ConfigDict({
      "log_every": 5 if tiny else 50, "checkpoint_every": 10 if tiny else 500,
      "keep_checkpoints": 2, "eval_every": 0, "eval_steps": 0,
      "best_metric": "bbox/AP", "max_nonfinite": 5, "progress": True,

      # A checkpoint save that fails (no space, permission): "stop" (exit 4,
      # named) or "warn" (named, training goes on; the next save tries again).
      "checkpoint_failures": "stop",
  })
  # () = the evaluator's default sigma; keypoint results ranked by box score x
  # mean keypoint score (see evaluation/coco.py KEYPOINT_SCORES and docs/experiments.md).
  config.eval = ml_collections.ConfigDict({"oks_sigmas": (),
                                           "keypoint_score": "box_x_keypoints",
                                           "backend": "pycocotools", "workers": 0})
  # MLPerf time-to-accuracy mode: --config.mlperf.enabled=True (mrcnn_jax/mlperf.py).
  config.mlperf = mlperf_config()
  # Devices splitting each image's height: --config.mesh.space=N (mrcnn_jax/sharding.py).
  config.mesh = mesh_config()
  config.init_checkpoint = ""  # e.g. a converted torchvision checkpoint
  config.init_keep = "all"  # "all", "backbone" or "no_predictors"
  return config
