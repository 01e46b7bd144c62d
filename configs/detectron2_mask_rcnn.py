"""detectron2's Mask R-CNN / Keypoint R-CNN R50-FPN model-zoo models, with their inference settings.

    # on a machine with internet, from detectron2's MODEL_ZOO.md, e.g.
    #   https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/
    #       mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl
    #   https://dl.fbaipublicfiles.com/detectron2/COCO-Keypoints/
    #       keypoint_rcnn_R_50_FPN_3x/137849621/model_final_a6e10b.pkl
    python -m mrcnn_jax.convert --from=detectron2 --arch=mask_rcnn_R_50_FPN \\
        --input=model_final_f10217.pkl --output=weights/d2_maskrcnn_r50
    python -m mrcnn_jax.predict --config=configs/detectron2_mask_rcnn.py \\
        --checkpoint=weights/d2_maskrcnn_r50 --input=IMAGES --output=out

``:keypoint`` is keypoint_rcnn_R_50_FPN (person + 17 keypoints, no mask),
``:faster`` is faster_rcnn_R_50_FPN. ``:torchvision_backbone`` keeps
torchvision's ResNet layout (stride in the 3x3 conv, RGB, ImageNet
normalisation) for detectron2-format files built from torchvision weights.

What matches detectron2: the model-zoo backbones are MSRA's ResNets, so the
stride sits in each block's 1x1 conv and the input is BGR, mean-subtracted
(103.53, 116.28, 123.675) with std 1; shorter side 800, longer at most 1333,
the size rounded half up (ResizeShortestEdge), in an 832 x 1344 or (portrait)
1344 x 832 canvas whose padding is 0 after normalisation and masked at every
convolution (each image seen as padded to a multiple of 32 alone); frozen BN;
anchors at the nominal strides, not rounded; RPN 1000 per level before NMS and 1000 after at test
(2000/1000 in training), NMS 0.7; ROIAlignV2 (aligned=True) with adaptive
sampling (sampling_ratio=0: ceil(RoI size / output size) samples per bin);
box score threshold 0.05, NMS 0.5, 100 detections.
What differs: adaptive sampling is exact up to MAX_SAMPLES samples per bin
and axis (RoIs up to 6 x 7 = 42 cells long on their level for the box head,
84 for the mask head: any square RoI of a 1333-pixel image); longer ones
average MAX_SAMPLES evenly spaced samples per bin. Pooling costs what a fixed
ratio of MAX_SAMPLES costs. detectron2 resizes uint8 images with PIL's
bilinear filter, which antialiases when shrinking; ours does not (sizes are
the same, pixels differ where an image is shrunk).
"""

from configs import torchvision_mask_rcnn

MSRA_MEAN_BGR = (103.53, 116.28, 123.675)  # detectron2's PIXEL_MEAN for MSRA backbones
MAX_SAMPLES = 6  # adaptive RoIAlign's grid: exact for ceil(1333 / 32 / 7) = 6


def get_config(arg=None):
  if arg not in (None, "mask", "keypoint", "faster", "torchvision_backbone"):
    raise ValueError("config arg: expected 'mask', 'keypoint', 'faster' or "
                     f"'torchvision_backbone', got {arg!r}")
  config = torchvision_mask_rcnn.get_config(None if arg == "torchvision_backbone" else arg)
  m = config.model
  m.rpn.update(post_nms_topk_train=1000, min_size=0.0)
  m.roi.update(aligned=True, sampling_ratio=0, max_sampling_ratio=MAX_SAMPLES)
  m.update(anchor_layout="detectron2", size_divisibility=32)
  m.test.min_box_size = 0.0
  config.data.resize_rounding = "round"
  if arg != "torchvision_backbone":
    config.data.update(mean=MSRA_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="bgr")
    m.backbone.stride_in_1x1 = True
  return config
