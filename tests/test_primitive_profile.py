"""benchmarks/primitive_profile.py runs end to end on a small model and sums what oneDNN reports
(its numbers are timings, so only their presence and consistency are checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from checkout import checkout_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_profile_of_lenet_lists_its_primitives_and_totals() -> None:
    script = os.path.join(ROOT, "benchmarks", "primitive_profile.py")
    done = subprocess.run(
        [sys.executable, script, "--model", "lenet", "--batch", "2", "--repeats", "1", "--runs", "1"],
        capture_output=True, text=True, timeout=600, env=checkout_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms |" not in line]
    calls = {row.split("|")[1].strip(): (int(row.split("|")[3]), int(row.split("|")[5])) for row in rows}
    # LeNet's two convs run in oneDNN in both exports; the int8 one quantizes in reorders.
    convolutions = [counts for kind, counts in calls.items() if kind.startswith("convolution")]
    assert [sum(counts) for counts in zip(*convolutions)] == [2, 2], done.stdout
    assert sum(counts[1] for kind, counts in calls.items() if kind.startswith("reorder")) >= 2
    total = re.search(r"oneDNN total: fp32 ([\d.]+) ms, int8 ([\d.]+) ms", done.stdout)
    assert total and float(total.group(2)) > 0, done.stdout
