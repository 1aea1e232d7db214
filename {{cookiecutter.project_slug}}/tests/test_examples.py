"""The examples in the runtime's docstrings are true: each module's doctests run here."""

import doctest
import importlib

import pytest

MODULES = [
    "tasksignal.auth",
    "tasksignal.board",
    "tasksignal.broker",
    "tasksignal.cascade",
    "tasksignal.control",
    "tasksignal.exceptions",
    "tasksignal.filters",
    "tasksignal.kill",
    "tasksignal.lineage",
    "tasksignal.node",
    "tasksignal.notify",
    "tasksignal.processes",
    "tasksignal.runtime",
    "tasksignal.shapes",
    "tasksignal.states",
    "tasksignal.waiting",
]


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_in_the_runtime_modules_hold(name):
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"{name} has no examples to check"
    assert failed == 0, f"{failed} of {attempted} examples in {name} are wrong"
