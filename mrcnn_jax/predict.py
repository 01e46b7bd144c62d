"""Prediction on image files or arrays: COCO results plus pictures.

    python -m mrcnn_jax.predict --config=configs/shapes.py --checkpoint=workdirs/shapes \\
        --input=IMAGE_OR_DIR --output=DIR [--score_threshold=0.5]
    python -m mrcnn_jax.predict --exported=EXPORT_DIR --input=... --output=... [...]

writes DIR/predictions.json (COCO results format, plus each image's
``file_name``) and DIR/<image name>.png with masks, boxes, class names,
scores and keypoints drawn. The same as a Python API:

    predictor = mrcnn_jax.Predictor(config, "workdirs/shapes")
    out = predictor(image)  # any [H, W], [H, W, 1|3|4] uint8/uint16/float array

From an exported model (``python -m mrcnn_jax.export``), with no config,
checkpoint or Flax module: the preprocessing and the result mapping read
their settings from its manifest, and the results are the live model's:

    python -m mrcnn_jax.predict --exported=DIR --input=IMAGE_OR_DIR --output=OUT
    predictor = mrcnn_jax.Predictor.from_exported(DIR)

Class names come from the training workdir's meta.json (or the eval split).
Any size and mode works: the image goes through the same resize, pad and
normalisation as evaluation (aspect kept, into the config's canvas that fits
it best, ``data.canvases``; one compiled program per canvas), and the
results come back in its own pixels. Grayscale is repeated to RGB, 16-bit is
scaled to 8-bit, alpha is dropped (as the dataset converter does); EXIF
orientation of files is applied.
"""

import collections
import functools
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import tensorflow as tf
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageOps, UnidentifiedImageError

