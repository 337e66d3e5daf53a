"""benchmarks/lstm_runtimes.py runs end to end on a small LSTM and prints, for every runtime,
a latency and the cosine of its output to the form's own simulation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imperative_ptq import cpu_info
from checkout import checkout_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lstm_runtimes_benchmark_prints_its_table() -> None:
    pytest.importorskip("onnxruntime")
    script = os.path.join(ROOT, "benchmarks", "lstm_runtimes.py")
    done = subprocess.run(
        [sys.executable, script, "--features", "8", "--hidden", "16", "--steps", "6",
         "--batches", "1,3", "--rounds", "1", "--iters", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=checkout_env(GLOG_minloglevel="2"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line]
    assert cpu_info().describe() in lines[0]
    header = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert header == ["batch", "paddle fp32", "paddle int8", "ort int8 scan", "ort lstm fp32"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    assert [row[0] for row in rows] == ["1", "3"]
    for row in rows:
        cosines = [float(cell.split("(")[1].rstrip(")")) for cell in row[1:]]
        # Every runtime computes its form's simulation (measured 0.9997-1.0).
        assert min(cosines) >= 0.999, row
