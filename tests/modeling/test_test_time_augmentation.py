"""Test-time augmentation (model.test.flip / scales / augment_boxes): views and their use.

The views are checked against images mirrored and boxes mapped by hand, and
against a linear ramp (which bilinear resampling must reproduce); the heads of
a mirrored view against the plain heads run on the hand-mirrored image.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import build
from mrcnn_jax.modeling import views as view_lib
from tests.modeling.conftest import make_batch, tiny_config

KEY = jax.random.PRNGKey(0)
FLIP_MAP = (0, 2, 1)  # the triangle's apex stays, its base corners swap


def tta_config(**test):
  cfg = tiny_config()
  cfg.keypoint_head.flip_map = FLIP_MAP
  cfg.test.update(test)
  return cfg


def mirror_by_hand(images, widths):
  """Each image of ``images [B, H, W, C]`` reversed within its width, padding left as is."""
  out = np.asarray(images).copy()
  for b, width in enumerate(widths):
    out[b, :, :width] = out[b, :, width - 1::-1]
  return jnp.asarray(out)


@pytest.fixture(scope="module")
def setup():
  """(plain model, params, a batch whose second image is 100 px wide in the 128 canvas)."""
  model = build.build_model(tta_config())
  images, _, _ = make_batch(np.random.default_rng(5), [3, 2], classes=[2, 0, 1])
  info = {"image_size": jnp.asarray([[128, 128], [128, 100]], jnp.int32)}
  images = images.at[1, :, 100:].set(0.0)  # the canvas padding right of the image
  params = jax.jit(lambda k: model.init(k, images, method="initialize"))(KEY)["params"]
  return model, params, images, info


def test_mirrored_view_reverses_each_image_within_its_width():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  size = jnp.asarray([[8, 12], [8, 7]], jnp.int32)
  out, out_size, view = view_lib.view_images(jnp.asarray(images), size, 1.0, True)
  want = images.copy()
  want[0] = images[0, :, ::-1]
  want[1, :, :7] = images[1, :, 6::-1]  # columns 7.. are padding and stay
  np.testing.assert_array_equal(np.asarray(out), want)
  np.testing.assert_array_equal(np.asarray(out_size), [[8, 12], [8, 7]])
  boxes = jnp.asarray([[[1.0, 2.0, 5.0, 6.0]], [[0.5, 1.0, 3.0, 4.0]]])
  np.testing.assert_allclose(np.asarray(view.to_view(boxes)),
                             [[[7.0, 2.0, 11.0, 6.0]], [[4.0, 1.0, 6.5, 4.0]]])
  np.testing.assert_allclose(np.asarray(view.from_view(view.to_view(boxes))), boxes)


def test_scaled_view_resamples_bilinearly_and_pads_to_the_stride():
  """A ramp of pixel-centre x coordinates stays a ramp: pixel j of a view at scale s holds
  (j + 0.5) / s away from the clamped borders; the canvas is padded to a multiple of 32."""
  h, w = 40, 64
  ramp = np.broadcast_to((np.arange(w) + 0.5)[None, :, None], (1, h, w, 3)).astype(np.float32)
  out, out_size, view = view_lib.view_images(jnp.asarray(ramp), jnp.asarray([[40, 50]]), 1.25,
                                           False)
  assert out.shape == (1, 64, 96, 3)  # 50 x 80, padded up to multiples of 32
  j = np.arange(2, 78)
  np.testing.assert_allclose(np.asarray(out)[0, 10, j, 0], (j + 0.5) / 1.25, rtol=1e-6)
  assert np.all(np.asarray(out)[0, 50:] == 0) and np.all(np.asarray(out)[0, :, 80:] == 0)
  np.testing.assert_allclose(np.asarray(out_size), [[50.0, 62.5]])
  boxes = jnp.asarray([[[4.0, 8.0, 20.0, 16.0]]])
  np.testing.assert_allclose(np.asarray(view.to_view(boxes)), [[[5.0, 10.0, 25.0, 20.0]]])
  _, _, mirrored = view_lib.view_images(jnp.asarray(ramp), jnp.asarray([[40, 50]]), 1.25, True)
  # Scaled, then mirrored about the scaled width rounded to whole pixels (62.5 -> 62).
  np.testing.assert_allclose(np.asarray(mirrored.to_view(boxes)), [[[37.0, 10.0, 57.0, 20.0]]])
  np.testing.assert_allclose(np.asarray(mirrored.from_view(mirrored.to_view(boxes))), boxes,
                             rtol=1e-6)


def test_mirrored_view_heads_equal_the_heads_on_the_mirrored_image(setup):
  """The mask and keypoint heads of the flip view, mapped back, are the plain heads run on
  the image mirrored by hand at the boxes mirrored by hand, then mirrored back (masks
  reversed along x, heatmaps too with each base corner's map taken from the other)."""
  model, params, images, info = setup
  boxes = jnp.asarray([[[10.0, 20.0, 50.0, 60.0], [70.0, 5.0, 120.0, 40.0]],
                       [[3.0, 30.0, 40.0, 90.0], [60.0, 64.0, 99.0, 120.0]]])
  classes = jnp.asarray([[2, 0], [1, 2]], jnp.int32)

  def flip_view(module, images, size):
    view_images, view_size, view = view_lib.view_images(images, size, 1.0, True)
    features = module.features(view_images, view_size, train=False)[2]
    return module._views_heads([(features, view)], boxes, classes, jnp.ones(classes.shape, bool))

  def plain(module, images, boxes):
    features = module.features(images, info["image_size"], train=False)[2]
    return module.roi_heads.detection_heads(features, boxes, classes, jnp.ones(classes.shape, bool))

  masks, heatmaps = jax.jit(lambda p: model.apply({"params": p}, images, info["image_size"],
                                                  method=flip_view))(params)
  mirrored = mirror_by_hand(images, np.asarray(info["image_size"])[:, 1])
  x1, y1, x2, y2 = np.moveaxis(np.asarray(boxes), -1, 0)
  width = np.asarray(info["image_size"])[:, 1:2].astype(np.float32)
  mirrored_boxes = np.stack([width - x2, y1, width - x1, y2], axis=-1)
  want_masks, want_heatmaps = jax.jit(lambda p: model.apply(
      {"params": p}, mirrored, jnp.asarray(mirrored_boxes), method=plain))(params)
  np.testing.assert_allclose(np.asarray(masks), np.asarray(want_masks)[..., ::-1], atol=1e-5)
  want_heatmaps = np.asarray(want_heatmaps)[..., ::-1, :][..., list(FLIP_MAP)]
  np.testing.assert_allclose(np.asarray(heatmaps), want_heatmaps, atol=1e-4)


def test_detect_averages_the_views_and_keeps_the_plain_boxes(setup):
  """flip + scales: the same detections as without, masks and keypoints from every view
  (different from the plain view's, masks still probabilities); one compile."""
  model, params, images, info = setup
  tta = build.build_model(tta_config(flip=True, scales=(1.0, 1.5)))
  detect = jax.jit(lambda m, p: m.apply({"params": p}, images, info, method="detect"),
                   static_argnums=0)
  base, out = detect(model, params), detect(tta, params)
  for key in ("boxes", "scores", "classes", "valid"):
    np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(base[key]), err_msg=key)
  valid = np.asarray(out["valid"])
  assert valid.sum() > 5
  masks = np.asarray(out["masks"])[valid]
  assert masks.shape[1:] == (28, 28) and np.all((masks >= 0) & (masks <= 1))
  assert np.abs(masks - np.asarray(base["masks"])[valid]).max() > 1e-3
  kp = np.asarray(out["keypoints"])[valid]
  assert np.all(np.isfinite(kp))
  assert np.abs(kp[..., :2] - np.asarray(base["keypoints"])[valid][..., :2]).max() > 1e-3


