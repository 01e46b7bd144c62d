"""Optimiser and learning-rate schedule from ``config.optim``.

The standard detection recipe (detectron2's R50-FPN 1x, Goyal et al. 2017 for
the scaling rule): SGD with momentum 0.9, lr 0.02 at batch 16 scaled linearly
with the batch size, a linear warm-up from ``warmup_factor * lr``, then step
decay by ``decay_factor`` at ``decay_steps`` (or cosine decay to zero), weight
decay 1e-4 on weights only. Norm scales and biases (every 1-D parameter) get
no weight decay; parameters frozen by the config get no update at all.

Keys of ``config.optim``:
  name             "sgd" or "adamw"
  lr               learning rate at ``reference_batch_size``
  reference_batch_size  the batch size ``lr`` was tuned for (16 for COCO)
  momentum         SGD momentum (AdamW uses b1 = 0.9, b2 = 0.999)
  weight_decay     on >= 2-D parameters only
  warmup_steps, warmup_factor   linear warm-up from ``warmup_factor * lr``
  schedule         "step" (``decay_steps``, ``decay_factor``) or "cosine"
  clip_grad_norm   global-norm clipping threshold, 0 or None for none
"""

from typing import Callable, List, Sequence, Tuple

import jax
import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict) -> Callable:
  """Step -> learning rate for ``config.total_steps`` steps at ``config.batch_size``."""
  o = config.optim
  base, warmup, total = base_lr(config), warmup_steps(config), config.total_steps
  start = optax.linear_schedule(base * o.warmup_factor, base, max(warmup, 1))
  if o.schedule == "step":
    after = optax.piecewise_constant_schedule(
        base, {s - warmup: o.decay_factor for s in decay_steps(config)})
  elif o.schedule == "cosine":
    after = optax.cosine_decay_schedule(base, max(total - warmup, 1))
  else:
    raise ValueError(f"optim.schedule: expected 'step' or 'cosine', got {o.schedule!r}")
  return optax.join_schedules([start, after], [warmup])


def base_lr(config: ml_collections.ConfigDict) -> float:
  """The peak learning rate: ``optim.lr`` scaled linearly with the batch size."""
  return config.optim.lr * config.batch_size / config.optim.reference_batch_size


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  return int(min(config.optim.warmup_steps, config.total_steps))


def decay_steps(config: ml_collections.ConfigDict) -> List[int]:
  """The steps where the "step" schedule decays, those after warm-up and before
  ``total_steps`` ([] for "cosine")."""
  o = config.optim
  if o.schedule != "step":
    return []
  return [int(s) for s in o.decay_steps if warmup_steps(config) < s < config.total_steps]


def _decayed(params):
  """True for parameters that get weight decay: kernels, not norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _labels(params, frozen: Sequence[Tuple[str, ...]]):
  """"frozen" for every parameter under one of the ``frozen`` path prefixes, else "train"."""
  frozen = [tuple(f) for f in frozen]

  def label(path, _):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    return "frozen" if any(names[:len(f)] == f for f in frozen) else "train"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict, params,
                   frozen: Sequence[Tuple[str, ...]] = ()) -> optax.GradientTransformation:
  """The optimiser of ``config.optim`` for ``params`` (a pytree or its shapes).

  ``frozen`` lists parameter path prefixes (e.g. ``("backbone", "conv1")``,
  see ``build.frozen_parameters``) that receive neither updates nor decay.
  """
  o = config.optim
  lr = learning_rate(config)
  parts = []
  if o.get("clip_grad_norm"):
    parts.append(optax.clip_by_global_norm(o.clip_grad_norm))
  if o.name == "sgd":
    # Decay is added to the gradient before momentum, as torch.optim.SGD does.
    parts += [optax.add_decayed_weights(o.weight_decay, mask=_decayed),
              optax.sgd(lr, momentum=o.momentum)]
  elif o.name == "adamw":
    parts.append(optax.adamw(lr, weight_decay=o.weight_decay, mask=_decayed))
  else:
    raise ValueError(f"optim.name: expected 'sgd' or 'adamw', got {o.name!r}")
  tx = optax.chain(*parts)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               _labels(params, frozen))


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """``config.optim`` with detectron2's 1x schedule (90k steps at batch 16)."""
  cfg = ml_collections.ConfigDict({
      "name": "sgd", "lr": 0.02, "reference_batch_size": 16, "momentum": 0.9,
      "weight_decay": 1e-4, "warmup_steps": 1000, "warmup_factor": 0.001,
      "schedule": "step", "decay_steps": (60000, 80000), "decay_factor": 0.1,
      "clip_grad_norm": 0.0,
  })
  cfg.update(overrides)
  return cfg
