"""Mask R-CNN R50-C4, the 1x schedule on COCO 2017 (detectron2's mask_rcnn_R_50_C4_1x).

    # data prepared as in configs/coco_mask_rcnn_r50_fpn_1x.py; weights/r50 from
    # python -m mrcnn_jax.convert --from=torchvision --arch=resnet50 (see below)
    python -m mrcnn_jax.train --config=configs/coco_mask_rcnn_r50_c4_1x.py:torchvision_backbone \\
        --workdir=workdirs/mrcnn_r50_c4_1x --config.init_checkpoint=weights/r50
    # detectron2's model-zoo model (box AP 36.8, mask AP 32.2 in its MODEL_ZOO.md):
    #   https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/
    #       mask_rcnn_R_50_C4_1x/137259246/model_final_9243eb.pkl
    python -m mrcnn_jax.convert --from=detectron2 --arch=mask_rcnn_R_50_C4 \\
        --input=model_final_9243eb.pkl --output=weights/d2_maskrcnn_r50_c4
    python -m mrcnn_jax.evaluate --config=configs/coco_mask_rcnn_r50_c4_1x.py \\
        --workdir=workdirs/d2_c4_eval --checkpoint=weights/d2_maskrcnn_r50_c4

The paper's C4 design (Mask R-CNN, fig. 4 left; detectron2's Base-RCNN-C4):
ResNet's res2..res4 are the backbone; the RPN (one level, 15 anchors per
position: sizes 32..512 x ratios 0.5, 1, 2; 12000 boxes before NMS and 2000
after in training, 6000 / 1000 at test) and RoIAlign (14 x 14, aligned,
adaptive sampling: ROIAlignV2 with sampling ratio 0) both read C4 at stride
16; res5 is the box head (its 7 x 7 output average-pooled for the
predictor); the mask head is a 2 x 2 deconv (256) and a 1 x 1 predictor on
res5's output, 14 x 14 masks. Schedule, optimiser, canvases and frozen BN
(stem and res2 frozen) are the FPN 1x config's.

The backbone is MSRA's ResNet as detectron2 uses it (the stride in each
downsampling block's first 1x1 conv; BGR input, mean-subtracted, std 1), so
converted detectron2 C4 models run as they are. ``:faster`` is
faster_rcnn_R_50_C4 (no mask head). ``:torchvision_backbone`` keeps
torchvision's ResNet layout (stride in the 3x3 conv, RGB, ImageNet
normalisation): the start for training from a torchvision ImageNet ResNet-50
converted with ``python -m mrcnn_jax.convert --from=torchvision
--arch=resnet50`` (``weights/r50`` above), as detectron2's own start, MSRA's
R-50.pkl, is in Caffe2 names that mrcnn_jax.convert does not read.
``init_keep="backbone"`` loads the checkpoint's stem and res2..res4; res5,
here the box head (``box_head/res5``), keeps its random initialisation
(detectron2 starts it from the ImageNet res5).
"""

from configs import coco_mask_rcnn_r50_fpn_1x as base
from mrcnn_jax.modeling import build

MSRA_MEAN_BGR = (103.53, 116.28, 123.675)  # detectron2's PIXEL_MEAN for MSRA backbones
# Adaptive RoIAlign is exact up to this many samples per bin and axis: a RoI
# across a whole 1024-pixel canvas is 64 cells of C4, ceil(64 / 14) = 5.
MAX_SAMPLES = 5


def get_config(arg=None):
  if arg not in (None, "mask", "faster", "torchvision_backbone"):
    raise ValueError("config arg: expected 'mask', 'faster' or 'torchvision_backbone', "
                     f"got {arg!r}")
  config = base.get_config()
  msra = arg != "torchvision_backbone"
  config.model = build.model_config(design="c4", num_classes=80)
  m = config.model
  m.backbone.stride_in_1x1 = msra
  m.rpn.update(pre_nms_topk_train=12000, post_nms_topk_train=2000, pre_nms_topk_test=6000,
               post_nms_topk_test=1000, nms_threshold=0.7)
  m.roi.update(aligned=True, sampling_ratio=0, max_sampling_ratio=MAX_SAMPLES)
  m.box_head.pooler_resolution = 14
  m.mask_head.update(enabled=arg != "faster", num_convs=0, conv_dim=256, pooler_resolution=14)
  if msra:
    config.data.update(mean=MSRA_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="bgr")
  if arg == "faster":
    config.train.best_metric = "bbox/AP"
  return config
