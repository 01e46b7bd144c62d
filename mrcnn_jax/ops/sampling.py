"""Balanced foreground/background sampling with a fixed output size.

detectron2's ``subsample_labels`` decides the counts (at most
``positive_fraction * num_samples`` positives, the rest negatives, fewer of
either when there are not enough) and draws uniformly at random without
replacement. Here the draw is a top-k over random keys, and the result always
has ``num_samples`` slots: positives first, then negatives, then unused slots
marked by ``valid = False``.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops.checks import check_shape
from mrcnn_jax.ops.matching import NEGATIVE, POSITIVE


def sample_balanced(labels: jnp.ndarray, num_samples: int, positive_fraction: float,
                    key: jax.Array) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Draws a balanced subset of N labelled candidates.

  Args:
    labels: ``[N]`` int, POSITIVE (1), NEGATIVE (0) or anything else (not
      sampled, e.g. IGNORE or padding).
    num_samples: static number of output slots.
    positive_fraction: upper bound on the positive share of the slots.
    key: PRNG key for the draw.

  Returns:
    indices ``[num_samples]`` int32 into the candidates (0 in unused slots),
    valid ``[num_samples]`` bool, and is_positive ``[num_samples]`` bool.
  """
  check_shape("labels", labels, (None,))
  n = labels.shape[0]
  is_pos = labels == POSITIVE
  is_neg = labels == NEGATIVE
  num_pos = jnp.minimum(jnp.sum(is_pos), int(num_samples * positive_fraction))
  num_neg = jnp.minimum(jnp.sum(is_neg), num_samples - num_pos)

  # A uniform random order of each class: top-k of random keys, candidates of
  # the other class pushed below every real key.
  k = min(num_samples, n)
  noise = jax.random.uniform(key, (n,))
  pos_order = _pad_to(jax.lax.top_k(jnp.where(is_pos, noise, -1.0), k)[1], num_samples)
  neg_order = _pad_to(jax.lax.top_k(jnp.where(is_neg, noise, -1.0), k)[1], num_samples)

  slot = jnp.arange(num_samples)
  from_pos = slot < num_pos
  neg_slot = jnp.clip(slot - num_pos, 0, num_samples - 1)
  indices = jnp.where(from_pos, pos_order, neg_order[neg_slot]).astype(jnp.int32)
  valid = slot < num_pos + num_neg
  return jnp.where(valid, indices, 0), valid, from_pos


def _pad_to(x, size):
  return jnp.pad(x, (0, size - x.shape[0]))
