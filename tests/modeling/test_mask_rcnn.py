"""The whole model: shapes per design, one compile, gradients, golden losses, overfitting.

One tiny model (every head on) is compiled once per module and shared: its
train step is pure, so each test starts from the same initial state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrcnn_jax.modeling import build
from mrcnn_jax.ops import boxes as box_ops
from tests.modeling.conftest import (CANVAS, NUM_KEYPOINTS, _shape_mask, make_batch,
                                     tiny_config)

KEY = jax.random.PRNGKey(0)
OVERFIT_STEPS = 300


def make_tiny():
  """(model, initial params, optimiser, jitted Adam train step, jitted detect, fixed batch)."""
  model = build.build_model(tiny_config())
  batch = make_batch(np.random.default_rng(1), [3, 4], classes=[0, 1, 2, 2])
  params = jax.jit(lambda k: model.init(k, *batch, k, method="losses"))(KEY)["params"]
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 20, OVERFIT_STEPS))

  @jax.jit
  def step(params, opt_state, images, info, gt, key):
    def loss_fn(p):
      losses, diag = model.apply({"params": p}, images, info, gt, key, method="losses")
      return losses["loss"], (losses, diag)
    (_, (losses, diag)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses, diag, grads

  detect = jax.jit(lambda p, images, info: model.apply({"params": p}, images, info,
                                                       method="detect"))
  return model, params, tx, step, detect, batch


@pytest.fixture(scope="module")
def tiny():
  return make_tiny()


def test_train_outputs_and_diagnostics(tiny):
  model, params, tx, step, _, batch = tiny
  _, _, losses, diag, _ = step(params, tx.init(params), *batch, KEY)
  assert set(losses) == {"loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg",
                         "loss_mask", "loss_keypoint"}
  for name, v in losses.items():
    assert v.shape == () and v.dtype == jnp.float32 and np.isfinite(v), name
  total = sum(float(v) for k, v in losses.items() if k != "loss")
  np.testing.assert_allclose(float(losses["loss"]), total, rtol=1e-6)
  assert 0 < float(diag["fg_fraction"]) <= 0.25 + 1e-6
  assert 0 <= float(diag["proposal_recall"]) <= 1


def test_detect_shapes(tiny):
  model, params, _, _, detect, (images, info, _) = tiny
  out = detect(params, images, info)
  d = 20
  assert out["boxes"].shape == (2, d, 4) and out["scores"].shape == (2, d)
  assert out["classes"].shape == (2, d) and out["classes"].dtype == jnp.int32
  assert out["valid"].shape == (2, d) and out["valid"].dtype == jnp.bool_
  assert out["masks"].shape == (2, d, 28, 28)
  assert out["keypoints"].shape == (2, d, NUM_KEYPOINTS, 3)


def test_golden_losses(tiny):
  """Fixed seed, fixed inputs: each loss equals its stored value (catches changes in the math)."""
  _, params, tx, step, _, batch = tiny
  _, _, losses, _, _ = step(params, tx.init(params), *batch, KEY)
  assert set(GOLDEN_LOSSES) == set(losses)
  for name, want in GOLDEN_LOSSES.items():
    np.testing.assert_allclose(float(losses[name]), want, rtol=1e-5, atol=1e-6, err_msg=name)


# From a run of this file (jax 0.10.2, CPU). Change only for an intended change
# in the math or the initialisation, and say which in the commit.
GOLDEN_LOSSES = {
    "loss": 11.810389518737793,
    "loss_box_reg": 0.44011053442955017,
    "loss_cls": 1.439826488494873,
    "loss_keypoint": 8.505602836608887,
    "loss_mask": 0.6939871311187744,
    "loss_rpn_cls": 0.6923007965087891,
    "loss_rpn_loc": 0.03856184333562851,
}


@pytest.mark.parametrize("layout", ["detectron2", "torchvision"])
def test_results_do_not_depend_on_the_canvas(tiny, layout):
  """An image padded to its 32-rounded extent gives the same features, RPN outputs,
  anchors and head outputs in a larger canvas whose padding holds garbage.

  Its size (90 x 70) is not a multiple of 32, so the P6 grid (2 x 2 over an extent
  of 96 x 96) has torchvision's stride 48, and GroupNorm statistics are masked.
  Compared stage by stage on fixed boxes: random weights leave scores near-tied,
  so the order of detections would hinge on rounding."""
  _, params, *_ = tiny
  model = build.build_model(tiny_config(anchor_layout=layout))
  rng = np.random.default_rng(3)
  image = jnp.asarray(make_batch(rng, [4], canvas=96)[0][0])  # (96, 96, 3)
  image = image.at[90:].set(0.0).at[:, 70:].set(0.0)  # zero past its size, as the pipeline pads
  size = jnp.asarray([[90, 70]], jnp.int32)
  boxes = jnp.asarray([[[5.0, 8.0, 40.0, 50.0], [30.0, 2.0, 69.0, 89.5],
                        [0.0, 0.0, 70.0, 90.0], [50.0, 60.0, 69.0, 89.0]]])
  classes = jnp.asarray([[0, 1, 2, 1]], jnp.int32)

  def stages(m, images):
    maps, strides, roi = m.features(images, size, train=False)
    objectness, deltas = m.rpn.rpn_head(maps)
    anchors, valid = m.rpn.anchors(maps, strides, roi.image_extent)
    logits, box_deltas, _ = m.roi_heads.box_outputs(roi, boxes, False)
    masks, heatmaps = m.roi_heads.detection_heads(roi, boxes, classes,
                                                  jnp.ones(classes.shape, bool))
    return maps, objectness, deltas, anchors, valid, (logits, box_deltas, masks, heatmaps)

  run = jax.jit(lambda images: model.apply({"params": params}, images, method=stages))
  small = run(image[None])
  canvas = jnp.asarray(rng.normal(size=(1, 160, 128, 3)), jnp.float32)
  large = run(canvas.at[0, :96, :96].set(image))
  for level, stride in enumerate((4, 8, 16, 32, 64)):
    g = -(-96 // stride)  # the image's own grid on this level
    maps_s, maps_l = small[0][level], large[0][level]
    np.testing.assert_allclose(maps_l[:, :g, :g], maps_s, atol=1e-5, err_msg=f"P{level + 2}")
    for i, name in ((1, "objectness"), (2, "deltas"), (3, "anchors"), (4, "valid")):
      s_, l_ = np.asarray(small[i][level]), np.asarray(large[i][level])
      per_position = s_.shape[1] // (g * g)
      s_ = s_.reshape(g, g, per_position, *s_.shape[2:])
      l_ = l_.reshape(maps_l.shape[1], maps_l.shape[2], per_position, *l_.shape[2:])
      np.testing.assert_allclose(l_[:g, :g], s_, atol=1e-5, err_msg=f"{name} P{level + 2}")
      if name == "valid":
        assert s_.all() and l_.sum() == s_.size, f"only the image's own anchors: P{level + 2}"
  # P6's step between neighbouring positions: torchvision's 96 // 2 = 48, detectron2's 64.
  p6 = np.asarray(small[3][4])[0].reshape(2, 2, -1, 4)
  step = {"torchvision": 48.0, "detectron2": 64.0}[layout]
  np.testing.assert_allclose(p6[0, 1] - p6[0, 0], np.broadcast_to([step, 0, step, 0], p6[0, 0].shape))
  for name, a, b in zip(("logits", "box deltas", "masks", "heatmaps"), small[5], large[5]):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=name)


def test_every_parameter_gets_a_gradient(tiny):
  """All heads on, nothing frozen: every parameter's gradient is finite and non-zero."""
  _, params, tx, step, _, batch = tiny
  *_, grads = step(params, tx.init(params), *batch, KEY)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  for path, g in leaves:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert float(jnp.max(jnp.abs(g))) > 0, name


