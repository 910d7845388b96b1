"""ARM's support sets at evaluation (algorithms/arm.py) against DomainBed's
rule, written out here over row indices: its eval loader gives chunks of 64
examples, and `predict` splits a chunk into sets of `support_size` when
that divides the chunk's length, else keeps it as one set. Padding never
changes an example's prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax.algorithms import arm


def domainbed_sets(num_valid, support_size):
  """DomainBed's support sets of a split's first `num_valid` examples."""
  sets = []
  for start in range(0, num_valid, arm.EVAL_CHUNK):
    chunk = list(range(start, min(start + arm.EVAL_CHUNK, num_valid)))
    if len(chunk) % support_size == 0:
      sets += [chunk[i:i + support_size]
               for i in range(0, len(chunk), support_size)]
    else:
      sets.append(chunk)
  return sorted(map(tuple, sets))


@pytest.mark.parametrize("rows,num_valid,support_size", [
    (16, 12, 8),  # one short chunk, not divisible: one set
    (16, 16, 8),  # divisible: two sets
    (64, 64, 48),  # a full chunk that 48 does not divide
    (256, 200, 8),  # three full chunks and a divisible rest of 8
    (256, 170, 8),  # a rest of 42: one set
    (128, 100, 100),  # support_size above the chunk: each chunk one set
    (32, 30, 5),  # padding after a divisible chunk
])
def test_support_sets_follow_domainbed(rows, num_valid, support_size):
  valid = np.arange(rows) < num_valid
  ids, num_sets = arm.support_sets(jnp.asarray(valid), support_size)
  ids = np.asarray(ids)
  assert ids.max() < num_sets
  groups = {}
  for row in range(num_valid):
    groups.setdefault(int(ids[row]), []).append(row)
  assert sorted(map(tuple, groups.values())) == domainbed_sets(
      num_valid, support_size)
  assert not set(ids[num_valid:]) & set(groups)  # padding in no set


def test_padding_never_changes_a_prediction():
  module = models.MLP(hidden_dims=(4,), num_outputs=3)
  x = jax.random.normal(jax.random.key(0), (16, 5, 5, 2))
  params = module.init(jax.random.key(1), algorithms.network_input(
      "arm", x[:1]))["params"]
  algorithm = algorithms.make_algorithm(
      "arm", module, 2, arm.Config(support_size=4))
  params = algorithm.init_params(jax.random.key(2), params, {"x": x})
  predict = algorithm.logits_fn(algorithms.Network.from_module(module))
  valid = jnp.arange(16) < 10
  zeros = x.at[10:].set(0.0)
  noise = x.at[10:].set(100.0)
  np.testing.assert_array_equal(predict(params, zeros, valid, None)[:10],
                                predict(params, noise, valid, None)[:10])
  # ...while the valid rows do share their set's context.
  moved = x.at[0].set(x[0] + 1.0)
  assert not np.allclose(predict(params, moved, valid, None)[1],
                         predict(params, x, valid, None)[1])
