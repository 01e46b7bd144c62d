"""predict's file handling: picture names, never writing over an input, unreadable inputs."""

import os

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