def test_train_step_compiles_once(tiny):
  """Batches with 0..5 instances per image (0 everywhere included) reuse one executable."""
  _, params, tx, step, _, _ = tiny
  opt_state = tx.init(params)
  rng = np.random.default_rng(7)
  before = step._cache_size()
  for counts in ([0, 0], [1, 3], [4, 2], [0, 5]):
    params, opt_state, losses, _, _ = step(params, opt_state, *make_batch(rng, counts), KEY)
    assert np.isfinite(float(losses["loss"])), counts
  assert step._cache_size() == max(before, 1) == 1


def test_bfloat16_losses_close_to_float32(tiny):
  """bfloat16 compute with the same float32 params: every stage's outputs on the
  same boxes within bfloat16's precision, and the losses within a few percent.
  loss_box_reg, a mean over the sampled foreground RoIs, is compared through the
  box head's outputs instead: bfloat16 may flip a near-tie among the untrained
  RPN's scores and so sample one foreground RoI more or fewer (here 16 vs 15)."""
  model, params, tx, step, _, batch = tiny
  _, _, f32, _, _ = step(params, tx.init(params), *batch, KEY)
  model16 = build.build_model(tiny_config(dtype="bfloat16"))
  bf16 = jax.jit(lambda p: model16.apply({"params": p}, *batch, KEY, method="losses")[0])(params)
  for name in f32:
    assert bf16[name].dtype == jnp.float32
    if name != "loss_box_reg":
      np.testing.assert_allclose(float(bf16[name]), float(f32[name]), rtol=0.05, atol=2e-3,
                                 err_msg=name)
  boxes = batch[2]["gt_boxes"]
  classes = batch[2]["gt_classes"]

  def stages(m, images, size):
    maps, _, roi = m.features(images, size, train=False)
    objectness, deltas = m.rpn.rpn_head(maps)
    logits, box_deltas, _ = m.roi_heads.box_outputs(roi, boxes, False)
    masks, heatmaps = m.roi_heads.detection_heads(roi, boxes, classes, batch[2]["gt_valid"])
    return maps, objectness, deltas, logits, box_deltas, masks, heatmaps

  outputs = [jax.jit(lambda p, m=m: m.apply({"params": p}, batch[0], batch[1]["image_size"],
                                            method=stages))(params) for m in (model, model16)]
  for path, want in jax.tree_util.tree_leaves_with_path(outputs[0]):
    got = np.asarray(_at(outputs[1], path), np.float32)
    scale = float(np.max(np.abs(want)))
    # 10% of the largest magnitude: bf16 keeps ~3 significant digits of each input,
    # and an untrained head's outputs are small sums of many cancelling terms.
    np.testing.assert_allclose(got, want, atol=0.1 * scale + 1e-6, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def _keypoint_variant(params, batch, **keypoint_head):
  """The losses function of the tiny model with keypoint_head fields overridden, and its values."""
  cfg = tiny_config()
  cfg.keypoint_head.update(keypoint_head)
  model = build.build_model(cfg)
  loss_fn = lambda p: model.apply({"params": p}, *batch, KEY, method="losses")[0]
  return loss_fn, jax.jit(loss_fn)(params)


def _assert_only_loss_keypoint_scaled(losses, base, factor):
  """Each loss of ``base`` as it was, but loss_keypoint x factor (and the total)."""
  for name in base:
    if name not in ("loss", "loss_keypoint"):
      np.testing.assert_allclose(float(losses[name]), float(base[name]), rtol=1e-5,
                                 err_msg=name)
  np.testing.assert_allclose(float(losses["loss_keypoint"]),
                             factor * float(base["loss_keypoint"]), rtol=1e-5)


def test_keypoint_loss_weight_scales_only_the_keypoint_loss(tiny):
  """keypoint_head.loss_weight (detectron2's LOSS_WEIGHT) multiplies loss_keypoint alone."""
  _, params, tx, step, _, batch = tiny
  _, _, base, _, _ = step(params, tx.init(params), *batch, KEY)
  _, losses = _keypoint_variant(params, batch, loss_weight=0.25)
  _assert_only_loss_keypoint_scaled(losses, base, 0.25)
  np.testing.assert_allclose(float(losses["loss"]),
                             float(base["loss"]) - 0.75 * float(base["loss_keypoint"]), rtol=1e-5)


def test_keypoint_position_loss_trains_the_decoded_keypoints(tiny):
  """keypoint_head.position_loss_weight adds loss_keypoint_position: the L1 distance in
  heatmap cells between the "local_mean" decoding of the training heatmaps and the
  keypoints (times both weights), the other losses as they were; off by default."""
  _, params, tx, step, _, batch = tiny
  _, _, base, _, _ = step(params, tx.init(params), *batch, KEY)
  assert "loss_keypoint_position" not in base
  found, loss_fns = {}, {}
  for weight in (0.5, 1.5):
    loss_fns[weight], losses = _keypoint_variant(params, batch, position_loss_weight=weight,
                                                 loss_weight=0.25)
    _assert_only_loss_keypoint_scaled(losses, base, 0.25)
    found[weight] = float(losses["loss_keypoint_position"])
  # Random heatmaps decode far from the keypoints: several cells of error per keypoint.
  np.testing.assert_allclose(found[1.5], 3 * found[0.5], rtol=1e-5)
  assert found[0.5] / (0.5 * 0.25) > 1.0
  grads = jax.jit(jax.grad(lambda p: loss_fns[1.5](p)["loss_keypoint_position"]))(params)
  assert float(jnp.max(jnp.abs(grads["keypoint_head"]["score_lowres"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(grads["box_head"]["predictor"]["cls_score"]["kernel"]))) == 0


def test_keypoint_slots_go_to_instances_with_keypoints(tiny):
  """One keypoint slot, one image of three objects without keypoints and a triangle: for
  every sampling seed the slot holds a triangle RoI (a positive loss), whichever RoI the
  sampler put first."""
  _, params, *_ = tiny
  batch = make_batch(np.random.default_rng(3), [4], classes=[0, 1, 0, 2])
  cfg = tiny_config()
  cfg.roi.num_keypoint_rois = 1
  model = build.build_model(cfg)
  loss = jax.jit(lambda p, k: model.apply({"params": p}, *batch, k,
                                          method="losses")[0]["loss_keypoint"])
  for seed in range(6):
    value = float(loss(params, jax.random.PRNGKey(seed)))
    assert np.isfinite(value) and value > 1.0, (seed, value)


def test_keypoint_box_scale_widens_the_heatmaps(tiny):
  """keypoint_head.box_scale: heatmaps span the detections' boxes scaled about their
  centres, so keypoints may lie outside the box (not with the default 1)."""
  _, params, _, _, detect, (images, info, _) = tiny
  cfg = tiny_config()
  cfg.keypoint_head.box_scale = 1.5
  model = build.build_model(cfg)
  wide = jax.jit(lambda p: model.apply({"params": p}, images, info, method="detect"))(params)
  base = detect(params, images, info)
  np.testing.assert_array_equal(wide["boxes"], base["boxes"])
  for out, factor in ((base, 1.0), (wide, 1.5)):
    boxes = np.asarray(box_ops.scale(out["boxes"], factor))[:, :, None]
    kp = np.asarray(out["keypoints"])
    valid = np.asarray(out["valid"])[:, :, None]
    inside = ((kp[..., 0] >= boxes[..., 0]) & (kp[..., 0] <= boxes[..., 2])
              & (kp[..., 1] >= boxes[..., 1]) & (kp[..., 1] <= boxes[..., 3]))
    assert np.all(inside | ~valid), factor
  small = np.asarray(base["boxes"])[:, :, None]
  kp = np.asarray(wide["keypoints"])
  outside = ((kp[..., 0] < small[..., 0]) | (kp[..., 0] > small[..., 2])
             | (kp[..., 1] < small[..., 1]) | (kp[..., 1] > small[..., 3]))
  assert np.any(outside & np.asarray(wide["valid"])[:, :, None])


@pytest.mark.slow
def test_overfit_two_images(tiny):
  """300 Adam steps on 2 images: loss falls >= 80%, every object found (box, mask, keypoints)."""
  _, params, tx, step, detect, batch = tiny
  opt_state = tx.init(params)
  first = None
  for i in range(OVERFIT_STEPS):
    params, opt_state, losses, _, _ = step(params, opt_state, *batch, jax.random.fold_in(KEY, i))
    first = float(losses["loss"]) if first is None else first
  assert float(losses["loss"]) <= 0.2 * first, (first, {k: float(v) for k, v in losses.items()})

  images, info, gt = batch
  out = jax.tree.map(np.asarray, detect(params, images, info))
  cfg = tiny_config()
  cfg.keypoint_head.decode = "local_mean"
  model = build.build_model(cfg)
  local = jax.jit(lambda p: model.apply({"params": p}, images, info, method="detect"))(params)
  local_keypoints = np.asarray(local["keypoints"])
  np.testing.assert_array_equal(local["boxes"], out["boxes"])
  ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
  for b in range(images.shape[0]):
    for g in np.flatnonzero(np.asarray(gt["gt_valid"][b])):
      gt_box = np.asarray(gt["gt_boxes"][b, g])
      kind = int(gt["gt_classes"][b, g])
      keep = out["valid"][b] & (out["scores"][b] > 0.5) & (out["classes"][b] == kind)
      assert keep.any(), (b, g, "no confident detection of the right class")
      iou = np.asarray(box_ops.pairwise_iou(gt_box[None], out["boxes"][b]))[0]
      d = int(np.argmax(np.where(keep, iou, -1)))
      assert iou[d] >= 0.8, (b, g, iou[d])
      # Mask IoU in image pixels: paste the 28x28 probabilities into the box.
      x1, y1, x2, y2 = out["boxes"][b, d]
      inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
      cx = np.clip(((xs - x1) / (x2 - x1) * 28).astype(int), 0, 27)
      cy = np.clip(((ys - y1) / (y2 - y1) * 28).astype(int), 0, 27)
      pred = inside & (out["masks"][b, d][cy, cx] >= 0.5)
      true = _shape_mask(kind, gt_box, xs, ys)
      mask_iou = (pred & true).sum() / (pred | true).sum()
      assert mask_iou >= 0.8, (b, g, mask_iou)
      if kind == 2:
        for decoded in (out["keypoints"], local_keypoints):  # "bicubic", "local_mean"
          err = np.linalg.norm(decoded[b, d, :, :2] - np.asarray(gt["gt_keypoints"][b, g, :, :2]),
                               axis=-1)
          # 4 px: the base corners lie on the box's outline (keypoint_box_scale is 1 here),
          # so a box a pixel too tight moves them to its edge.
          assert np.all(err <= 4.0), (b, g, err)


@pytest.mark.parametrize("design", ["fpn", "c4"])
def test_r50_shapes(design):
  """R50-FPN and R50-C4 at a 128 canvas: traced (not compiled) shapes in both modes."""
  cfg = build.model_config(design, num_classes=5)
  cfg.keypoint_head.update(enabled=True, num_keypoints=4)
  model = build.build_model(cfg)
  images, info, gt = make_batch(np.random.default_rng(0), [2, 1])
  gt["gt_classes"] = gt["gt_classes"] % 5
  gt["gt_keypoints"] = jnp.zeros(gt["gt_keypoints"].shape[:2] + (4, 3))
  variables = jax.eval_shape(lambda: model.init(KEY, images, info, gt, KEY, method="losses"))
  losses, _ = jax.eval_shape(lambda v: model.apply(v, images, info, gt, KEY, method="losses"),
                             variables)
  assert all(v.shape == () for v in losses.values())
  assert {"loss_mask", "loss_keypoint", "loss_cls"} <= set(losses)
  out = jax.eval_shape(lambda v: model.apply(v, images, info, method="detect"), variables)
  mask = 14 if design == "c4" else 28
  assert out["boxes"].shape == (2, 100, 4)
  assert out["masks"].shape == (2, 100, mask, mask)
  assert out["keypoints"].shape == (2, 100, 4, 3)
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  assert params > 20_000_000


def test_chunked_heads_equal_every_slot():
  """The mask and keypoint heads over chunks that skip empty ones (head_chunk_size)
  give the losses, gradients and detections of the heads over every slot, with no,
  a few and all slots real, from one compilation."""
  def config(chunk):
    cfg = tiny_config()
    cfg.roi.update(num_mask_rois=4, num_keypoint_rois=8, head_chunk_size=chunk)
    cfg.test.detections_per_image = 6
    return cfg

  rng = np.random.default_rng(5)
  batches = [make_batch(rng, [0, 0]),                                # no real slot
             make_batch(rng, [1, 0], classes=[2, 2, 2, 2]),           # one of 8 mask slots
             make_batch(rng, [4, 4], classes=[2, 2, 2, 2])]           # every mask slot
  every, chunks = build.build_model(config(0)), build.build_model(config(3))
  params = jax.jit(lambda k: every.init(k, *batches[2], k, method="losses"))(KEY)["params"]

  def grads_of(model):
    def loss(p, b):
      losses = model.apply({"params": p}, *b, KEY, method="losses")[0]
      return losses["loss"], losses
    return jax.jit(lambda p, b: jax.grad(loss, has_aux=True)(p, b))

  def detections_of(model):
    return jax.jit(lambda p, b: model.apply({"params": p}, *b[:2], method="detect"))

  want_fn, got_fn = grads_of(every), grads_of(chunks)
  want_det, got_det = detections_of(every), detections_of(chunks)
  for batch in batches:
    (want_grads, want), (got_grads, got) = want_fn(params, batch), got_fn(params, batch)
    for name in want:
      np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4, atol=1e-6,
                                 err_msg=name)
    for path, a in jax.tree_util.tree_leaves_with_path(got_grads):
      b = _at(want_grads, path)
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))) + 1e-7,
                                 err_msg=jax.tree_util.keystr(path))
    d_want, d_got = want_det(params, batch), got_det(params, batch)
    valid = np.asarray(d_want["valid"])
    np.testing.assert_array_equal(d_got["valid"], valid)
    for name in ("masks", "keypoints"):
      np.testing.assert_allclose(np.asarray(d_got[name])[valid], np.asarray(d_want[name])[valid],
                                 rtol=1e-4, atol=1e-4, err_msg=name)
  assert got_fn._cache_size() == got_det._cache_size() == 1
  # The same step lowers for GPU and TPU: chunks in a loop of conditionals, and
  # the heads' convolutions native there (conv.py's matmuls are CPU-only).
  for platform in ("cuda", "tpu"):
    text = got_fn.trace(params, batches[0]).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" in text and "stablehlo.case" in text, platform
    assert "stablehlo.convolution" in text, platform


def _at(tree, path):
  for key in path:
    tree = tree[key.key if hasattr(key, "key") else key.idx]
  return tree