def test_augment_boxes_merges_the_views_detections(setup):
  """With augment_boxes every view's candidates enter one NMS: the best detection is the
  better of the plain image's and the hand-mirrored image's best (mapped back)."""
  model, params, images, info = setup
  merged_model = build.build_model(tta_config(flip=True, augment_boxes=True))
  merged = jax.jit(lambda p: merged_model.apply({"params": p}, images, info,
                                                method="detect"))(params)
  widths = np.asarray(info["image_size"])[:, 1]
  detect = jax.jit(lambda p, x: model.apply({"params": p}, x, info, method="detect"))
  plain, flipped = detect(params, images), detect(params, mirror_by_hand(images, widths))
  # Not the plain detections again: here the mirrored image's best wins at least once.
  assert np.any(np.asarray(flipped["scores"])[:, 0] > np.asarray(plain["scores"])[:, 0] + 1e-4)
  for b, width in enumerate(widths):
    x1, y1, x2, y2 = np.asarray(flipped["boxes"])[b, 0]
    candidates = [(float(plain["scores"][b, 0]), np.asarray(plain["boxes"])[b, 0]),
                  (float(flipped["scores"][b, 0]), np.asarray([width - x2, y1, width - x1, y2]))]
    score, box = max(candidates, key=lambda c: c[0])
    np.testing.assert_allclose(float(merged["scores"][b, 0]), score, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(merged["boxes"])[b, 0], box, atol=1e-3)


