"""Cascade Mask R-CNN R50-FPN, the 1x schedule on COCO 2017 (detectron2's
Misc/cascade_mask_rcnn_R_50_FPN_1x: Cai & Vasconcelos 2018).

    # convert train2017 and val2017 as configs/coco_mask_rcnn_r50_fpn_1x.py says, then
    python -m mrcnn_jax.train --config=configs/cascade_mask_rcnn_r50_fpn_1x.py \\
        --workdir=workdirs/cascade_mrcnn_r50_1x

Everything as the Mask R-CNN 1x config, plus: three box stages at IoU 0.5 /
0.6 / 0.7 with box coder weights (10, 10, 5, 5), (20, 20, 10, 10), (30, 30,
15, 15), class-agnostic box regression, and 2000 proposals per image in
training (modeling/cascade.py). detectron2's model zoo reports 42.1 box /
36.4 mask AP for this recipe.

``:detectron2`` runs detectron2's model-zoo cascade models: the cascade on
configs/detectron2_mask_rcnn.py's settings (MSRA backbone, BGR input,
adaptive ROIAlignV2, detectron2's resize and anchors), e.g. its 3x model
(box AP 44.3, mask AP 38.5 in its MODEL_ZOO.md):

    #   https://dl.fbaipublicfiles.com/detectron2/Misc/
    #       cascade_mask_rcnn_R_50_FPN_3x/144998488/model_final_480dd8.pkl
    python -m mrcnn_jax.convert --from=detectron2 --arch=cascade_mask_rcnn_R_50_FPN \\
        --input=model_final_480dd8.pkl --output=weights/d2_cascade_mrcnn_r50
    python -m mrcnn_jax.predict --config=configs/cascade_mask_rcnn_r50_fpn_1x.py:detectron2 \\
        --checkpoint=weights/d2_cascade_mrcnn_r50 --input=IMAGES --output=out
"""

from configs import coco_mask_rcnn_r50_fpn_1x as base
from configs import detectron2_mask_rcnn
from mrcnn_jax.modeling import cascade


def get_config(arg=None):
  if arg not in (None, "detectron2"):
    raise ValueError(f"config arg: expected 'detectron2' or none, got {arg!r}")
  config = detectron2_mask_rcnn.get_config() if arg == "detectron2" else base.get_config()
  m = config.model
  m.box_head.class_agnostic = True
  m.rpn.post_nms_topk_train = 2000
  m.cascade.update(iou_thresholds=cascade.DETECTRON2_IOU_THRESHOLDS,
                   box_weights=cascade.DETECTRON2_BOX_WEIGHTS)
  return config
