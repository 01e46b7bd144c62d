"""Pure TF example transforms: decode, resize/flip/jitter, pad (dict -> dict), on the
examples ``records.parse`` gives.

Every geometric step is one affine map from original image pixels to canvas
pixels, ``x' = sx * x + tx`` (with ``sx < 0`` after a horizontal flip), applied
alike to the image, boxes, masks and keypoints. Instance masks are stored as
PNG crops of each box's integer pixel window; the M x M target of a (possibly
clipped) box is read from that crop at the box's M x M cell centres, so no
full-image mask is ever decoded.

Coordinates are continuous (pixel centres at i + 0.5).
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

def keep_largest(ex: Dict[str, tf.Tensor], max_instances: int) -> Dict[str, tf.Tensor]:
  """Keeps the ``max_instances`` largest instances (by area); counts the rest in ``num_dropped``."""
  n = tf.shape(ex["classes"])[0]
  order = tf.argsort(ex["areas"], direction="DESCENDING", stable=True)[:max_instances]
  order = tf.sort(order)  # keep the file's order among the survivors
  out = dict(ex)
  for k in ("boxes", "classes", "is_crowd", "areas", "keypoints", "mask_png", "mask_window"):
    out[k] = tf.gather(ex[k], order)
  out["num_dropped"] = tf.maximum(n - max_instances, 0)
  return out


def decode_image(ex: Dict[str, tf.Tensor], channel_order: str = "rgb") -> Dict[str, tf.Tensor]:
  """Adds ``image`` [h, w, 3] uint8 (JPEG or PNG; grayscale expands to RGB).

  ``channel_order="bgr"`` reverses the channels here, where the image is
  small: every later step works per channel, so the batch is the same as
  normalize(..., "bgr") on the float canvas gives, at a fraction of the cost.
  """
  image = tf.io.decode_image(ex["encoded"], channels=3, expand_animations=False)
  if channel_order == "bgr":
    image = tf.reverse(image, [-1])
  elif channel_order != "rgb":
    raise ValueError(f"channel_order: expected 'rgb' or 'bgr', got {channel_order!r}")
  out = dict(ex)
  out["image"] = tf.ensure_shape(image, [None, None, 3])
  return out


def fit_scale(size: tf.Tensor, canvas: Tuple[int, int], min_size: float = 0,
              max_size: float = 0) -> tf.Tensor:
  """The scale (float64) for an image of ``size`` (h, w), aspect kept.

  By default the largest that fits the canvas. With ``min_size`` > 0 it is
  detectron2's ResizeShortestEdge / torchvision's GeneralizedRCNNTransform
  rule instead: shorter side to ``min_size`` unless the longer side would
  pass ``max_size`` (0: no limit), and never beyond the canvas (make the
  canvas at least ``max_size`` square, e.g. 1344 for 800/1333). Computed in
  float64, as both references compute it in Python floats: in float32,
  800 / 480 rounds down and 480 x it floors to 799.
  """
  size = tf.cast(size, tf.float64)
  scale = tf.minimum(canvas[0] / size[0], canvas[1] / size[1])
  if min_size > 0:
    scale = tf.minimum(scale, min_size / tf.reduce_min(size))
    if max_size > 0:
      scale = tf.minimum(scale, max_size / tf.reduce_max(size))
  return scale


# How a resized size becomes whole pixels: "round" half up (detectron2's
# ResizeShortestEdge: int(x + 0.5)), "floor" (torchvision: interpolate with
# recompute_scale_factor=True floors the output size).
ROUNDINGS = ("round", "floor")


def resized_size(size: tf.Tensor, scale: tf.Tensor, rounding: str = "round") -> tf.Tensor:
  """``size`` (h, w) times ``scale`` in whole pixels (float64, at least 1), per ``rounding``."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
  scaled = tf.cast(size, tf.float64) * tf.cast(scale, tf.float64)
  return tf.maximum(tf.floor(scaled + 0.5) if rounding == "round" else tf.floor(scaled), 1.0)


def random_geometry(size: tf.Tensor, canvas: Tuple[int, int], seed: tf.Tensor,
                    flip: bool, scale_range: Optional[Tuple[float, float]],
                    min_size: float = 0, max_size: float = 0, rounding: str = "round"):
  """Draws (scale, crop offset (y, x), flip) for one training image; stateless in ``seed``.

  ``scale_range`` (large-scale jitter, Ghiasi et al. 2021): the base scale
  (``fit_scale`` with ``min_size``/``max_size``) times a factor uniform in the
  range, then a random crop of the canvas where the image is larger.
  """
  seeds = tf.random.experimental.stateless_split(seed, 4)
  scale = fit_scale(size, canvas, min_size, max_size)
  if scale_range is not None:
    scale *= tf.cast(tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1]),
                     tf.float64)
  scaled = tf.cast(resized_size(size, scale, rounding), tf.float32)
  room = tf.maximum(scaled - tf.constant(canvas, tf.float32), 0.0)
  offset = tf.floor(room * tf.random.stateless_uniform([2], seeds[1]))
  do_flip = tf.random.stateless_uniform([], seeds[2]) < 0.5 if flip else tf.constant(False)
  return scale, offset, do_flip