def test_bad_test_time_settings_are_named():
  for flip_map in ((0, 1, 1), (1, 2, 0), ()):  # not a permutation, not its own inverse, none
    cfg = tta_config(flip=True)
    cfg.keypoint_head.flip_map = flip_map
    with pytest.raises(ValueError, match="model.keypoint_head.flip_map"):
      build.build_model(cfg)
  with pytest.raises(ValueError, match="model.test.scales"):
    build.build_model(tta_config(scales=(1.0, 0.0)))
  meta = {"keypoint_flip_map": [0, 2, 1], "keypoint_names": ["apex", "left", "right"]}
  build.check_flip_map(tta_config(flip=True), meta, "split X")
  cfg = tta_config()
  cfg.keypoint_head.flip_map = (0, 1, 2)
  build.check_flip_map(cfg, meta, "split X")  # no flip test, no check
  cfg.test.flip = True
  with pytest.raises(ValueError, match="not the keypoint flip map of split X"):
    build.check_flip_map(cfg, meta, "split X")


def test_a_model_that_does_not_fit_the_data_is_named():
  cfg = tta_config()  # keypoint head on
  meta = {"coco_ids": list(range(1, cfg.num_classes + 1)), "names": [],
          "keypoint_flip_map": [0, 2, 1], "keypoint_names": ["apex", "left", "right"]}
  cfg.keypoint_head.num_keypoints = 3
  build.check_dataset(cfg, meta, "split X")
  with pytest.raises(build.DataMismatchError, match="split X has 2 keypoints per instance.*num_keypoints=2"):
    build.check_dataset(cfg, dict(meta, keypoint_names=["a", "b"], keypoint_flip_map=[0, 1]),
                        "split X")
  with pytest.raises(build.DataMismatchError,
                     match="set --config.model.keypoint_head.enabled=False"):
    build.check_dataset(cfg, dict(meta, keypoint_names=[], keypoint_flip_map=[]), "split X")
  cfg.keypoint_head.enabled = False  # keypoints in the data, none predicted: fine
  build.check_dataset(cfg, dict(meta, keypoint_names=["a", "b"], keypoint_flip_map=[0, 1]),
                      "split X")
  with pytest.raises(build.DataMismatchError, match="set --config.model.num_classes=2"):
    build.check_dataset(cfg, dict(meta, coco_ids=[4, 9], names=["a", "b"]), "split X")
  with pytest.raises(build.DataMismatchError, match="split X is box-only"):
    build.check_dataset(cfg, dict(meta, has_masks=False), "split X")
  cfg.mask_head.enabled = False
  build.check_dataset(cfg, dict(meta, has_masks=False), "split X")
