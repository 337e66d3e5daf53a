"""Re-running a test file's tests with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``):
the arithmetic of a CPU without VNNI, on this one. The cap is read when oneDNN starts, so the
tests run again in a subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_on_avx2_kernels(test_file: str | os.PathLike, selection: str, timeout: int = 600) -> str:
    """Runs the tests of ``test_file`` that ``-k selection`` picks on AVX2 kernels, asserts the
    run passed, and returns pytest's summary line."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
         "-k", selection],
        env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", GLOG_minloglevel="2"),
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout.splitlines()[-1]
