"""The backbone registry: a new backbone added through config trains; bad names are named.

``PlainNet`` is docs/extending.md's worked example: five strided convs, no
norms, registered as "plain" and selected with ``model.backbone.name``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrcnn_jax.modeling import backbones, build, padding
from tests.modeling.conftest import make_batch, tiny_config


class PlainNet(nn.Module):
  """``images -> {"c2".."c5"}``: a stride-4 stem, then one stride-2 3x3 conv per level."""
  width: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, image_extent=None):
    x = nn.relu(nn.Conv(self.width, (4, 4), strides=(4, 4), dtype=self.dtype,
                        name="stem")(images.astype(self.dtype)))
    features = {}
    for level in range(2, 6):
      if level > 2:
        x = nn.relu(nn.Conv(self.width * 2 ** (level - 2), (3, 3), strides=(2, 2),
                            padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{level}")(x))
      # Zero past each image's extent, so a feature does not depend on the canvas.
      x = padding.zero_outside(x, padding.valid_mask(x, image_extent, 2 ** level))
      features[f"c{level}"] = x
    return features


@backbones.register("plain", frozen=lambda section: ["stem"] if section.freeze_stem else [])
def build_plain(section, *, dtype, bn_groups, num_stages):
  del bn_groups, num_stages  # no norms; always c2..c5
  return PlainNet(width=section.width, dtype=dtype)


def plain_config():
  cfg = tiny_config(keypoints=False)
  cfg.backbone = {"name": "plain", "width": 16, "freeze_stem": False}
  return cfg


@pytest.mark.slow
def test_a_registered_backbone_trains():
  """Selected by name alone; 30 Adam steps on two images cut the loss by over a third,
  and every one of its parameters moves."""
  model = build.build_model(plain_config())
  batch = make_batch(np.random.default_rng(0), [2, 3], classes=[0, 1, 2])
  key = jax.random.PRNGKey(0)
  params = model.init(key, batch[0], method="initialize")["params"]
  assert set(params["backbone"]) == {"stem", "conv3", "conv4", "conv5"}
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, k):
    loss_fn = lambda p: model.apply({"params": p}, *batch, k, method="losses")[0]["loss"]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, start = tx.init(params), params
  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
    losses.append(float(loss))
  assert losses[-1] < 0.65 * losses[0], losses
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start["backbone"], params["backbone"])
  assert all(jax.tree.leaves(moved))


def test_frozen_parameters_come_from_the_backbone():
  cfg = plain_config()
  assert build.frozen_parameters(cfg) == []
  cfg.backbone.freeze_stem = True
  assert build.frozen_parameters(cfg) == [("backbone", "stem")]
  assert build.frozen_parameters(build.model_config()) == [
      ("backbone", "conv1"), ("backbone", "norm1"), ("backbone", "layer1")]


def test_bad_backbone_names_are_named():
  cfg = plain_config()
  cfg.backbone.name = "nope"
  with pytest.raises(ValueError, match=r"model.backbone.name: expected one of .*'plain'.*"
                                       r"'resnet'.*got 'nope'"):
    build.build_model(cfg)
  c4 = build.model_config("c4")
  c4.backbone.name = "plain"
  with pytest.raises(ValueError, match="needs model.backbone.name='resnet'"):
    build.build_model(c4)
  with pytest.raises(ValueError, match="registered already"):
    backbones.register("plain")(build_plain)


def test_a_config_without_a_backbone_name_is_resnet():
  """Configs saved before ``model.backbone.name`` existed build ResNet."""
  cfg = build.model_config()
  del cfg.backbone["name"]
  assert backbones.name_of(cfg.backbone) == "resnet"
  assert type(build.build_model(cfg).backbone).__name__ == "ResNet"
