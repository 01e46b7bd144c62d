"""torchvision's Mask R-CNN / Keypoint R-CNN / Faster R-CNN R50-FPN, with its inference settings.

    # on a machine with internet, torchvision's COCO weights:
    #   https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
    #   https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth
    #   https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth
    python -m mrcnn_jax.convert --from=torchvision --arch=maskrcnn_resnet50_fpn \\
        --input=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --output=weights/tv_maskrcnn_r50
    python -m mrcnn_jax.predict --config=configs/torchvision_mask_rcnn.py \\
        --checkpoint=weights/tv_maskrcnn_r50 --input=IMAGES --output=out
    python -m mrcnn_jax.evaluate --config=configs/torchvision_mask_rcnn.py \\
        --workdir=workdirs/tv_eval --checkpoint=weights/tv_maskrcnn_r50

``:keypoint`` is keypointrcnn_resnet50_fpn (person + 17 keypoints, no mask),
``:faster`` is fasterrcnn_resnet50_fpn (boxes only).

What matches torchvision: RGB input normalised with ImageNet statistics;
the shorter side resized to 800 with the longer at most 1333, the size
floored (GeneralizedRCNNTransform), placed in an 832 x 1344 canvas, or
1344 x 832 for a portrait image (800 and 1333 rounded up to 32), whose
padding is 0 after normalisation and masked at every convolution, so each
image is seen as torchvision sees it alone, padded to a multiple of 32;
frozen BN; anchors 32..512 with ratios 0.5/1/2, rounded, at
the stride torchvision derives per image (padded size // grid: 61 on P6 of an
800-pixel image); RPN 1000 boxes per level before NMS and 1000 after at test
(2000/2000 in training), NMS 0.7, minimum size 1e-3; RoIAlign with
aligned=False and sampling ratio 2, levels by FPN eq. 1 (canonical 224 at
level 4); box score threshold 0.05, NMS 0.5, boxes under 1e-2 dropped, 100
detections; keypoint heads at 14 x 14 -> 56 x 56 heatmaps.
What differs: masks are pasted as detectron2 pastes them (evaluation/coco.py);
keypoints are decoded from the same bicubic interpolant on a static grid
(modeling/keypoint_head.py). tests/parity/ measures both, at 800 x 1216.
"""

from configs import coco_keypoint_rcnn_r50_fpn_1x
from configs import coco_mask_rcnn_r50_fpn_1x

# (h, w): 800 and 1333 rounded up to multiples of 32, landscape and portrait; an
# image at the 800/1333 scale always fits one of them.
CANVASES = ((832, 1344), (1344, 832))
MIN_SIZE, MAX_SIZE = 800, 1333
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision's (0.485, 0.456, 0.406) x 255
IMAGENET_STD = (58.395, 57.12, 57.375)  # (0.229, 0.224, 0.225) x 255


def get_config(arg=None):
  if arg not in (None, "mask", "keypoint", "faster"):
    raise ValueError(f"config arg: expected 'mask', 'keypoint' or 'faster', got {arg!r}")
  base = coco_keypoint_rcnn_r50_fpn_1x if arg == "keypoint" else coco_mask_rcnn_r50_fpn_1x
  config = base.get_config()
  config.data.update(canvas_size=(), canvas_sizes=CANVASES, min_size=MIN_SIZE, max_size=MAX_SIZE,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, channel_order="rgb",
                     resize_rounding="floor")
  m = config.model
  m.update(anchor_layout="torchvision", size_divisibility=32)
  m.mask_head.enabled = arg in (None, "mask")
  m.rpn.update(pre_nms_topk_train=2000, post_nms_topk_train=2000, pre_nms_topk_test=1000,
               post_nms_topk_test=1000, nms_threshold=0.7, min_size=1e-3)
  m.roi.update(aligned=False, sampling_ratio=2, canonical_box_size=224.0)
  m.test.update(score_threshold=0.05, nms_threshold=0.5, detections_per_image=100,
                min_box_size=1e-2)
  config.init_keep = "all"
  return config
