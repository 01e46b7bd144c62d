"""Backbones by name: ``model.backbone.name`` picks one registered here.

A backbone is a Flax module called as ``backbone(images, train=...,
image_extent=...)`` that returns ``{"c2": [B, H/4, W/4, C2], ..., "c5":
[B, H/32, W/32, C5]}`` (the FPN reads c2..c5; the C4 design reads only c4,
and needs "resnet", whose res5 stage is then its box head). ``image_extent
[B, 2]`` (or None) is each image's padded size: features past it should be
zero (modeling/padding.py) so that results do not depend on the canvas.

A builder takes the config's ``model.backbone`` section (which may carry any
keys the backbone needs) and returns the module; docs/extending.md walks
through adding one::

    @backbones.register("mynet")
    def build_mynet(section, *, dtype, bn_groups, num_stages):
      return MyNet(width=section.width, dtype=dtype)
"""

import dataclasses
from typing import Callable, Dict, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.modeling import resnet


@dataclasses.dataclass(frozen=True)
class Entry:
  build: Callable[..., nn.Module]
  # Top-level parameter names of the backbone that the config freezes (the
  # optimiser leaves them untouched), from the backbone section.
  frozen: Callable[[ml_collections.ConfigDict], Sequence[str]]


REGISTRY: Dict[str, Entry] = {}


def register(name: str, frozen: Callable[[ml_collections.ConfigDict], Sequence[str]] = (
    lambda section: ())):
  """Decorator: registers ``builder(section, *, dtype, bn_groups, num_stages)`` as ``name``."""
  def add(builder):
    if name in REGISTRY:
      raise ValueError(f"backbone {name!r} is registered already")
    REGISTRY[name] = Entry(builder, frozen)
    return builder
  return add


def name_of(section: ml_collections.ConfigDict) -> str:
  """The backbone's name; a section without one (written before the key existed) is ResNet's."""
  return section.get("name", "resnet")


def entry(section: ml_collections.ConfigDict) -> Entry:
  name = name_of(section)
  if name not in REGISTRY:
    raise ValueError(f"model.backbone.name: expected one of {sorted(REGISTRY)}, got {name!r}")
  return REGISTRY[name]


def build(section: ml_collections.ConfigDict, *, dtype: jnp.dtype, bn_groups: int,
          num_stages: int) -> nn.Module:
  """The backbone ``section.name`` names. ``num_stages``: 4 (c2..c5) or 3 (C4: to c4)."""
  return entry(section).build(section, dtype=dtype, bn_groups=bn_groups, num_stages=num_stages)


@register("resnet", frozen=lambda section: resnet.frozen_prefixes(section.freeze_at))
def build_resnet(section, *, dtype, bn_groups, num_stages) -> nn.Module:
  return resnet.ResNet(depth=section.depth, width=section.width, norm=section.norm,
                       freeze_at=section.freeze_at, num_stages=num_stages,
                       stride_in_1x1=section.stride_in_1x1,
                       zero_init_residual=section.zero_init_residual, dtype=dtype,
                       bn_groups=bn_groups)
