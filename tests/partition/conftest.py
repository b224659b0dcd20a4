"""Shared tiny models: an undefended and a defended partitioned MLP on 800 Fashion-MNIST images."""

import pytest

from jipguard import data
from jipguard.partition import defense

TINY = dict(num_owners=4, hidden=(900, 900, 64, 64), epochs=3, warmup_epochs=1, batch_size=8, lr_model=1e-3, seed=0)


@pytest.fixture(scope="package")
def fashion():
  train = data.load("fashion_mnist_subset")
  test = data.load("fashion_mnist_subset", split="test")
  return train.images[:800], train.labels[:800], train.images[5000:6000], test.images[:200], test.labels[:200]


@pytest.fixture(scope="package")
def undefended(fashion):
  x, y = fashion[:2]
  return defense.train(defense.DefenseConfig(designs=(), **TINY), x, y)


@pytest.fixture(scope="package")
def defended(fashion):
  x, y = fashion[:2]
  return defense.train(defense.DefenseConfig(designs=("single",), defender_weight=0.1, **TINY), x, y)
