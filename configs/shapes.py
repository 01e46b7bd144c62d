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
``--config=configs/shapes.py:tiny`` is a seconds-long variant for tests.

Since the padding change of 2026-12-05 (padding 0 after normalisation): bbox /
segm / keypoints AP 0.546 / 0.598 / 0.486 (docs/experiments.md). Before it,
scripts/demo.sh from a fresh clone (venv install included): 1900 steps,
bbox / segm / keypoints AP 0.544 / 0.592 / 0.509 in 805 and 799 s (0.359
and 0.356 s/step, two runs, the same AP;
2026-11-28, fourteenth session, after XLA:CPU's convolutions moved from
YNNPACK to XLA's own kernels, see mrcnn_jax/xla_flags.py: the step went
~0.42 -> ~0.36 s and its rounding changed). The same code at 1700 steps:
0.528 / 0.577 / 0.494 in 743 s (0.363 s/step); the 200 more steps that the
faster step pays for lift keypoints over 0.5. Before that change, 0.39-0.49
s/step as the machine's speed varied: 1700 steps, bbox / segm / keypoints
AP 0.513 / 0.564 / 0.502 in 847, 831 and 833 s (0.425, 0.418, 0.419 s/step;
2026-11-28, installing with uv: ~25 s where pip took ~50 s); the day
before, with pip, in 905 s (0.449 s/step), with evaluation and
the pictures side by side 924 s (0.462 s/step), and compiling ahead too
916 s (0.449 s/step; 2026-11-27, twelfth session: views at scales 1.0, 1.5 and 2.0, and no wait at the training
process's exit since data.parallel_calls). With the views at 1.0 and 1.5
and tf.data autotuning, whose thread the process waited for at exit for
up to a minute: 0.513 / 0.563 / 0.497 in 925 s (0.44 s/step; with the
keypoint position loss; autotuning off at one decode call per core: the
same AP in 995 s, its step 13% slower). Before that loss: 1700 steps, 901 s (0.45 s/step),
bbox / segm / keypoints AP 0.506 / 0.547 / 0.476 (2026-11-27, after the 1x1
convolutions became matmuls; the run before, whose rounding differed: 819 s
at 0.41 s/step, 0.523 / 0.577 / 0.485), with test-time
augmentation (mirrored and 1.5x views for the mask and keypoint heads;
model.test) and keypoints decoded "local_mean" and ranked by box score x
mean keypoint score (eval.keypoint_score). The same training without the
views: segm 0.545, keypoints 0.415 (917 s in a slow spell); ranked by box
score, two earlier runs (795 s, 879 s) scored keypoints 0.399. With
the detectron2 decoding: 1700 steps, 873 s, 0.523 / 0.545 / 0.356; 1600
steps, 795 s, 0.483 / 0.500 / 0.339. (Before keypoint box_scale 1.4, 64 RoIs
and the faster step: 1000 steps, 816 s, 0.342 / 0.354 / 0.120.)

What was measured on the 2-core CPU (AdamW, batch 8, 500 steps unless
said; bbox / segm / keypoints AP on the validation split, min 16-px objects;
keypoints AP at 500 steps is low and jumpy, 0.01-0.10 across the variants
below, so the keypoint changes were also judged by their errors):
- keypoint heatmaps over boxes scaled about their centres
  (keypoint_head.box_scale): a triangle's corners lie on its box, and 63%
  of them fell outside the detected box (by a pixel or so) where a heatmap
  over the box cannot reach. 1.2 with 128 RoIs: 0.230 / 0.253 / 0.098
  against 1.0's 0.214 / 0.232 / 0.056 (median per-keypoint OKS of matched
  triangles 0.55 -> 0.69); with 64 RoIs, 1.2 / 1.4 / 1.6: 0.230 / 0.242 /
  0.085, 0.248 / 0.258 / 0.134, 0.217 / 0.232 / 0.108 (OKS 0.62, 0.69, 0.65).
