"""Export: a trained model as a serialized ``jax.export`` program for CPU, GPU and TPU.

    python -m mrcnn_jax.export --config=configs/shapes.py --checkpoint=workdirs/shapes \\
        --output=DIR [--platforms=cpu,cuda,tpu] [--batch_size=1] [--dtype=float32|bfloat16]

writes DIR/manifest.json and one DIR/detect_HxW.jax for each of the config's
canvases (``config.data.canvas_sizes``; see ``mrcnn_jax.artifact``): the
whole of ``MaskRCNN.detect`` with the checkpoint's parameters embedded as
constants, lowered once for every platform asked for (lowering for GPU and
TPU needs no accelerator), taking a fixed batch of normalised canvases and their image sizes and returning the
fixed-size detections, masks and keypoints. The batch size is fixed, not
symbolic: the model's shape-dependent choices (conv.py's ``MIN_MACS``,
RoIAlign's chunking) need a known batch. Config overrides work as in
train, evaluate and predict (``--config.model.test.flip=False``).
``python -m mrcnn_jax.predict --exported=DIR`` runs it with nothing else.

Platform-specific formulations (conv.py's 1x1-as-matmul, RoIAlign's
chunking) are ``lax.platform_dependent``, so each platform's program is its
own form, chosen when XLA compiles it for the device.
"""

import copy
import datetime
import functools
import importlib.metadata
import sys
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
from absl import app, flags
from ml_collections import config_flags

import mrcnn_jax
from mrcnn_jax import artifact, checkpointing, predict

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAMES = ("images", "image_size")
# What each input and output holds, for the manifest (MaskRCNN.detect's contract).
MEANING = {
    "images": "the canvases: each image resized and normalised as 'preprocessing' says, "
              "top-left aligned, the rest pad_value",
    "image_size": "(height, width) of each image inside its canvas, pixels",
    "boxes": "x1, y1, x2, y2 in canvas pixels; original = canvas / scale (sx, sy)",
    "scores": "class probability of each detection",
    "classes": "contiguous class index i: classes.coco_ids[i], classes.names[i]",
    "valid": "which of the fixed detection slots hold a detection",
    "masks": "mask probabilities over each box (S x S), to paste into the box",
    "keypoints": "x, y, score per keypoint; canvas pixels, continuous coordinates "
                 "(COCO's integer convention: original - 0.5)",
}


def export(config, checkpoint: str, output: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
           batch_size: int = 1, dtype: Optional[str] = None,
           meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Exports ``checkpoint`` (as ``config`` builds it) to ``output``; returns the manifest.

  ``dtype`` overrides ``config.model.dtype`` (the compute dtype; inputs and
  outputs stay float32). ``meta`` as for ``Predictor`` (default: the
  checkpoint's meta.json, else the eval split's).
  """
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in artifact.PLATFORMS]
  if not platforms or unknown or len(set(platforms)) != len(platforms):
    raise ValueError(f"platforms: expected distinct names among {artifact.PLATFORMS}, "
                     f"got {platforms}")
  if batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
  config = copy.deepcopy(config)
  if dtype is not None:
    config.model.dtype = dtype
  live = predict.Predictor(config, checkpoint, meta=meta)  # the same checks as predict's
  model, variables = live.model, live.variables

  def detect(images, image_size):
    # ``variables`` are closed over: constants in the program, which needs no other file.
    return model.apply(variables, images, {"image_size": image_size}, method="detect")

  programs, signature = {}, None
  for canvas in live.canvases:
    args = (jax.ShapeDtypeStruct((batch_size, *canvas, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, 2), jnp.int32))
    exported = jax.export.export(jax.jit(detect), platforms=platforms)(*args)
    programs[canvas] = exported.serialize()
    if signature is not None:
      continue
    outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    signature = {"inputs": artifact.describe_avals(INPUT_NAMES, args),
                 "outputs": artifact.describe_avals(sorted(outputs),
                                                    [outputs[k] for k in sorted(outputs)])}
    for entry in signature["inputs"] + signature["outputs"]:
      entry["meaning"] = MEANING[entry["name"]]
  m, meta = config.model, live.meta
  manifest = {
      "project": "mrcnn_jax",
      "platforms": list(platforms),
      "calling_convention_version": exported.calling_convention_version,
      "batch_size": batch_size,  # fixed; Predictor.from_exported fills a short batch
      # Each image goes to the canvas that fits it best (mrcnn_jax.data.canvases.choose,
      # with preprocessing.resize); shapes below are the first canvas's, another
      # changes only H and W.
      "canvases": [list(c) for c in programs],
      "signature": signature,
      "compute_dtype": m.dtype,
      "parameters": "embedded",  # constants inside each program
      "preprocessing": live.preprocessing,
      "classes": {"names": list(meta["names"]), "coco_ids": [int(c) for c in meta["coco_ids"]]},
      "keypoints": {"names": list(meta.get("keypoint_names") or []),
                    "flip_map": [int(i) for i in meta.get("keypoint_flip_map") or []],
                    "skeleton": [list(p) for p in meta.get("skeleton") or []],
                    "category_ids": [int(c) for c in meta.get("keypoint_category_ids") or []]},
      "postprocess": {  # inside the program, except the host-side mask threshold
          "score_threshold": m.test.score_threshold, "nms_threshold": m.test.nms_threshold,
          "detections_per_image": m.test.detections_per_image,
          "max_candidates": m.test.max_candidates, "test_flip": m.test.flip,
          "test_scales": [float(s) for s in m.test.scales],
          "test_augment_boxes": m.test.augment_boxes, "mask_threshold": 0.5,
          "keypoint_decode": m.keypoint_head.decode,
      },
      "versions": {"mrcnn_jax": mrcnn_jax.__version__, "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "flax": importlib.metadata.version("flax")},
      "source": {"checkpoint": live.checkpoint,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds")},
      "config": config.to_dict(),
  }
  artifact.write(output, manifest, programs)
  return artifact.read_manifest(output)


def _define_flags():
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                lock_config=True),
      "checkpoint": flags.DEFINE_string("checkpoint", None, "Checkpoint step dir, its "
                                        "parent, or a training workdir (latest step)."),
      "output": flags.DEFINE_string("output", None, "Directory for the exported model."),
      "platforms": flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                                     f"Platforms to lower for, among {artifact.PLATFORMS}."),
      "batch_size": flags.DEFINE_integer("batch_size", 1, "Images per call (fixed)."),
      "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                                 "Compute dtype (default: the config's model.dtype)."),
  }


def main(argv, args):
  del argv
  for name in ("config", "checkpoint", "output"):
    if args[name].value is None:
      raise app.UsageError(f"--{name} is required")
  checkpointing.quiet_orbax_logs()
  try:
    manifest = export(args["config"].value, args["checkpoint"].value, args["output"].value,
                      args["platforms"].value, args["batch_size"].value, args["dtype"].value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{f['file']} {f['bytes'] / 1e6:.1f} MB" for f in manifest["functions"])
  print(f"exported for {', '.join(manifest['platforms'])}, batch {manifest['batch_size']}: "
        f"{sizes} -> {args['output'].value}")
  return 0


if __name__ == "__main__":
  _args = _define_flags()
  app.run(functools.partial(main, args=_args))
