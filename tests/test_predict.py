"""predict's file handling (picture names, never writing over an input, unreadable inputs)
and its preprocessing as data."""

import os

import numpy as np
import pytest

from mrcnn_jax import predict


def test_pictures_keep_names_apart_and_never_replace_an_input(tmp_path):
  inputs = [str(tmp_path / n) for n in ("a.jpg", "a.png", "b.jpg")]
  out = str(tmp_path / "out")
  assert predict.picture_paths(inputs, out) == [
      os.path.join(out, "a.jpg.png"), os.path.join(out, "a.png.png"), os.path.join(out, "b.png")]
  # --output = --input: b.png would replace the input b.png.
  inputs = [str(tmp_path / n) for n in ("a.jpg", "b.png")]
  with pytest.raises(ValueError, match="b.png would overwrite the input image"):
    predict.picture_paths(inputs, str(tmp_path))
  # The same directory is fine when no picture lands on an input.
  assert predict.picture_paths([str(tmp_path / "c.jpg")], str(tmp_path)) == [
      str(tmp_path / "c.png")]


def test_no_readable_input_is_an_error(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="none of the 1 input files could be read"):
    predict.predict_files(None, [str(bad)], str(tmp_path / "out"))


def test_preprocess_reads_its_settings_as_data():
  """The resize, normalisation and pad value come from a plain dict (an export's
  manifest holds the same), so the exported predictor's preprocessing is the live one."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  settings = predict.preprocessing_of(shapes.get_config("tiny"))
  mean, std = np.array(settings["mean"]), np.array(settings["std"])
  # Padding is 0 in normalised space, as the references pad.
  assert settings["pad_value"] == [0.0, 0.0, 0.0]
  rgb = np.full((20, 40, 3), 200, np.uint8)
  images, info = predict.preprocess(rgb, (32, 32), settings)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.float32
  np.testing.assert_array_equal(info["image_size"], [[16, 32]])  # scale 0.8 fits the width
  np.testing.assert_allclose(info["scale"], [[0.8, 0.8]])
  np.testing.assert_allclose(images[0, :16], np.broadcast_to((200 - mean) / std, (16, 32, 3)),
                             rtol=1e-5)
  assert np.all(images[0, 16:] == 0)
  # Another pad value (an older export's) is used as given; the image is unchanged.
  other = [-1.0, -2.0, -3.0]
  padded, _ = predict.preprocess(rgb, (32, 32), {**settings, "pad_value": other})
  np.testing.assert_array_equal(padded[0, 16:], np.broadcast_to(np.float32(other), (16, 32, 3)))
  np.testing.assert_array_equal(padded[0, :16], images[0, :16])
  # The resize rounding is the settings' (13 x 32 / 21 = 19.8: 20 rounded, 19 floored).
  odd = np.full((13, 21, 3), 200, np.uint8)
  sizes = [predict.preprocess(odd, (40, 32), {**settings, "resize": {
      **settings["resize"], "rounding": r}})[1]["image_size"].tolist() for r in ("round", "floor")]
  assert sizes == [[[20, 32]], [[19, 32]]], sizes
  with pytest.raises(ValueError, match="resize rounding 'nearest'"):
    predict.preprocess(rgb, (32, 32), {**settings, "resize": {**settings["resize"],
                                                               "rounding": "nearest"}})


@pytest.mark.parametrize("shape, canvas", [((30, 40), (64, 96)), ((40, 30), (96, 64))])
def test_results_map_back_to_original_pixels_from_either_canvas(shape, canvas):
  """A landscape and a portrait image go to their own canvas (scale 64 / 30 each); a detector
  that boxes the bright rectangle it sees in the canvas gives the rectangle's original
  pixels back, box and mask."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  config = shapes.get_config("tiny")
  config.data.update(canvas_size=(), canvas_sizes=((64, 96), (96, 64)))
  h, w = shape
  y1, x1, y2, x2 = 6, 10, h - 8, w - 5  # the rectangle, original pixels
  rgb = np.zeros((h, w, 3), np.uint8)
  rgb[y1:y2, x1:x2] = 255
  seen = []

  def detect(images, info):
    seen.append(images.shape)
    bright = images[0, ..., 0] > images[0, ..., 0].max() / 2
    ys, xs = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    box = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]  # canvas pixels
    return {"boxes": np.float32([[box]]), "scores": np.float32([[0.9]]),
            "classes": np.int32([[0]]), "valid": np.array([[True]]),
            "masks": np.ones((1, 1, 14, 14), np.float32)}

  predictor = predict.Predictor.__new__(predict.Predictor)
  predictor.score_threshold = 0.5
  predictor.canvases = [(64, 96), (96, 64)]
  predictor.preprocessing = predict.preprocessing_of(config)
  predictor.meta = {"coco_ids": [7], "names": ["r"], "keypoint_category_ids": []}
  predictor.names = {7: "r"}
  predictor.detect = detect
  out = predictor(rgb)
  assert seen == [(1, *canvas, 3)]
  np.testing.assert_allclose(out["boxes"], [[x1, y1, x2, y2]], atol=0.7)
  want = np.zeros((h, w), bool)
  want[y1:y2, x1:x2] = True
  assert out["masks"].shape == (1, h, w)
  assert (out["masks"][0] != want).sum() <= 2 * (x2 - x1 + y2 - y1)  # at most a 1-pixel rim
  assert out["category_ids"].tolist() == [7]