- 64 RoIs per image with up to half foreground: see model.roi below.
- box head "2conv1fc" (two 3x3 convs of 64, one FC of 128; detectron2's
  conv head) instead of "2fc": 0.224 / 0.240 / 0.082 against 0.146 / 0.172 /
  0.006, for 1.45x the step time. The biggest single gain found: the
  detector finds the shapes (class-agnostic box AP 0.45 at 1000 steps) but
  confuses their classes, and the convs see their outlines.
- keypoint loss weight 0.05 (detectron2's default is 1): with 1 the
  3136-way heatmap softmax (loss ~5.5) dominates the shared backbone's
  gradient and box AP drops 13x (0.009 at 400 steps); 0.02-0.05 leave the
  other heads as they are without it.
- no gain from: box head FC of 256 after the convs (0.199 / 0.219 / 0.053
  against the 128's 0.224 / 0.240 / 0.082); against 0.214 / 0.232 / 0.056:
  GroupNorm in the box and mask heads (0.174 / 0.197 / 0.012),
  class-agnostic box regression (0.210 / 0.233 / 0.033), batch 4 for 1000
  steps (0.202 / 0.214 / 0.043); keypoint loss weight 0.15 (with 64 RoIs and
  box_scale 1.2: 0.201 / 0.220 / 0.071 against 0.05's 0.230 / 0.242 /
  0.085); and, with the 2fc head:
  BatchNorm for GroupNorm (0.140), lr 4e-3 (0.107) or 1e-3
  (0.134), 256 RoIs per image (0.143), FPN level assignment scaled to the
  canvas (canonical box 56: 0.137).
- against this config at 500 steps (0.248 / 0.258 / 0.134; median OKS of
  matched triangles 0.60): a deeper or wider keypoint head (4 convs: 0.238
  / 0.247 / 0.127, OKS 0.60; 64 channels: 0.227 / 0.241 / 0.118, OKS 0.61);
  and, for a shorter step, box head convs of 32 (14% faster: 0.204 / 0.218
  / 0.097) or 48 RoIs per image (8% faster: 0.216 / 0.232 / 0.099).
- at 1000 steps (the same cosine schedule, shortened; bbox / segm AP move
  by 0.02-0.03 with the seed alone: seed 1 gave 0.357 / 0.364 / 0.272
  against seed 0's 0.379 / 0.394 / 0.277): 6000 training images instead
  of 2000 lift keypoints to 0.316 (and 0.310 / 0.315 with the deeper
  keypoint heads below), but at 1700 steps they did not (a fresh-clone demo:
  0.527 / 0.540 / 0.390, and 943 s with the longer generation); keypoint
  loss weight 0.02: 0.375 / 0.387 / 0.273; a keypoint head of 4 convs of
  64: 0.415 / 0.426 / 0.340 with 2000 images (seed 1: 0.363 / 0.374 /
  0.303), but 0.376 / 0.387 / 0.315 with 6000 images and 4 keypoint RoIs
  per image, where 4 convs of 32 gave 0.377 / 0.387 / 0.310; at 1700 steps
  (a fresh-clone demo, keypoints ranked as below) 0.502 / 0.516 / 0.427 in
  1123 s: +0.012 keypoints for a step up to 40% longer. Not taken.
- ranking keypoint results by box score x mean keypoint score instead of
  box score (eval.keypoint_score): +0.008 to +0.016 keypoints AP on 7 of 9
  checkpoints (1000 and 1700 steps), +0.001 and -0.006 on the other two.
- test-time augmentation (model.test.flip and .scales; MaskRCNN.detect):
  the mask and keypoint heads averaged over the plain, mirrored, 1.5x and
  mirrored 1.5x views of each image, boxes from the plain view. On the
  1700-step demo checkpoint segm 0.545 -> 0.577 and keypoints 0.415 ->
  0.485; on two 1000-step checkpoints (seeds 0 / 1) keypoints 0.291 ->
  0.355 and 0.288 -> 0.350, segm +0.024 / +0.029. Evaluation (compile
  included) 15 s -> 29 s. Other views on the 1700-step checkpoint: mirrored
  only 0.455 (segm 0.555); with mirrors, scales (1.0, 1.25) / (1.0, 1.75) /
  (1.0, 2.0) / (1.0, 1.25, 1.5): 0.480 / 0.492 / 0.493 / 0.491 in 29-42 s;
  the views also voting on the boxes (test.augment_boxes, as detectron2's
  TTA merges them): bbox 0.520, keypoints 0.484 in 47 s. A larger canvas at
  evaluation instead (160 / 192 px) loses bbox AP (0.485 / 0.427), and
  views shifted by 1-3 px add nothing (0.474-0.486).
- at 1700 steps, evaluated with those views (against 0.523 / 0.577 /
  0.485): training scales 0.8-1.5 (from 0.8-1.25): 0.466 / 0.518 / 0.440;
  a box head of one conv (from two): 0.470 / 0.513 / 0.485 for a 15%
  shorter step, and at 2000 steps (the same time) 0.477 / 0.535 / 0.475;
  keypoint box_scale 1.6 (to reach more occluded corners): 0.507 / 0.555 /
  0.465. Seed noise: this config with seed 1 gave 0.475 / 0.519 / 0.468
  (keypoints 0.399 without the views), so the demo's seed-0 bbox AP has
  little margin.
- keypoint heatmap targets split over the 2 x 2 cells around each keypoint
  with bilinear weights (so the target's mean is the keypoint, not its
  cell's centre; tried on 2026-11-27, not kept): 0.480 / 0.527 / 0.456 at
  1700 steps with the views, against the one-hot targets' 0.523 / 0.577 /
  0.485 (seed 0) and 0.475 / 0.519 / 0.468 (seed 1).
- at 1700 steps with the views (2026-11-27, against 0.506 / 0.547 / 0.476
  for this config at today's code): AdamW lr 3e-3: 0.492 / 0.543 / 0.488;
  an exponential moving average of the weights (decay 0.995, evaluated on
  the same run): 0.500 / 0.543 / 0.470, as little use as expected when the
  cosine schedule ends near zero. Not taken.
- at 1700 steps with the views (2026-11-27, eleventh session, against the
  same 0.506 / 0.547 / 0.476; keypoints AP50 / AP75 0.702 / 0.517):
  the keypoint position loss (keypoint_head.position_loss_weight: the L1
  distance in heatmap cells between the "local_mean" decoding of the
  training heatmaps and the keypoints, as integral pose regression trains
  its soft-argmax, beside the cross-entropy; taken) with weight 1: 0.513 /
  0.563 / 0.497 (0.710 / 0.512), the step time unchanged; weight 1.5: 0.496
  / 0.541 / 0.467; weight 3: 0.411 /
  0.455 / 0.399 (its gradient swamps the shared backbone: loss_cls and
  loss_mask above the others' from step 300); weight 0.6 (twelfth
  session): 0.493 / 0.536 / 0.468; weight 1 counting only
  keypoints decoded within the decoding window of the truth (7 cells, a
  pure refinement loss): 0.513 / 0.563 / 0.477, so the gain comes from
  keypoints decoded off the truth's peak being pulled toward it. A fine
  branch in the keypoint head (the boxes pooled 28 x 28 from the stride-2
  stem, two 3x3 convs of 16, its logits added before the upsampling, the
  hope being that P2's stride 4 limits the precision): 0.523 / 0.572 /
  0.476 for a 35% longer step (0.57 s); not kept. With the position loss,
  views at scales (1.0, 1.5, 2.0) instead of (1.0, 1.5): keypoints 0.502,
  evaluation 35 s -> 43 s; taken in the twelfth session, once a held-out
  split (the generator with --val 400 --seed 7, never used to choose
  anything else) confirmed it: 0.536 / 0.583 / 0.535 -> 0.536 / 0.586 /
  0.543 (keypoints AP50 / AP75 0.724 / 0.579 -> 0.736 / 0.600). The same
  split shows how much the 200 validation images alone move AP: this
  checkpoint scores 0.04 more keypoints AP on it than on them.
- 1650 steps instead of 1700 (the same cosine schedule, shortened; ~22 s
  less, with the views at (1.0, 1.5, 2.0); twelfth session): 0.470 / 0.515
  / 0.453 against 0.513 / 0.564 / 0.502. The demo's numbers sit on a
  narrow ridge: 50 steps or a small change of recipe move AP by 0.02-0.05.
- keypoints are limited by where they are put, not by the detections:
  with the 1600-step checkpoint's predictions moved onto the ground truth,
  keypoint AP would be 0.83; with their errors halved, 0.54. The
  sub-pixel decoding ("local_mean") takes 0.339 to 0.375 there.
"""

import os

import ml_collections

from mrcnn_jax.modeling import build
from mrcnn_jax.optim import optim_config

CANVAS = 128
MAX_INSTANCES = 16  # the generator draws at most 8 objects + a crowd region
NUM_KEYPOINTS = 3  # triangle: apex, left_base, right_base


def get_config(arg=None):
  tiny = arg == "tiny"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.eval_batch_size = 16
  config.total_steps = 30 if tiny else 1900  # ~0.36 s each: the demo's 15 minutes

  config.data = ml_collections.ConfigDict({
      "train_dir": "data/shapes/tf/train", "eval_dir": "data/shapes/tf/val",
      "eval_annotations": "",  # default: what the converter kept (eval_dir/ground_truth.json)
      "canvas_size": (CANVAS, CANVAS), "max_instances": MAX_INSTANCES, "mask_size": 28,
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
  # 64 RoIs per image, up to half foreground (~20 per image here): the same
  # AP at 500 steps as 128 with up to a quarter (0.213 / 0.228 / 0.054 vs
  # 0.214 / 0.232 / 0.056) for a 28% shorter step; with a quarter, 64 RoIs
  # starved the classifier (half the box AP of 256 at 400 steps).
  model.roi.update(batch_size_per_image=64, positive_fraction=0.5, num_mask_rois=8,
                   num_keypoint_rois=8)
  if tiny:
    model.box_head.fc_dims = (32, 32)
  else:  # detectron2's conv head, narrow: see the docstring
    model.box_head.update(num_convs=2, conv_dim=64, fc_dims=(128,))
  model.mask_head.update(num_convs=2, conv_dim=32)
  # Heatmaps over boxes 1.4x the detection's: a triangle's corners lie on its
  # box (see the docstring).
  # Sub-pixel keypoints (a local soft-argmax, see modeling/keypoint_head.py):
  # on small triangles half a pixel is much of the OKS tolerance.
  model.keypoint_head.update(enabled=True, num_keypoints=NUM_KEYPOINTS, num_convs=2,
                             conv_dim=32, loss_weight=1.0 if tiny else 0.05, box_scale=1.4,
                             decode="local_mean", flip_map=(0, 2, 1),  # the base corners swap
                             position_loss_weight=1.0)  # trains the decoding: see the docstring
  # Masks and keypoints averaged over the plain, 1.5x and 2x views and their
  # mirrors (boxes from the plain view): see the docstring.
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
  # mean keypoint score (see evaluation/coco.py KEYPOINT_SCORES and the docstring).
  config.eval = ml_collections.ConfigDict({"oks_sigmas": (),
                                           "keypoint_score": "box_x_keypoints"})
  config.init_checkpoint = ""  # e.g. a converted torchvision checkpoint
  config.init_keep = "all"  # "all", "backbone" or "no_predictors"
  return config
