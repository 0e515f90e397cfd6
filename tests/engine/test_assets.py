"""Files inside installed packages are found through the package's metadata, and a missing package or file is
refused with the caller's own error type and a sentence saying what to run."""

import importlib.util
from pathlib import Path

import pytest

from engine.assets import package_path


class PageError(ValueError):
    pass


def test_a_file_of_an_installed_package_is_where_python_imports_it_from():
    found = package_path("torch", "torch/__init__.py")
    assert found.resolve() == Path(importlib.util.find_spec("torch").origin).resolve()


def test_a_package_that_is_not_installed_is_refused_with_the_callers_error_and_the_setup_command():
    with pytest.raises(PageError, match=r"the data package no-such-dist-xyz is not installed; run `make setup`"):
        package_path("no-such-dist-xyz", "x", PageError, "the data package")


def test_a_path_missing_from_an_installed_package_is_refused_with_where_it_was_looked_for():
    with pytest.raises(PageError, match=r"torch is installed but torch/no_such_file.bin is missing at .*no_such_file"):
        package_path("torch", "torch/no_such_file.bin", PageError)