from mrcnn_jax import artifact, checkpointing, storage
from mrcnn_jax.data import canvases as canvas_lib
from mrcnn_jax.data import coco as coco_data
from mrcnn_jax.data import input_pipeline, transforms
from mrcnn_jax.evaluation import coco as coco_eval
from mrcnn_jax.evaluation import draw as draw_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def to_rgb_array(image: np.ndarray) -> np.ndarray:
  """``[H, W]`` or ``[H, W, 1|3|4]`` of any numeric dtype -> ``[H, W, 3]`` uint8 RGB."""
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise ValueError(f"image: expected [H, W] or [H, W, 1|3|4], got shape {a.shape}")
  if min(a.shape[:2]) < 1:
    raise ValueError(f"image: empty, shape {a.shape}")
  if a.dtype == np.uint8:
    pass
  elif a.dtype == np.uint16:
    a = (a.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
  elif a.dtype == bool:
    a = a.astype(np.uint8) * 255
  elif np.issubdtype(a.dtype, np.floating):
    a = np.nan_to_num(a.astype(np.float64))
    a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
  elif np.issubdtype(a.dtype, np.integer):
    a = np.clip(a, 0, 255).astype(np.uint8)
  else:
    raise ValueError(f"image: unsupported dtype {a.dtype}")
  return np.asarray(coco_data.to_rgb(Image.fromarray(a)))


def read_image(path: str) -> np.ndarray:
  """An image file as ``[H, W, 3]`` uint8 RGB, EXIF orientation applied."""
  try:
    with storage.open_file(path, "rb") as f, Image.open(f) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(coco_data.to_rgb(im))
  except (UnidentifiedImageError, OSError, ValueError, tf.errors.OpError) as e:
    raise ValueError(f"{path}: cannot read image ({e})") from None


def preprocessing_of(config) -> Dict[str, Any]:
  """The host-side preprocessing of ``config`` as plain data (an export's manifest keeps it).

  ``resize``: the scale rule (``fit_scale``: fit the canvas, or shortest
  edge ``min_size`` capped by ``max_size``), the rounding of the resized
  size, bilinear without antialiasing; ``mean``/``std`` in the model's
  channel order, on 0..255 values; ``pad_value``: each channel's value,
  in normalised space, of the canvas outside the image.
  """
  d = config.data
  min_size, max_size, rounding = canvas_lib.resize_rule(config)
  return {
      "input": "RGB, 0..255 (uint8 after to_rgb_array)",
      "resize": {"rule": "shortest_edge" if min_size > 0 else "fit_canvas",
                 "min_size": min_size, "max_size": max_size, "rounding": rounding,
                 "interpolation": "bilinear", "antialias": False},
      "channel_order": d.get("channel_order", "rgb"),
      "mean": [float(v) for v in d.mean], "std": [float(v) for v in d.std],
      # 0 after normalisation, as torchvision and detectron2 pad (transforms.normalize).
      "pad_value": [0.0, 0.0, 0.0],
  }


def preprocess(rgb: np.ndarray, canvas, preprocessing: Dict[str, Any]):
  """``[H, W, 3]`` uint8 -> (normalised canvas [1, H', W', 3], image_info) as
  ``preprocessing`` (``preprocessing_of``'s dict, or an export's manifest) says."""
  p = preprocessing
  rounding = p["resize"]["rounding"]
  if rounding not in transforms.ROUNDINGS or p["channel_order"] not in ("rgb", "bgr"):
    raise ValueError(f"preprocessing: resize rounding {rounding!r}, channel order "
                     f"{p['channel_order']!r}: this mrcnn_jax knows {transforms.ROUNDINGS} and "
                     f"'rgb'/'bgr'")
  size = tf.constant(rgb.shape[:2], tf.int32)
  scale = transforms.fit_scale(size, canvas, p["resize"]["min_size"], p["resize"]["max_size"])
  image, image_size, scale_yx = transforms.place_image(
      tf.constant(rgb), canvas, scale, tf.zeros([2]), tf.constant(False), rounding)
  image = transforms.normalize(image, p["mean"], p["std"], p["channel_order"]).numpy()
  h, w = image_size.numpy()
  pad = np.asarray(p["pad_value"], np.float32)
  image[h:] = pad
  image[:, w:] = pad
  info = {"image_size": np.asarray([[h, w]], np.int32),
          "original_size": np.asarray(rgb.shape[:2], np.int32)[None],
          "scale": np.stack([v.numpy() for v in scale_yx])[None].astype(np.float32)}
  return image[None], info


class Predictor:
  """``image -> dict`` with a trained model; compiled once for each of the config's canvases.

  The dict holds, for detections scoring at least ``score_threshold``:
  ``boxes [N, 4]`` (x1, y1, x2, y2 in the image's pixels), ``scores [N]``,
  ``category_ids [N]`` (COCO ids), ``names``, and with the heads on
  ``masks [N, H, W]`` bool and ``keypoints [N, Kp, 3]`` (x, y, score);
  ``results`` is the same in COCO results format.

  ``Predictor.from_exported(DIR)`` gives the same from an exported model.
  """

  def __init__(self, config, checkpoint: str, score_threshold: float = 0.5,
               meta: Optional[Dict[str, Any]] = None):
    # Here, not at the top: from_exported needs no Flax module.
    from mrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
    self.config = config
    self.score_threshold = score_threshold
    self.canvases = canvas_lib.canvas_sizes(config)
    self.preprocessing = preprocessing_of(config)
    self.checkpoint = checkpoint = checkpointing.resolve(checkpoint)  # a missing one named first
    self.meta = meta or _find_meta(config, checkpoint)
    self.names = dict(zip(self.meta["coco_ids"], self.meta["names"]))
    build.check_dataset(config, self.meta, "the checkpoint's meta.json or the eval split")
    self.model = build.build_model(config)
    self.variables = jax.device_put(checkpointing.load_variables(checkpoint))
    jitted = jax.jit(functools.partial(self.model.apply, method="detect"))
    self.detect = lambda images, info: jax.device_get(jitted(self.variables, images, info))

  @classmethod
  def from_exported(cls, directory: str, score_threshold: float = 0.5) -> "Predictor":
    """A Predictor over an export directory (``artifact.load``; its errors are
    ``artifact.ArtifactError``): the same results as the live model it came from."""
    exported = artifact.load(directory)
    self = cls.__new__(cls)
    self.config = None
    self.score_threshold = score_threshold
    self.canvases = exported.canvases
    self.preprocessing = exported.manifest["preprocessing"]
    self.meta = exported.meta
    self.names = dict(zip(self.meta["coco_ids"], self.meta["names"]))
    self.detect = exported.detect
    return self

  def canvas_for(self, size) -> Tuple[int, int]:
    """The canvas an image of ``size`` (h, w) goes to (``data.canvases.choose``)."""
    r = self.preprocessing["resize"]
    return self.canvases[canvas_lib.choose(size, self.canvases, r["min_size"], r["max_size"],
                                           r["rounding"])]

  def preprocess(self, rgb: np.ndarray):
    """``[H, W, 3]`` uint8 -> (normalised canvas [1, H', W', 3], image_info)."""
    return preprocess(rgb, self.canvas_for(rgb.shape[:2]), self.preprocessing)

  def __call__(self, image: np.ndarray, image_id: int = 0) -> Dict[str, Any]:
    rgb = to_rgb_array(image)
    images, info = self.preprocess(rgb)
    dets = self.detect(images, info)
    one = {k: v[0] for k, v in dets.items()}
    sy, sx = info["scale"][0]
    results = coco_eval.image_results(one, info["scale"][0], info["original_size"][0],
                                      image_id, self.meta["coco_ids"],
                                      self.meta["keypoint_category_ids"],
                                      score_threshold=self.score_threshold)
    # Boxes, classes and masks are read back from the COCO results, so their
    # mapping to original pixels lives in one place (evaluation.coco.image_results).
    h, w = rgb.shape[:2]
    xywh = np.asarray([r["bbox"] for r in results], np.float64).reshape(-1, 4)
    out = {
        "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        "scores": np.asarray([r["score"] for r in results], np.float32),
        "category_ids": np.asarray([r["category_id"] for r in results], np.int64),
        "results": results,
    }
    out["names"] = [self.names[int(c)] for c in out["category_ids"]]
    if "masks" in one:
      out["masks"] = (np.stack([coco_eval.mask_utils.decode(r["segmentation"]) for r in results])
                      .astype(bool) if results else np.zeros((0, h, w), bool))
    if "keypoints" in one:  # continuous coordinates, every class (results keep COCO's)
      keep = np.flatnonzero(one["valid"] & (one["scores"] >= self.score_threshold))
      out["keypoints"] = one["keypoints"][keep].astype(np.float64) / np.array([sx, sy, 1.0])
    return out

  def draw(self, image: np.ndarray, results: List[dict], min_side: int = 512) -> np.ndarray:
    """``image`` with ``results`` drawn; small images enlarged to ``min_side`` (0: native)."""
    return draw_lib.draw(to_rgb_array(image), results, self.names,
                         skeleton=self.meta.get("skeleton", ()),
                         keypoint_category_ids=self.meta["keypoint_category_ids"],
                         min_side=min_side)


def _find_meta(config, checkpoint: str) -> Dict[str, Any]:
  """Class names and keypoint metadata: the training workdir's meta.json, else the eval split's."""
  path = storage.abspath(checkpoint)
  for _ in range(4):  # step dir -> checkpoints/ -> workdir
    candidate = storage.join(path, "meta.json")
    if storage.exists(candidate) and not storage.isdir(candidate):
      return storage.read_json(candidate)
    path = os.path.dirname(path.rstrip("/"))
  return input_pipeline.open_split(config, "eval").meta


def _inputs(path: str) -> List[str]:
  if storage.isdir(path):
    files = sorted(storage.join(path, f) for f in storage.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files
  if not storage.exists(path):
    raise ValueError(f"{path}: no such file or directory")
  return [path]


def picture_paths(paths: List[str], output: str) -> List[str]:
  """One picture per input in ``output``: ``name.png``, or ``name.ext.png`` where
  inputs share a name (a.jpg and a.png); refuses to write over an input file."""
  stems = collections.Counter(os.path.splitext(os.path.basename(p))[0] for p in paths)
  pictures = []
  for p in paths:
    base = os.path.basename(p)
    stem = os.path.splitext(base)[0]
    pictures.append(storage.join(output, (stem if stems[stem] == 1 else base) + ".png"))
  inputs = {os.path.realpath(p) for p in paths}
  for picture in pictures + [storage.join(output, "predictions.json")]:
    if os.path.realpath(picture) in inputs:
      raise ValueError(f"--output {output}: {os.path.basename(picture)} would overwrite the "
                       f"input image {picture}; choose another output directory")
  return pictures


def predict_files(predictor: Predictor, paths: List[str], output: str,
                  picture_min_side: int = 512) -> str:
  """Runs ``predictor`` on each file; writes pictures and predictions.json; returns its path.

  Pictures of images smaller than ``picture_min_side`` are enlarged to it
  (``Predictor.draw``); 0 draws at the image's own size.

  Unreadable files are skipped and counted; raises ValueError when none was read.
  """
  pictures = picture_paths(paths, output)
  storage.makedirs(output)
  everything, failed = [], 0
  for image_id, (path, picture) in enumerate(zip(paths, pictures), start=1):
    try:
      rgb = read_image(path)
    except ValueError as e:
      print(f"skipped: {e}", file=sys.stderr)
      failed += 1
      continue
    out = predictor(rgb, image_id=image_id)
    with storage.open_file(picture, "wb") as f:
      Image.fromarray(predictor.draw(rgb, out["results"], picture_min_side)).save(f, "PNG")
    for r in out["results"]:
      r["file_name"] = os.path.basename(path)
    everything += out["results"]
    print(f"{path}: {len(out['results'])} detections")
  if failed == len(paths):
    raise ValueError(f"none of the {len(paths)} input files could be read as an image")
  json_path = storage.join(output, "predictions.json")
  storage.write_json(json_path, everything)
  print(f"{len(paths) - failed} images, {len(everything)} detections -> {output}"
        + (f" ({failed} unreadable, skipped)" if failed else ""))
  return json_path


def _define_flags():
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                lock_config=True),
      "checkpoint": flags.DEFINE_string("checkpoint", None, "Checkpoint step dir, its "
                                        "parent, or a training workdir (latest step)."),
      "exported": flags.DEFINE_string("exported", None, "An export directory (python -m "
                                      "mrcnn_jax.export), instead of --config and --checkpoint."),
      "input": flags.DEFINE_string("input", None, "An image file or a directory of images."),
      "output": flags.DEFINE_string("output", None, "Directory for pictures and JSON."),
      "score_threshold": flags.DEFINE_float("score_threshold", 0.5,
                                            "Keep detections scoring at least this."),
      "picture_min_side": flags.DEFINE_integer(
          "picture_min_side", 512, "Pictures of smaller images are enlarged (whole-pixel "
          "zoom) until their longer side is at least this, so labels are legible; 0 draws "
          "at the image's native size."),
  }


def main(argv, args):
  del argv
  exported = args["exported"].value
  if exported and (args["config"].value is not None or args["checkpoint"].value is not None):
    raise app.UsageError("give --exported, or --config and --checkpoint, not both")
  for name in ("input", "output") + (() if exported else ("config", "checkpoint")):
    if args[name].value is None:
      raise app.UsageError(f"--{name} is required")
  checkpointing.quiet_orbax_logs()
  try:
    paths = _inputs(args["input"].value)
    if exported:
      predictor = Predictor.from_exported(exported, args["score_threshold"].value)
    else:
      predictor = Predictor(args["config"].value, args["checkpoint"].value,
                            args["score_threshold"].value)
    if args["picture_min_side"].value < 0:
      raise ValueError(f"--picture_min_side: expected >= 0, got {args['picture_min_side'].value}")
    predict_files(predictor, paths, args["output"].value, args["picture_min_side"].value)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  _args = _define_flags()
  app.run(functools.partial(main, args=_args))