def place_image(image: tf.Tensor, canvas: Tuple[int, int], scale: tf.Tensor,
                offset: tf.Tensor, flip: tf.Tensor, rounding: str = "round"):
  """Resizes ``image`` [h, w, 3] by ``scale``, flips, crops at ``offset`` (y, x), pads.

  The one place pixels are resampled, for training, evaluation and
  prediction alike. The resized size is whole pixels per ``rounding`` (see
  ``resized_size``). Returns (image [H, W, 3] float32 0..255 zero-padded to
  the canvas (``normalize`` with ``image_size`` makes the padding 0 in
  normalised space), (h, w) of the image inside the canvas, (sy, sx) the
  exact scale after rounding the resized size to whole pixels).
  """
  new_hw = tf.cast(resized_size(tf.shape(image)[:2], scale, rounding), tf.float32)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  sy, sx = new_hw[0] / hw[0], new_hw[1] / hw[1]
  oy, ox = tf.cast(offset[0], tf.int32), tf.cast(offset[1], tf.int32)
  # Float input: the same bits as resizing the uint8 image (the kernel reads
  # pixels as float either way), but TF's float path is ~1.5x faster.
  image = tf.image.resize(tf.cast(image, tf.float32), tf.cast(new_hw, tf.int32), "bilinear")
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  image = image[oy:oy + canvas[0], ox:ox + canvas[1]]
  visible_hw = tf.shape(image)[:2]
  image = tf.pad(image, [[0, canvas[0] - visible_hw[0]], [0, canvas[1] - visible_hw[1]], [0, 0]])
  return tf.ensure_shape(image, [canvas[0], canvas[1], 3]), visible_hw, (sy, sx)


def apply_geometry(ex: Dict[str, tf.Tensor], canvas: Tuple[int, int], scale: tf.Tensor,
                   offset: tf.Tensor, flip: tf.Tensor, mask_size: int,
                   keypoint_flip_map: Sequence[int], rounding: str = "round"
                   ) -> Dict[str, tf.Tensor]:
  """Resizes by ``scale``, crops at ``offset`` (y, x), flips; maps every target alike.

  Returns the example with ``image`` [H, W, 3] float32 (0..255, zero padded),
  ``image_size`` (h, w of the image inside the canvas), ``scale`` (sy, sx
  from original to canvas pixels), and boxes, keypoints and ``masks``
  [N, M, M] in canvas coordinates; ``valid`` marks instances still visible.
  """
  h0, w0 = tf.unstack(tf.cast(ex["original_size"], tf.float32))
  image, visible_hw, (sy, sx) = place_image(ex["image"], canvas, scale, offset, flip, rounding)
  oy, ox = offset[0], offset[1]
  vis_h, vis_w = tf.cast(visible_hw[0], tf.float32), tf.cast(visible_hw[1], tf.float32)

  # x' = ax * x + bx (ax < 0 when flipped), y' = sy * y - oy.
  ax = tf.where(flip, -sx, sx)
  bx = tf.where(flip, sx * w0, 0.0) - ox
  to_x = lambda x: ax * x + bx
  to_y = lambda y: sy * y - oy
  b = ex["boxes"]
  xa, xb = to_x(b[:, 0]), to_x(b[:, 2])
  boxes = tf.stack([tf.minimum(xa, xb), to_y(b[:, 1]), tf.maximum(xa, xb), to_y(b[:, 3])], 1)
  boxes = tf.stack([tf.clip_by_value(boxes[:, 0], 0.0, vis_w), tf.clip_by_value(boxes[:, 1], 0.0, vis_h),
                    tf.clip_by_value(boxes[:, 2], 0.0, vis_w), tf.clip_by_value(boxes[:, 3], 0.0, vis_h)], 1)
  valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

  # Back to original pixels: the part of each stored crop the clipped box covers.
  from_x = lambda x: (x - bx) / ax
  from_y = lambda y: (y + oy) / sy
  ua, ub = from_x(boxes[:, 0]), from_x(boxes[:, 2])
  source = tf.stack([from_y(boxes[:, 1]), tf.minimum(ua, ub), from_y(boxes[:, 3]),
                     tf.maximum(ua, ub)], 1)  # (N, 4) y1 x1 y2 x2, original pixels
  masks = _masks_from_crops(ex["mask_png"], ex["mask_window"], source, mask_size)
  masks = tf.cond(flip, lambda: masks[:, :, ::-1], lambda: masks)

  kp = ex["keypoints"]
  if kp.shape[1]:
    kx, ky = to_x(kp[..., 0]), to_y(kp[..., 1])
    kp = tf.stack([kx, ky, kp[..., 2]], -1)
    kp = tf.cond(flip, lambda: tf.gather(kp, list(keypoint_flip_map), axis=1), lambda: kp)
    inside = (kp[..., 0] >= 0) & (kp[..., 0] < vis_w) & (kp[..., 1] >= 0) & (kp[..., 1] < vis_h)
    kp = tf.where((inside & (kp[..., 2] > 0))[..., None], kp, 0.0)

  out = dict(ex)
  out.update(image=image, boxes=boxes, masks=masks, keypoints=kp,
             valid=valid, image_size=visible_hw, scale=tf.stack([sy, sx]))
  return out


