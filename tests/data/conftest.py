"""Fixtures of the data tests: a toy store whose rows name themselves."""

import pytest
import toy_store as toy


@pytest.fixture(scope='module')
def acts():
  return toy.make_acts()


@pytest.fixture(scope='module')
def store_path(tmp_path_factory, acts):
  path = tmp_path_factory.mktemp('store') / 'acts'
  toy.write(path, acts)
  return path
