"""Tests for mrcnn_jax.ops.sampling: balanced, fixed-size, uniform positive/negative draws."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.matching import IGNORE, NEGATIVE, POSITIVE
from mrcnn_jax.ops.sampling import sample_balanced


def _np_counts(labels, num_samples, positive_fraction):
  """detectron2's subsample_labels counts, in plain Python."""
  pos = int(np.sum(labels == POSITIVE))
  neg = int(np.sum(labels == NEGATIVE))
  num_pos = min(pos, int(num_samples * positive_fraction))
  num_neg = min(neg, num_samples - num_pos)
  return num_pos, num_neg


def _check_draw(labels, num_samples, positive_fraction, indices, valid, is_pos):
  """Asserts the documented slot layout and membership against the NumPy counts."""
  labels, indices = np.asarray(labels), np.asarray(indices)
  valid, is_pos = np.asarray(valid), np.asarray(is_pos)
  num_pos, num_neg = _np_counts(labels, num_samples, positive_fraction)
  assert indices.shape == valid.shape == is_pos.shape == (num_samples,)
  # Positives first, then negatives, then unused slots.
  np.testing.assert_array_equal(is_pos, np.arange(num_samples) < num_pos)
  np.testing.assert_array_equal(valid, np.arange(num_samples) < num_pos + num_neg)
  np.testing.assert_array_equal(labels[indices[is_pos]], POSITIVE)
  np.testing.assert_array_equal(labels[indices[valid & ~is_pos]], NEGATIVE)
  assert len(set(indices[valid].tolist())) == valid.sum()  # without replacement
  np.testing.assert_array_equal(indices[~valid], 0)