def _masks_from_crops(pngs: tf.Tensor, windows: tf.Tensor, source: tf.Tensor,
                      size: int) -> tf.Tensor:
  """``[N, size, size]`` float masks: each crop sampled at its box's cell centres."""
  def one(args):
    png, window, box = args
    crop = tf.cast(tf.io.decode_png(png, channels=1), tf.float32) / 255.0  # (ch, cw, 1)
    # The mask is 0 outside its window: a one-pixel zero border makes every
    # cell centre (all lie inside the window) interpolate against it, where
    # crop_and_resize would otherwise extrapolate 0 for centres within half a
    # pixel of the window's edge and erase the mask's outer cells.
    crop = tf.pad(crop, [[1, 1], [1, 1], [0, 0]])
    wx, wy, ww, wh = tf.unstack(window + tf.constant([-1.0, -1.0, 2.0, 2.0]))
    y1, x1, y2, x2 = tf.unstack(box)
    # Cell centres of the box, as crop pixel indices (pixel centres at integers);
    # crop_and_resize samples from y1n*(H-1) to y2n*(H-1) inclusive.
    cy0 = y1 + 0.5 * (y2 - y1) / size - wy - 0.5
    cy1 = y2 - 0.5 * (y2 - y1) / size - wy - 0.5
    cx0 = x1 + 0.5 * (x2 - x1) / size - wx - 0.5
    cx1 = x2 - 0.5 * (x2 - x1) / size - wx - 0.5
    dh, dw = tf.maximum(wh - 1.0, 1.0), tf.maximum(ww - 1.0, 1.0)
    boxes = tf.stack([cy0 / dh, cx0 / dw, cy1 / dh, cx1 / dw])[None]
    return tf.image.crop_and_resize(crop[None], boxes, [0], [size, size],
                                    extrapolation_value=0.0)[0, :, :, 0]
  return tf.map_fn(one, (pngs, windows, source),
                   fn_output_signature=tf.TensorSpec([size, size], tf.float32))


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float],
              channel_order: str = "rgb", image_size: Optional[tf.Tensor] = None) -> tf.Tensor:
  """(image - mean) / std on 0..255 RGB input; ``channel_order="bgr"`` for detectron2 weights.

  With ``image_size`` (h, w of the image at the canvas's top left) everything
  outside it is 0 after normalisation: torchvision and detectron2 pad the
  normalised batch with zeros, so the padding reads as the mean colour, not
  as black (-2.1 in ImageNet units).
  """
  if channel_order == "bgr":
    image = tf.reverse(image, [-1])  # what image[..., ::-1] gives, ~6x faster on CPU
  elif channel_order != "rgb":
    raise ValueError(f"channel_order: expected 'rgb' or 'bgr', got {channel_order!r}")
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if image.shape.is_fully_defined():
    # Same-shape constants give the same bits as broadcasting the (3,) vectors,
    # ~6x faster: TF's CPU broadcast over a 3-wide last axis is slow, and this
    # op on the full canvas was the pipeline's largest cost.
    mean = np.broadcast_to(mean, image.shape.as_list())
    std = np.broadcast_to(std, image.shape.as_list())
  image = (image - tf.constant(mean)) / tf.constant(std)
  if image_size is not None:
    # A crop and a zero pad: two copies, cheaper than a broadcast select on CPU.
    h, w = image_size[0], image_size[1]
    full, static = tf.shape(image), image.shape
    image = tf.ensure_shape(
        tf.pad(image[:h, :w], [[0, full[0] - h], [0, full[1] - w], [0, 0]]), static)
  return image


def pad_instances(ex: Dict[str, tf.Tensor], max_instances: int) -> Dict[str, tf.Tensor]:
  """Pads every per-instance array to ``max_instances`` with ``gt_valid`` False."""
  def pad(x, value=0):
    n = tf.shape(x)[0]
    paddings = [[0, max_instances - n]] + [[0, 0]] * (len(x.shape) - 1)
    y = tf.pad(x, paddings, constant_values=value)
    return tf.ensure_shape(y, [max_instances] + x.shape[1:].as_list())
  return {
      "gt_boxes": pad(ex["boxes"]),
      "gt_classes": pad(ex["classes"]),
      "gt_valid": pad(ex["valid"], False),
      "gt_is_crowd": pad(ex["is_crowd"], False),
      "gt_masks": pad(ex["masks"]),
      "gt_keypoints": pad(ex["keypoints"]),
  }
