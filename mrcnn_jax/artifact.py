"""An exported model: serialized ``jax.export`` programs and the manifest that explains them.

    DIR/manifest.json       platforms, input signature, canvases, preprocessing,
                            classes, keypoints, score/NMS settings, versions, source
    DIR/detect_HxW.jax      one serialized ``jax.export.Exported`` per canvas:
                            (images [B, H, W, 3] float32 normalised, image_size
                            [B, 2] int32) -> fixed-size detections, parameters
                            embedded as constants

``python -m mrcnn_jax.export`` writes it (``write``); ``load`` reads it back
with nothing else: no config, checkpoint or Flax module, only JAX and this
file (``mrcnn_jax.Predictor.from_exported`` adds the host-side preprocessing
and result mapping, which read their settings from the manifest).

Every problem with a directory (a missing or corrupted file, a manifest of an
unknown format version, a program this JAX cannot deserialize or run here, an
input of the wrong canvas, batch or dtype) raises ``ArtifactError``: one line
that names the file. Paths go through ``tf.io.gfile``, so DIR may be any URI
TensorFlow reaches (gs://...).
"""

import hashlib
import json
from typing import Any, Dict, List, Sequence, Tuple

import jax
import numpy as np
import tensorflow as tf

FORMAT_VERSION = 1  # of the manifest; bump when a reader of the old one would misread it
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
Canvas = Tuple[int, int]


class ArtifactError(ValueError):
  """An exported model directory that cannot be used; the message names the file."""


def program_file(canvas: Canvas) -> str:
  return f"detect_{canvas[0]}x{canvas[1]}.jax"


def _join(directory: str, name: str) -> str:
  return directory.rstrip("/") + "/" + name


def write(directory: str, manifest: Dict[str, Any], programs: Dict[Canvas, bytes]) -> str:
  """Writes each canvas's serialized program and the manifest (last, with the programs'
  sizes and sha256); returns the manifest's path."""
  tf.io.gfile.makedirs(directory)
  functions = []
  for canvas, blob in programs.items():
    name = program_file(canvas)
    with tf.io.gfile.GFile(_join(directory, name), "wb") as f:
      f.write(blob)
    functions.append({"canvas": list(canvas), "file": name, "bytes": len(blob),
                      "sha256": hashlib.sha256(blob).hexdigest()})
  manifest = {"format_version": FORMAT_VERSION, **manifest, "functions": functions}
  path = _join(directory, MANIFEST)
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump(manifest, f, indent=1)
  return path


