"""Cascade Mask R-CNN R50-FPN, the 1x schedule on COCO 2017 (detectron2's
Misc/cascade_mask_rcnn_R_50_FPN_1x: Cai & Vasconcelos 2018).

    # convert train2017 and val2017 as configs/coco_mask_rcnn_r50_fpn_1x.py says, then
    python -m mrcnn_jax.train --config=configs/cascade_mask_rcnn_r50_fpn_1x.py \\
        --workdir=workdirs/cascade_mrcnn_r50_1x

Everything as the Mask R-CNN 1x config, plus: three box stages at IoU 0.5 /
0.6 / 0.7 with box coder weights (10, 10, 5, 5), (20, 20, 10, 10), (30, 30,
15, 15), class-agnostic box regression, and 2000 proposals per image in
training (modeling/cascade.py). detectron2's model zoo reports 42.1 box /
36.4 mask AP for this recipe. Converted detectron2 weights:

    python -m mrcnn_jax.convert --from=detectron2 --arch=cascade_mask_rcnn_R_50_FPN \\
        --input=model_final.pkl --output=weights/d2_cascade_mrcnn_r50
"""

from configs import coco_mask_rcnn_r50_fpn_1x as base


def get_config(arg=None):
  config = base.get_config(arg)
  m = config.model
  m.box_head.class_agnostic = True
  m.rpn.post_nms_topk_train = 2000
  m.cascade.update(iou_thresholds=(0.6, 0.7),
                   box_weights=((20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)))
  return config
