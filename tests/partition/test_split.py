"""Splitting: local + remote composed equal the unsplit model bit for bit."""

import jax
import numpy as np
import pytest

from jipguard import models
from jipguard.partition import split


@pytest.mark.parametrize("at", ["Dense_0", "Dense_1", "Dense_3"])
def test_local_then_remote_equals_the_unsplit_model_bit_for_bit(at):
  model = split.paper_mlp()
  x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
  params = model.init(jax.random.key(0), x)["params"]
  net = split.split_model(model, at)
  local, remote = split.split_params(params, net.num_local)
  np.testing.assert_array_equal(split.compose(net, local, remote, x), model.apply({"params": params}, x))
  assert len(local) == net.num_local and len(local) + len(remote) == 5


def test_the_paper_split_keeps_two_layers_local_and_a_900_unit_state():
  net = split.split_model(split.paper_mlp())
  assert net.num_local == 2 and tuple(net.remote.hidden) == (900, 900)
  params = split.paper_mlp().init(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]
  h = net.local.apply({"params": split.split_params(params, 2)[0]}, np.zeros((3, 28, 28, 1)))
  assert h.shape == (3, 900)


def test_merge_inverts_split():
  params = split.paper_mlp().init(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]
  merged = split.merge_params(*split.split_params(params, 2))
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_bad_split_points_are_refused():
  with pytest.raises(ValueError, match="Dense_4"):
    split.split_model(split.paper_mlp(), "Dense_4")  # The output layer: nothing left remote.
  with pytest.raises(ValueError, match="MLP"):
    split.split_model(models.CNN(), "Dense_0")
