"""Finished tiny runs shared by the analysis tests, each trained once for the whole folder."""

import importlib.util
from pathlib import Path

import pytest

from dscl.cli import main


def _root_conftest():
    spec = importlib.util.spec_from_file_location("_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Test modules elsewhere do `from conftest import TINY`; whichever conftest Python finds first
# under that name, it must offer the same settings.
TINY = list(_root_conftest().TINY)


def _train(folder: Path, method: str, *more: str) -> Path:
    sets = [x for o in TINY + [f"method={method}", *more] for x in ("--set", o)]
    assert main(["run", "--out", str(folder), *sets]) == 0
    return folder


@pytest.fixture(scope="package")
def scl_run(tmp_path_factory) -> Path:
    """A finished scl run (stage 1, stage 2, results, plots) on the tiny synthetic set."""
    return _train(tmp_path_factory.mktemp("runs") / "scl", "scl")


@pytest.fixture(scope="package")
def ce_run(tmp_path_factory) -> Path:
    """A finished end-to-end ce run on the same data."""
    return _train(tmp_path_factory.mktemp("runs") / "ce", "ce")


@pytest.fixture(scope="package")
def experts_run(tmp_path_factory) -> Path:
    """A finished scl run with model.experts=3 (RIDE-style experts) on the same data."""
    return _train(tmp_path_factory.mktemp("runs") / "experts", "scl", "model.experts=3")