def test_hand_computed_counts():
  """3 positives, 10 negatives, 8 slots at 25%: int(8 * 0.25) = 2 positives, 6 negatives."""
  labels = jnp.array([1, 0, 0, -1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, -1, 0])
  indices, valid, is_pos = sample_balanced(labels, 8, 0.25, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(is_pos, [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(valid, [1] * 8)
  assert set(np.asarray(indices[:2]).tolist()) <= {0, 4, 8}
  assert set(np.asarray(indices[2:]).tolist()) <= {1, 2, 5, 6, 7, 9, 10, 11, 12, 13, 15}
  _check_draw(labels, 8, 0.25, indices, valid, is_pos)


def test_not_enough_candidates_leaves_invalid_slots():
  """1 positive, 3 negatives, 8 slots at 50%: 1 + 3 valid, 4 unused slots (index 0, invalid)."""
  labels = jnp.array([-1, 0, 1, 0, -1, 0])
  indices, valid, is_pos = sample_balanced(labels, 8, 0.5, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(is_pos, [1, 0, 0, 0, 0, 0, 0, 0])
  assert indices[0] == 2
  assert sorted(np.asarray(indices[1:4]).tolist()) == [1, 3, 5]
  np.testing.assert_array_equal(indices[4:], 0)


def test_positives_stay_capped_when_negatives_run_out():
  """10 positives, 2 negatives, 8 slots at 25%: 2 + 2, positives are not topped up (detectron2)."""
  labels = jnp.array([1] * 10 + [0] * 2)
  _, valid, is_pos = sample_balanced(labels, 8, 0.25, jax.random.PRNGKey(2))
  assert int(is_pos.sum()) == 2 and int(valid.sum()) == 4


def test_no_positives_fills_with_negatives():
  """Without positives every slot goes to a negative (an image with no objects)."""
  labels = jnp.array([0] * 20 + [-1] * 5)
  indices, valid, is_pos = sample_balanced(labels, 8, 0.25, jax.random.PRNGKey(3))
  assert bool(valid.all()) and not bool(is_pos.any())
  assert np.asarray(indices).max() < 20
  _check_draw(labels, 8, 0.25, indices, valid, is_pos)


def test_fewer_candidates_than_slots():
  """N = 5 < num_samples = 16: top-k is capped at N and the rest is padding."""
  labels = jnp.array([POSITIVE, NEGATIVE, NEGATIVE, IGNORE, POSITIVE])
  indices, valid, is_pos = sample_balanced(labels, 16, 0.5, jax.random.PRNGKey(4))
  assert int(valid.sum()) == 4
  assert sorted(np.asarray(indices[:2]).tolist()) == [0, 4]
  assert sorted(np.asarray(indices[2:4]).tolist()) == [1, 2]
  _check_draw(labels, 16, 0.5, indices, valid, is_pos)


def test_matches_numpy_counts_on_random_labels(rng):
  """Counts, layout, membership and uniqueness on random labels of every mix."""
  for n, num_samples, fraction in [(5, 16, 0.5), (30, 8, 0.25), (30, 16, 1.0), (40, 12, 0.25)]:
    # Eight label arrays per shape, from all-one-class to even mixes.
    labels = np.stack([rng.choice([IGNORE, NEGATIVE, POSITIVE], size=n,
                                  p=rng.dirichlet([0.5, 0.5, 0.5])) for _ in range(8)])
    labels = labels.astype(np.int32)
    keys = jax.random.split(jax.random.PRNGKey(n + num_samples), 8)
    draw = jax.jit(jax.vmap(lambda l, k: sample_balanced(l, num_samples, fraction, k)))
    out = [np.asarray(x) for x in draw(jnp.asarray(labels), keys)]
    for i in range(8):
      _check_draw(labels[i], num_samples, fraction, *(x[i] for x in out))


def test_ignored_labels_are_never_drawn():
  """IGNORE (-1) and any other label never appear, over many keys."""
  labels = jnp.array([1, -1, 0, 2, -1, 0, 1, -5, 0, -1] * 3)
  keys = jax.random.split(jax.random.PRNGKey(5), 200)
  indices, valid, _ = jax.vmap(lambda k: sample_balanced(labels, 12, 0.5, k))(keys)
  drawn = np.asarray(labels)[np.asarray(indices)[np.asarray(valid)]]
  assert set(drawn.tolist()) == {0, 1}


def test_same_key_same_draw_different_keys_differ():
  """The draw is a function of the key alone."""
  labels = jnp.array([1] * 20 + [0] * 60)
  a = sample_balanced(labels, 16, 0.25, jax.random.PRNGKey(7))
  b = sample_balanced(labels, 16, 0.25, jax.random.PRNGKey(7))
  c = sample_balanced(labels, 16, 0.25, jax.random.PRNGKey(8))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Two keys giving the same 4-of-20 and 12-of-60 draws has probability ~1e-17.
  assert not np.array_equal(a[0], c[0])


def test_draws_are_roughly_uniform():
  """Over 2000 keys each candidate of a class is drawn about equally often.

  10 positives compete for 2 slots (p = 0.2, mean 400, sd ~18) and 20
  negatives for 6 (p = 0.3, mean 600, sd ~20). The bounds are > 5 sd away,
  and the keys are fixed, so this cannot flake; a sampler biased towards low
  or high indices (e.g. always the first k) fails it by far.
  """
  labels = jnp.array([1, 0, 0] * 10)
  keys = jax.random.split(jax.random.PRNGKey(9), 2000)
  indices, valid, _ = jax.jit(jax.vmap(lambda k: sample_balanced(labels, 8, 0.25, k)))(keys)
  counts = np.bincount(np.asarray(indices)[np.asarray(valid)], minlength=30)
  is_pos = np.asarray(labels) == 1
  assert counts[is_pos].sum() == 2 * 2000 and counts[~is_pos].sum() == 6 * 2000
  assert (np.abs(counts[is_pos] - 400) < 100).all(), counts[is_pos]
  assert (np.abs(counts[~is_pos] - 600) < 120).all(), counts[~is_pos]


def test_under_jit_and_vmap_shapes_and_dtypes():
  """Batched with vmap under jit: [B, num_samples] int32 indices, bool valid and is_positive."""
  labels = jnp.array([[1, 0, 0, -1, 0, 1, 0], [0, 0, 0, 0, -1, -1, 0]])
  keys = jax.random.split(jax.random.PRNGKey(10), 2)
  fn = jax.jit(jax.vmap(functools.partial(sample_balanced, num_samples=6, positive_fraction=0.5)))
  indices, valid, is_pos = fn(labels, key=keys)
  assert indices.shape == valid.shape == is_pos.shape == (2, 6)
  assert indices.dtype == jnp.int32 and valid.dtype == jnp.bool_ and is_pos.dtype == jnp.bool_
  for i in range(2):
    _check_draw(labels[i], 6, 0.5, indices[i], valid[i], is_pos[i])
    for x, y in zip((indices, valid, is_pos), sample_balanced(labels[i], 6, 0.5, keys[i])):
      np.testing.assert_array_equal(x[i], y)


def test_counts_agree_with_torchvision_sampler(rng, torch):
  """Same positive/negative counts as torchvision's BalancedPositiveNegativeSampler."""
  from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
  sampler = BalancedPositiveNegativeSampler(16, 0.25)
  for trial in range(10):
    labels = rng.choice([IGNORE, NEGATIVE, POSITIVE], size=30,
                        p=rng.dirichlet([1.0, 1.0, 1.0])).astype(np.int64)
    (pos_mask,), (neg_mask,) = sampler([torch.from_numpy(labels)])
    _, valid, is_pos = sample_balanced(jnp.asarray(labels), 16, 0.25, jax.random.PRNGKey(trial))
    assert int(is_pos.sum()) == int(pos_mask.sum())
    assert int((valid & ~is_pos).sum()) == int(neg_mask.sum())


def test_rejects_bad_labels_shape():
  """labels must be one-dimensional; the message names it."""
  with pytest.raises(ValueError, match=r"^labels: .*rank 2"):
    sample_balanced(jnp.zeros((4, 2), jnp.int32), 4, 0.5, jax.random.PRNGKey(0))
