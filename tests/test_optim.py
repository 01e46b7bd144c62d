"""Optimiser: linear scaling, warm-up, decay steps; weight decay on kernels only; frozen parameters."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mrcnn_jax import optim


def config(**optim_overrides):
  return ml_collections.ConfigDict({"batch_size": 8, "total_steps": 100,
                                    "optim": optim.optim_config(**optim_overrides)})


def test_schedule_scales_with_batch_and_warms_up():
  lr = optim.learning_rate(config(lr=0.02, reference_batch_size=16, warmup_steps=10,
                                  warmup_factor=0.1, decay_steps=(50, 80)))
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 49, 50, 80, 99)],
                             [0.001, 0.0055, 0.01, 0.01, 0.001, 0.0001, 0.0001], rtol=1e-5)
  cos = optim.learning_rate(config(schedule="cosine", warmup_steps=0, lr=0.016,
                                   reference_batch_size=8))
  np.testing.assert_allclose([float(cos(0)), float(cos(50)), float(cos(100))],
                             [0.016, 0.008, 0.0], atol=1e-7)


def test_decay_on_kernels_only_and_frozen_untouched():
  params = {"backbone": {"conv1": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
                         "layer2": {"kernel": jnp.ones((3, 3))}},
            "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx = optim.make_optimizer(config(lr=0.1, reference_batch_size=8, weight_decay=0.5,
                                   warmup_steps=0, momentum=0.0),
                            params, frozen=[("backbone", "conv1")])
  grads = {"backbone": {"conv1": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
                        "layer2": {"kernel": jnp.zeros((3, 3))}},
           "head": {"kernel": jnp.zeros((2, 2)), "bias": jnp.full(2, 2.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["backbone"]["conv1"]["kernel"], 1.0)  # frozen: no step, no decay
  np.testing.assert_allclose(new["backbone"]["conv1"]["bias"], 1.0)
  np.testing.assert_allclose(new["backbone"]["layer2"]["kernel"], 1.0 - 0.1 * 0.5)  # decay only
  np.testing.assert_allclose(new["head"]["kernel"], 1.0 - 0.1 * 0.5)
  np.testing.assert_allclose(new["head"]["bias"], 1.0 - 0.1 * 2.0)  # gradient, no decay


def test_clipping_and_adamw():
  params = {"w": jnp.ones((2, 2))}
  tx = optim.make_optimizer(config(name="adamw", lr=0.01, reference_batch_size=8,
                                   warmup_steps=0, clip_grad_norm=1.0, weight_decay=0.0),
                            params)
  updates, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.01, rtol=1e-4)  # Adam's first step: -lr * sign