def read_manifest(directory: str) -> Dict[str, Any]:
  """The manifest of ``directory``, checked for a format version and JAX this process reads."""
  path = _join(directory, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise ArtifactError(f"{path}: no such file (is {directory} a directory written by "
                        f"python -m mrcnn_jax.export?)")
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{path}: not a valid manifest ({_one_line(e)})") from None
  if not isinstance(manifest, dict):
    raise ArtifactError(f"{path}: not a valid manifest (a JSON object expected)")
  version = manifest.get("format_version")
  if manifest.get("project") != "mrcnn_jax":
    raise ArtifactError(f"{path}: not a manifest of mrcnn_jax (project "
                        f"{manifest.get('project')!r})")
  if version != FORMAT_VERSION:
    raise ArtifactError(f"{path}: format_version {version!r} is not one this mrcnn_jax reads "
                        f"({FORMAT_VERSION}); export the model again with this version")
  convention = manifest.get("calling_convention_version")
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  if not isinstance(convention, int) or not low <= convention <= high:
    raise ArtifactError(
        f"{path}: exported with jax {manifest.get('versions', {}).get('jax')} (calling "
        f"convention {convention!r}); this jax {jax.__version__} reads conventions "
        f"{low}..{high}; export it again or install a matching jax")
  missing = [k for k in ("functions", "platforms", "batch_size", "preprocessing", "classes")
             if k not in manifest]
  if missing or not manifest["functions"]:
    raise ArtifactError(f"{path}: not a valid manifest (missing "
                        f"{', '.join(missing) or 'functions'})")
  return manifest


def _one_line(e: Exception) -> str:
  lines = [s for s in str(e).splitlines() if s.strip()]
  return lines[0] if lines else type(e).__name__


def _running_platform() -> str:
  """This process's platform as jax.export names it ('gpu' -> cuda or rocm)."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = getattr(jax.devices()[0].client, "platform_version", "").lower()
  return "rocm" if "rocm" in version else "cuda"


class ExportedModel:
  """The deserialized programs of an export directory, one per canvas (``load``)."""

  def __init__(self, directory: str, manifest: Dict[str, Any],
               programs: Dict[Canvas, jax.export.Exported]):
    self.directory = directory
    self.manifest = manifest
    self.batch_size = int(manifest["batch_size"])
    self._programs = programs
    self._calls = {c: jax.jit(p.call) for c, p in programs.items()}

  @property
  def canvases(self) -> List[Canvas]:
    return list(self._programs)

  @property
  def meta(self) -> Dict[str, Any]:
    """Class and keypoint metadata in a training workdir's meta.json form."""
    c, k = self.manifest["classes"], self.manifest.get("keypoints", {})
    return {"coco_ids": c["coco_ids"], "names": c["names"],
            "keypoint_names": k.get("names", []), "keypoint_flip_map": k.get("flip_map", []),
            "skeleton": k.get("skeleton", []),
            "keypoint_category_ids": k.get("category_ids", [])}

  def _check(self, images: np.ndarray, image_size: np.ndarray) -> Canvas:
    where = _join(self.directory, MANIFEST)
    expected = (f"expected [N, H, W, 3] float32 with H x W one of the exported canvases "
                f"({', '.join(f'{h}x{w}' for h, w in self._programs)})")
    if images.dtype != np.float32 or images.ndim != 4 or images.shape[-1] != 3:
      raise ArtifactError(f"{where}: images {images.dtype} {list(images.shape)}: {expected}")
    canvas = tuple(images.shape[1:3])
    if canvas not in self._programs:
      raise ArtifactError(f"{where}: images of canvas {canvas[0]}x{canvas[1]}: {expected}")
    if image_size.shape != (images.shape[0], 2):
      raise ArtifactError(f"{where}: image_size {list(image_size.shape)}: expected "
                          f"[{images.shape[0]}, 2] (height, width of each image)")
    return canvas

  def detect(self, images: np.ndarray, image_info: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``images [N, H, W, 3]`` normalised float32 (any N) and ``image_info["image_size"]
    [N, 2]`` -> the model's fixed-size detections as host arrays, ``[N, ...]`` each.

    The exported batch size is fixed: N is split into batches of it, the last
    one filled with copies of its last image (dropped from the results).
    """
    images = np.asarray(images)
    image_size = np.asarray(image_info["image_size"]).astype(np.int32)
    canvas = self._check(images, image_size)
    b, n = self.batch_size, images.shape[0]
    outs = []
    for start in range(0, n, b):
      chunk, sizes = images[start:start + b], image_size[start:start + b]
      fill = b - chunk.shape[0]
      if fill:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fill, axis=0)])
        sizes = np.concatenate([sizes, np.repeat(sizes[-1:], fill, axis=0)])
      try:
        out = jax.device_get(self._calls[canvas](chunk, sizes))
      except Exception as e:  # pylint: disable=broad-except  # e.g. StableHLO too new to compile
        raise ArtifactError(f"{_join(self.directory, program_file(canvas))}: cannot run with "
                            f"jax {jax.__version__} on {_running_platform()} "
                            f"({_one_line(e)})") from e
      outs.append({k: v[:b - fill] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def load(directory: str) -> ExportedModel:
  """Reads and checks an export directory (see the module docstring for the errors)."""
  manifest = read_manifest(directory)
  platform = _running_platform()
  if platform not in manifest["platforms"]:
    raise ArtifactError(f"{_join(directory, MANIFEST)}: exported for "
                        f"{', '.join(manifest['platforms'])}; this process runs on {platform} "
                        f"(export again with --platforms={platform})")
  programs = {}
  for entry in manifest["functions"]:
    path = _join(directory, entry["file"])
    if not tf.io.gfile.exists(path):
      raise ArtifactError(f"{path}: no such file (listed in {MANIFEST})")
    with tf.io.gfile.GFile(path, "rb") as f:
      blob = f.read()
    if hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
      raise ArtifactError(f"{path}: corrupted ({len(blob)} bytes whose sha256 differs from "
                          f"the one {MANIFEST} records)")
    try:
      program = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # pylint: disable=broad-except  # flatbuffer/MLIR errors vary
      raise ArtifactError(f"{path}: cannot be deserialized by jax {jax.__version__} "
                          f"({_one_line(e)})") from None
    programs[tuple(entry["canvas"])] = program
  return ExportedModel(directory, manifest, programs)


def describe_avals(names: Sequence[str], avals) -> List[Dict[str, Any]]:
  """``[{"name", "shape", "dtype"}]`` of a program's inputs or outputs (for the manifest)."""
  return [{"name": n, "shape": [int(d) for d in a.shape], "dtype": str(a.dtype)}
          for n, a in zip(names, avals)]
