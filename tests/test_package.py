"""The package root: every exported name resolves (lazily), and ``inpars.Run`` is the workspace run."""

from __future__ import annotations

import importlib

import pytest

import inpars


def test_every_exported_name_resolves():
    for name in inpars.__all__:
        assert getattr(inpars, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        inpars.no_such_name  # noqa: B018


def test_run_and_run_stage_are_exported():
    assert inpars.Run is importlib.import_module("inpars.workspace").Run
    assert inpars.run_stage is importlib.import_module("inpars.workers").run_stage
    assert {"Run", "run_stage", "read_run", "write_run", "fuse_runs"} <= set(inpars.__all__)
    assert inpars.read_run is importlib.import_module("inpars.runs").read_run
