"""The environment of a Python subprocess that a test starts (a benchmark script, a worker
under an ISA cap, a user's script): it imports ``imperative_ptq`` from this checkout, like the
test process itself, whichever copy of the package pip installed (an editable install of
another clone, or none)."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def checkout_env(**variables: str) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH`` and ``variables`` set."""
    path = os.pathsep.join(part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part)
    return dict(os.environ, PYTHONPATH=path, **variables)


def onednn_executions(prefix: str | os.PathLike, x, directory: pathlib.Path, primitive: str) -> list[str]:
    """oneDNN's verbose lines (``ONEDNN_VERBOSE=1``) for the ``primitive`` kind (``pooling``,
    ``batch_normalization``, ...) it executed while a fresh process ran the exported model at
    ``prefix`` on ``x`` (a numpy array, saved in ``directory``) with one thread."""
    import subprocess
    import sys

    import numpy as np

    np.save(pathlib.Path(directory) / "x.npy", x)
    script = (
        "import numpy as np; from imperative_ptq.export import create_predictor, predict; "
        f"predict(create_predictor({str(prefix)!r}, num_threads=1), np.load({str(pathlib.Path(directory) / 'x.npy')!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=checkout_env(ONEDNN_VERBOSE="1"), capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if ",exec," in line and f",{primitive}," in line]
