"""RoI heads: output shapes, deconv geometry against torch, keypoint decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.modeling import box_head, build, keypoint_head, mask_head, res5_head, rpn


def _init_apply(module, *args):
  return module.init_with_output(jax.random.PRNGKey(0), *args)


def test_box_head_shapes_and_float32_predictors():
  """[B, R, 7, 7, C] -> logits [B, R, K+1] and deltas [B, R, K, 4], in float32."""
  (logits, deltas), _ = _init_apply(box_head.BoxHead(num_classes=5, fc_dims=(32, 32),
                                                     dtype=jnp.bfloat16),
                                    jnp.ones((2, 6, 7, 7, 8), jnp.bfloat16))
  assert logits.shape == (2, 6, 6) and deltas.shape == (2, 6, 5, 4)
  assert logits.dtype == deltas.dtype == jnp.float32
  (_, agnostic), _ = _init_apply(box_head.BoxHead(num_classes=5, fc_dims=(8,),
                                                  class_agnostic=True), jnp.ones((3, 7, 7, 4)))
  assert agnostic.shape == (3, 1, 4)


def test_box_head_convs_run_on_each_roi_before_the_fcs():
  """num_convs: 3x3 convs per RoI (no mixing across RoIs), then flatten into the FCs."""
  head = box_head.BoxHead(num_classes=2, fc_dims=(16,), num_convs=2, conv_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 7, 7, 4))
  (logits, deltas), variables = _init_apply(head, x)
  params = variables["params"]
  assert params["conv1"]["kernel"].shape == (3, 3, 4, 8)
  assert params["conv2"]["kernel"].shape == (3, 3, 8, 8)
  assert params["fc6"]["kernel"].shape == (7 * 7 * 8, 16)
  assert logits.shape == (2, 3, 3) and deltas.shape == (2, 3, 2, 4)
  # Changing one RoI changes only that RoI's outputs.
  other, _ = head.apply(variables, x.at[1, 2].set(0.0))
  np.testing.assert_array_equal(other[0], logits[0])
  np.testing.assert_array_equal(other[1, :2], logits[1, :2])
  assert not np.allclose(other[1, 2], logits[1, 2])


@pytest.mark.parametrize("head", ["box", "mask"])
def test_head_group_norm_after_each_conv(head):
  """norm="gn" (detectron2's ROI_*_HEAD.NORM): bias-free convs, each followed by a
  GroupNorm of 32 groups over that RoI alone (NumPy reference on the captured conv output)."""
  if head == "box":
    module, name = box_head.BoxHead(num_classes=2, fc_dims=(16,), num_convs=2, conv_dim=64,
                                    norm="gn"), "conv{}"
  else:
    module, name = mask_head.MaskHead(num_classes=2, num_convs=2, conv_dim=64,
                                      norm="gn"), "mask_fcn{}"
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 7, 7, 4))
  variables = module.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  for i in (1, 2):
    assert set(params[name.format(i)]) == {"kernel"}
    assert set(params[name.format(i) + "_norm"]) == {"scale", "bias"}
  scale = jax.random.uniform(jax.random.PRNGKey(2), (64,), minval=0.5, maxval=2.0)
  params[name.format(1) + "_norm"] = {"scale": scale, "bias": -0.1 * scale}
  _, state = module.apply({"params": params}, x, capture_intermediates=True)
  conv = np.asarray(state["intermediates"][name.format(1)]["__call__"][0], np.float64)
  normed = np.asarray(state["intermediates"][name.format(1) + "_norm"]["__call__"][0])
  groups = conv.reshape(6, 7, 7, 32, 2)
  mean = groups.mean(axis=(1, 2, 4), keepdims=True)
  var = groups.var(axis=(1, 2, 4), keepdims=True)
  want = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(6, 7, 7, 64) * scale - 0.1 * scale
  np.testing.assert_allclose(normed, want, rtol=1e-4, atol=1e-4)


def test_bad_head_settings_are_refused():
  """An unknown head norm, a keypoint box scale <= 0, no keypoint RoI slots or an unknown
  keypoint decoding are refused when the model is built, naming the config key."""
  cfg = build.model_config(num_classes=2)
  cfg.mask_head.norm = "bn"
  with pytest.raises(ValueError, match="model.mask_head.norm"):
    build.build_model(cfg)
  for key, value in (("keypoint_head.box_scale", 0.0), ("roi.num_keypoint_rois", 0),
                     ("keypoint_head.decode", "argmax")):
    cfg = build.model_config(num_classes=2)
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=f"model.{key}"):
      build.build_model(cfg)


def test_mask_and_keypoint_head_shapes():
  masks, _ = _init_apply(mask_head.MaskHead(num_classes=4, conv_dim=8),
                         jnp.ones((2, 5, 14, 14, 8)))
  assert masks.shape == (2, 5, 28, 28, 4) and masks.dtype == jnp.float32
  heat, _ = _init_apply(keypoint_head.KeypointHead(num_keypoints=3, num_convs=2, conv_dim=8),
                        jnp.ones((2, 5, 14, 14, 8)))
  assert heat.shape == (2, 5, 56, 56, 3)


def test_res5_head_shapes():
  """C4 head: 14x14 pooled C4 -> res5 at 7x7, logits and deltas from its mean."""
  (res5, logits, deltas), _ = _init_apply(
      res5_head.Res5Head(num_classes=3, depth="tiny", width=4, norm="gn"),
      jnp.ones((2, 4, 14, 14, 16)))
  assert res5.shape == (2, 4, 7, 7, 32)
  assert logits.shape == (2, 4, 4) and deltas.shape == (2, 4, 3, 4)


def test_rpn_head_flattens_in_anchor_order():
  """Channel a*4+j of the deltas conv is delta j of anchor a at each position."""
  head = rpn.RPNHead(num_anchors=3)
  feats = [jnp.ones((1, 4, 5, 8)), jnp.ones((1, 2, 3, 8))]
  (obj, deltas), variables = _init_apply(head, feats)
  assert [o.shape for o in obj] == [(1, 60), (1, 18)]
  assert [d.shape for d in deltas] == [(1, 60, 4), (1, 18, 4)]
  # Set the deltas conv to output its channel index: position p, anchor a, coord j
  # must read channel a * 4 + j.
  params = jax.tree.map(lambda x: x, variables["params"])
  params["deltas"]["kernel"] = jnp.zeros_like(params["deltas"]["kernel"])
  params["deltas"]["bias"] = jnp.arange(12.0)
  _, deltas = head.apply({"params": params}, feats)
  np.testing.assert_array_equal(deltas[0][0, :3], np.arange(12.0).reshape(3, 4))
  np.testing.assert_array_equal(deltas[0][0, 3:6], np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("kernel,pad", [(2, 0), (4, 1)])
def test_deconv_matches_torch_conv_transpose(torch, kernel, pad):
  """Our deconvs equal torch ConvTranspose2d(k, stride 2, padding p) with the kernel flipped.

  This is the layout fact weight import relies on: torch's [in, out, kh, kw]
  weight, spatially flipped and moved to [kh, kw, in, out]. flax's own
  ConvTranspose (same parameter layout) agrees too.
  """
  import flax.linen as nn
  from mrcnn_jax.modeling.deconv import Deconv
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 5, 3)).astype(np.float32)
  w = rng.normal(size=(3, 4, kernel, kernel)).astype(np.float32)
  t = torch.nn.ConvTranspose2d(3, 4, kernel, stride=2, padding=pad, bias=False)
  t.weight.data = torch.tensor(w)
  ref = t(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  padding = "VALID" if kernel == 2 else ((2, 2), (2, 2))
  layer = nn.ConvTranspose(4, (kernel, kernel), (2, 2), padding=padding, use_bias=False)
  kern = jnp.asarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
  flax_out = layer.apply({"params": {"kernel": kern}}, jnp.asarray(x))
  ours = Deconv(4, kernel, 2, pad).apply({"params": {"kernel": kern, "bias": jnp.zeros(4)}},
                                         jnp.asarray(x))
  assert ours.shape == flax_out.shape == ref.shape == (1, 12, 10, 4)
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  np.testing.assert_allclose(flax_out, ref, atol=1e-4)


def test_deconv_gradients_match_flax_conv_transpose():
  """Same function as nn.ConvTranspose, so the same gradients (bf16 input cast included)."""
  import flax.linen as nn
  from mrcnn_jax.modeling.deconv import Deconv
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)
  v = nn.ConvTranspose(6, (4, 4), (2, 2), padding=((2, 2), (2, 2))).init(jax.random.PRNGKey(0), x)
  loss = lambda layer: lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))
  ref = jax.grad(loss(nn.ConvTranspose(6, (4, 4), (2, 2), padding=((2, 2), (2, 2)))),
                 argnums=(0, 1))(v, x)
  ours = jax.grad(loss(Deconv(6, 4, 2, padding=1)), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("head", ["keypoint", "mask_c4"])
def test_deconv_init_scale_is_detectron2s(torch, head):
  """Deconv kernels start at detectron2's scale: kaiming_normal_(fan_out) on torch's layout.

  torch counts a ConvTranspose2d weight [in, out, k, k]'s fan-out as in * k * k.
  Counting our [k, k, in, out] kernel's out * k * k instead made the keypoint
  head's score_lowres (in >> out) start sqrt(in / out) times too large, and
  its loss's gradient swamped the other losses' in the shared backbone.
  """
  if head == "keypoint":
    module = keypoint_head.KeypointHead(num_keypoints=3, num_convs=1, conv_dim=64)
    x, name = jnp.ones((1, 14, 14, 8)), "score_lowres"
  else:  # C4: the mask head's deconv reads res5 directly (in != out)
    module = mask_head.MaskHead(num_classes=3, num_convs=0, conv_dim=16)
    x, name = jnp.ones((1, 7, 7, 256)), "deconv"
  kernel = np.asarray(module.init(jax.random.PRNGKey(0), x)["params"][name]["kernel"])
  k, _, cin, cout = kernel.shape
  ref = torch.empty(cin, cout, k, k)  # ConvTranspose2d's weight layout
  torch.nn.init.kaiming_normal_(ref, mode="fan_out", nonlinearity="relu")
  np.testing.assert_allclose(kernel.std(), ref.std().item(), rtol=0.1)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (cin * k * k)), rtol=0.05)


def _gaussian_maps(centres, m=56, sigma=2.0):
  yy, xx = np.mgrid[0:m, 0:m]
  return np.stack([-((xx - u) ** 2 + (yy - v) ** 2) / (2 * sigma ** 2) for u, v in centres],
                  axis=-1).astype(np.float32)


def test_heatmap_decoding_finds_peaks_to_a_pixel():
  """A peak at map coordinate (u, v) decodes to x1 + (u + 0.5) * w / m, to the RoI pixel."""
  centres = [(10.3, 20.6), (1.6, 54.0), (40.75, 3.4)]
  maps = _gaussian_maps(centres)[None]
  box = np.array([[100.0, 50.0, 212.0, 162.0]], np.float32)  # 112 px: 2 px per cell
  kps = jax.jit(keypoint_head.heatmaps_to_keypoints)(jnp.asarray(maps), jnp.asarray(box))
  assert kps.shape == (1, 3, 3)
  for k, (u, v) in enumerate(centres):
    want_x = 100 + (u + 0.5) * 2
    want_y = 50 + (v + 0.5) * 2
    # Whole RoI pixels (as detectron2): the nearest centre is <= 0.5 px away,
    # and bicubic interpolation of a sampled Gaussian peaks within ~0.1 cell.
    assert abs(float(kps[0, k, 0]) - want_x) < 0.75, (k, kps[0, k])
    assert abs(float(kps[0, k, 1]) - want_y) < 0.75, (k, kps[0, k])
  assert np.all((kps[..., 2] > 0) & (kps[..., 2] <= 1))


def _detectron2_decode(torch, maps, boxes):
  """detectron2's heatmaps_to_keypoints, transcribed with torch's bicubic interpolate."""
  F = torch.nn.functional
  d, _, _, k = maps.shape
  out = np.zeros((d, k, 3))
  for i in range(d):
    # detectron2 (and torchvision) clamp the RoI's sides at one pixel first
    w, h = max(boxes[i, 2] - boxes[i, 0], 1.0), max(boxes[i, 3] - boxes[i, 1], 1.0)
    wc, hc = int(np.ceil(w)), int(np.ceil(h))
    t = torch.tensor(maps[i]).permute(2, 0, 1)[None]
    roi_map = F.interpolate(t, size=(hc, wc), mode="bicubic", align_corners=False)[0]
    max_score = roi_map.reshape(k, -1).max(1).values
    norm = torch.exp(t[0] - max_score[:, None, None]).sum((1, 2))
    pos = roi_map.reshape(k, -1).argmax(1)
    xi, yi = (pos % wc).numpy(), (pos // wc).numpy()
    out[i, :, 0] = (xi + 0.5) * w / wc + boxes[i, 0]
    out[i, :, 1] = (yi + 0.5) * h / hc + boxes[i, 1]
    out[i, :, 2] = 1.0 / norm.numpy()
  return out


def test_heatmap_decoding_finds_the_global_peak_of_rough_maps(torch, rng):
  """Random smooth maps with several near-equal peaks (as an untrained head gives).

  The highest cell is not always under the interpolant's highest point;
  refining several local maxima finds the peak detectron2 finds.
  """
  d, m, k = 16, 56, 17
  noise = rng.normal(size=(d, m + 4, m + 4, k)).astype(np.float32)
  kernel = np.outer(*[np.array([1, 4, 6, 4, 1], np.float32) / 16] * 2)
  maps = 3 * sum(kernel[a, b] * noise[:, a:a + m, b:b + m] for a in range(5) for b in range(5))
  x1y1 = rng.uniform(0, 50, size=(d, 2))
  wh = rng.uniform(20, 200, size=(d, 2))
  boxes = np.concatenate([x1y1, x1y1 + wh], 1).astype(np.float32)
  ours = np.asarray(keypoint_head.heatmaps_to_keypoints(jnp.asarray(maps), jnp.asarray(boxes)))
  ref = _detectron2_decode(torch, maps, boxes)
  far = np.max(np.abs(ours[..., :2] - ref[..., :2]), axis=-1) > 1.01
  assert far.mean() <= 0.01, (far.mean(), np.argwhere(far)[:5])


def test_heatmap_decoding_matches_detectron2_reference(torch, rng):
  """Against detectron2's heatmaps_to_keypoints (bicubic resize to the RoI, argmax).

  Peaked maps, as trained heads give: the same RoI pixels are sampled, so
  positions and scores agree to float rounding.
  """
  d, m, k = 4, 56, 3
  centres = rng.uniform(3, 52, size=(d, k, 2))
  maps = np.stack([_gaussian_maps(c, m, sigma=2.0) + 0.01 * rng.normal(size=(m, m, k))
                   for c in centres]).astype(np.float32)
  x1y1 = rng.uniform(0, 50, size=(d, 2))
  wh = rng.uniform(0.5, 1300, size=(d, 2))  # below one pixel to a whole 1333-px image
  wh[0] = (0.7, 30.0)
  boxes = np.concatenate([x1y1, x1y1 + wh], 1).astype(np.float32)
  assert (wh.max(axis=1) > 448).sum() >= 2  # sampled every 2nd or 3rd pixel, then refined
  ours = np.asarray(keypoint_head.heatmaps_to_keypoints(jnp.asarray(maps), jnp.asarray(boxes)))
  ref = _detectron2_decode(torch, maps, boxes)
  np.testing.assert_allclose(ours[..., :2], ref[..., :2], atol=1e-3)
  np.testing.assert_allclose(ours[..., 2], ref[..., 2], rtol=1e-5)


def test_local_mean_decoding_hand_computed():
  """Two equal highest cells average to their midpoint; a cell beyond the window counts in
  the score only; at the border the window keeps the cells inside the map."""
  m = 56
  maps = np.full((1, m, m, 2), -40.0, np.float32)
  maps[0, 20, 10, 0] = maps[0, 20, 11, 0] = 0.0  # two equal peaks: u = 10.5, v = 20
  maps[0, 20, 40, 0] = 0.0  # as high, but 29 cells away
  maps[0, 0, 0, 1] = np.log(3.0)  # corner peak and one neighbour of a quarter the weight
  maps[0, 1, 0, 1] = 0.0  # u = 0, v = (0 * 3 + 1 * 1) / 4 = 0.25
  box = np.array([[100.0, 50.0, 212.0, 162.0]], np.float32)  # 2 px per cell
  kps = np.asarray(jax.jit(keypoint_head.local_mean_keypoints)(jnp.asarray(maps),
                                                               jnp.asarray(box)))
  np.testing.assert_allclose(kps[0, 0], [100 + 11.0 * 2, 50 + 20.5 * 2, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(kps[0, 1], [100 + 0.5 * 2, 50 + 0.75 * 2, 3 / 4], rtol=1e-6)


def _local_mean_reference(maps, boxes, half):
  """Loops over detections and keypoints, in float64."""
  d, m, _, k = maps.shape
  out = np.zeros((d, k, 3))
  for i in range(d):
    for j in range(k):
      a = maps[i, :, :, j].astype(np.float64)
      v0, u0 = np.unravel_index(np.argmax(a), a.shape)
      total = mean_u = mean_v = 0.0
      for v in range(max(v0 - half, 0), min(v0 + half, m - 1) + 1):
        for u in range(max(u0 - half, 0), min(u0 + half, m - 1) + 1):
          w = np.exp(a[v, u] - a[v0, u0])
          total, mean_u, mean_v = total + w, mean_u + w * u, mean_v + w * v
      x1, y1, x2, y2 = boxes[i]
      out[i, j] = [x1 + (mean_u / total + 0.5) * (x2 - x1) / m,
                   y1 + (mean_v / total + 0.5) * (y2 - y1) / m,
                   1.0 / np.exp(a - a[v0, u0]).sum()]
  return out


def test_local_mean_decoding_matches_numpy_reference(rng):
  d, m, k = 5, 56, 4
  maps = 4 * rng.normal(size=(d, m, m, k)).astype(np.float32)
  maps[0, 1, 54, 0] = 30.0  # a peak by the border
  x1y1 = rng.uniform(0, 50, size=(d, 2))
  boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0.5, 300, size=(d, 2))], 1).astype(np.float32)
  ours = np.asarray(keypoint_head.decode_keypoints(jnp.asarray(maps), jnp.asarray(boxes),
                                                   "local_mean"))
  ref = _local_mean_reference(maps, boxes, keypoint_head.LOCAL_HALF_WINDOW)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)


def test_local_mean_decoding_resolves_a_fraction_of_a_cell():
  """A peak between cells (a softmax that is a sampled Gaussian, as a trained head's is
  near its maximum) decodes to its centre to ~0.01 cell, where whole RoI pixels leave up
  to half a pixel."""
  centres = [(10.3, 20.6), (30.5, 31.9), (40.75, 3.4)]
  maps = jnp.asarray(_gaussian_maps(centres, sigma=1.0)[None])
  box = jnp.asarray([[100.0, 50.0, 212.0, 162.0]])  # 2 px per cell
  want = np.array([[100 + (u + 0.5) * 2, 50 + (v + 0.5) * 2] for u, v in centres])
  local = np.asarray(keypoint_head.decode_keypoints(maps, box, "local_mean"))[0, :, :2]
  bicubic = np.asarray(keypoint_head.decode_keypoints(maps, box, "bicubic"))[0, :, :2]
  assert np.abs(local - want).max() < 0.05, local - want
  assert np.abs(bicubic - want).max() > 0.2  # the whole-pixel grid, for contrast
  with pytest.raises(ValueError, match="local_mean"):
    keypoint_head.decode_keypoints(maps, box, "soft")
