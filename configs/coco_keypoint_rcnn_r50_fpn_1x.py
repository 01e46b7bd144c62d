"""Keypoint R-CNN R50-FPN, the 1x schedule on COCO 2017 person keypoints.

    python -m mrcnn_jax.data.coco --images data/coco/train2017 \\
        --annotations data/coco/annotations/person_keypoints_train2017.json \\
        --output data/coco/tf/person_train2017
    python -m mrcnn_jax.data.coco --images data/coco/val2017 \\
        --annotations data/coco/annotations/person_keypoints_val2017.json \\
        --output data/coco/tf/person_val2017
    python -m mrcnn_jax.train --config=configs/coco_keypoint_rcnn_r50_fpn_1x.py \\
        --workdir=workdirs/kprcnn_r50_1x

detectron2's keypoint_rcnn_R_50_FPN_1x: one class (person), boxes and 17
keypoints (no mask head), the same schedule and optimiser as Mask R-CNN 1x.
The left/right flip map of training comes from the converted split's keypoint
names; the model's copy (for the flip test, ``--config.model.test.flip=True``,
off in the recipe) is the same map of COCO's names, checked against the data.
"""

from configs import coco_mask_rcnn_r50_fpn_1x as base
from mrcnn_jax.data.coco import flip_map
from mrcnn_jax.data.coco_names import COCO_KEYPOINT_NAMES


def get_config(arg=None):
  config = base.get_config(arg)
  config.data.train_dir = "data/coco/tf/person_train2017"
  config.data.eval_dir = "data/coco/tf/person_val2017"
  m = config.model
  m.num_classes = 1
  m.mask_head.enabled = False
  m.keypoint_head.update(enabled=True, num_keypoints=17,
                         flip_map=tuple(flip_map(COCO_KEYPOINT_NAMES)))
  config.train.best_metric = "keypoints/AP"
  return config
