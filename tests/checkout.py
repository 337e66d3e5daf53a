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
