"""Edge cases at the package's entry points: the command line, ``predict`` and the
quantized model's inputs, and calibration never running with dropout active."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import paddle
import pytest

from imperative_ptq.cli import main

CWD_MODULE = textwrap.dedent(
    """
    from paddle import nn

    def build():
        return nn.Sequential(nn.Linear(4, 3))
    """
)


def _linear_data(folder, files: int = 2, shape=(2, 4)) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        np.save(folder / f"b{i}.npy", rng.standard_normal(shape).astype(np.float32))


# ----------------------------------------------------------------- 1. module from the cwd
def test_cli_imports_module_from_current_directory(tmp_path, monkeypatch, capsys) -> None:
    """The console script has its own folder, not the cwd, on sys.path: ``--model mod:fn``
    must still find ``mod.py`` in the cwd, as ``python -m imperative_ptq`` does."""
    module = "newcomer_cwd_model"
    (tmp_path / f"{module}.py").write_text(CWD_MODULE)
    _linear_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    # As the console script starts: neither '' nor the cwd on sys.path (restored afterwards).
    monkeypatch.setattr(
        sys, "path",
        [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)],
    )
    monkeypatch.delitem(sys.modules, module, raising=False)
    try:
        status = main(["--model", f"{module}:build", "--data", "data", "--output", "out/m",
                       "--no-export", "-q", "--algorithm", "abs_max"])
    finally:
        sys.modules.pop(module, None)
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "m.calibration.json").exists()
