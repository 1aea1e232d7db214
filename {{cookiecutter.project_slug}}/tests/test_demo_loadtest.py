"""The load test's judging, as plain functions: what honours a cancel, what counts as a
peak, what fails a fault run. Their examples are their docstrings; this runs them."""

import doctest
import importlib
import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parent.parent / "loadtest"


@pytest.fixture(scope="module", autouse=True)
def loadtest_on_path():
    """The load test's modules import each other as top-level modules, as Locust runs them."""
    sys.path.insert(0, str(LOADTEST))
    yield
    sys.path.remove(str(LOADTEST))


@pytest.mark.parametrize("name", ["verdict", "run", "faults"])
def test_the_examples_in_each_load_test_module_hold(name):
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"loadtest/{name}.py has no examples to check"
    assert failed == 0, f"{failed} of {attempted} examples in loadtest/{name}.py are wrong"
