"""benchmarks/export_time.py: its table, and the export it times writes the same program
with and without Paddle's re-sync after every edit (the script raises otherwise)."""

from __future__ import annotations

import importlib.util
import pathlib

from imperative_ptq import cpu_info

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "export_time.py"


def test_export_time_benchmark_prints_its_table(capsys) -> None:
    spec = importlib.util.spec_from_file_location("export_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--models", "resnet18", "--size", "32", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert cpu_info().describe() in lines[0]
    row = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert row[0] == "resnet18" and int(row[1]) > 100
    assert all(float(cell.rstrip("x")) > 0 for cell in row[2:])
