"""Every module that moved still imports from its old path, as the new module, with a DeprecationWarning."""

import importlib
import importlib.machinery
import sys
import warnings

import pytest

from flashlm._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_new_module_with_warning(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is new


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_has_no_file_left(old):
    """An old path is served by the table alone: a stale file there would shadow nothing but confuse."""
    parent = old.rpartition(".")[0]
    package = importlib.import_module(parent)
    spec = importlib.machinery.PathFinder.find_spec(old, package.__path__)
    assert spec is None, f"{old} still has a file ({spec.origin}); delete it, MOVED serves the old path"


def test_unmoved_modules_import_without_warning():
    sys.modules.pop("flashlm.errors", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        importlib.import_module("flashlm.errors")
