"""benchmarks/onnx_pads.py: its table; the net whose zero pads ``load_onnx_model`` folds into
its convs computes exactly what the net written with the padding in its convs computes."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from imperative_ptq import cpu_info

pytest.importorskip("onnx")
pytest.importorskip("x2paddle")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "onnx_pads.py"


def test_onnx_pads_benchmark_prints_its_table(capsys) -> None:
    spec = importlib.util.spec_from_file_location("onnx_pads", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--size", "32", "--batch", "2", "--rounds", "1", "--iters", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert cpu_info().describe() in lines[0]
    rows = {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:])}
    assert list(rows) == [
        "pad ops, as x2paddle writes them", "pads folded into the convs (load_onnx_model)", "padding in the convs in the file",
    ]
    assert all(float(cells[0]) > 0 for cells in rows.values())
    assert float(rows["pads folded into the convs (load_onnx_model)"][2]) == 0.0
