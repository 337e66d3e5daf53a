"""Paddle Inference with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``): the arithmetic
of a CPU without VNNI, on this one. The cap is read when oneDNN starts, so tests send their
exported files to a subprocess that started with it (:class:`Avx2Runner`).

Each export is checked on the kernels its target promises to be exact on
(:func:`paddle_inference_outputs`): an ``x86-avx2`` export on oneDNN's AVX2 kernels (under the
cap where this CPU's int8 kernels are others), an ``x86-vnni`` export never under the cap."""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np
from checkout import ROOT, checkout_env


class Avx2Runner:
    """Paddle Inference on AVX2 kernels, in one long-lived subprocess (``avx2_worker.py``):
    a test exports once and runs the files natively and here, instead of a second pytest run
    redoing its calibration and export. Requests and replies are one JSON line each."""

    def __init__(self, timeout: float = 300) -> None:
        self._timeout = timeout
        self._process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "avx2_worker.py")],
            env=checkout_env(ONEDNN_MAX_CPU_ISA="AVX2", GLOG_minloglevel="2"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, cwd=ROOT,
        )

    def predict(self, path_prefix: str | os.PathLike, *inputs: np.ndarray) -> list[np.ndarray]:
        """Outputs of ``create_predictor(path_prefix, num_threads=1)`` on AVX2 kernels."""
        return self.predict_calls(path_prefix, inputs, calls=1, num_threads=1)[0]

    def predict_calls(
        self, path_prefix: str | os.PathLike, inputs: Sequence[np.ndarray], calls: int, num_threads: int,
    ) -> list[list[np.ndarray]]:
        """The outputs of ``calls`` runs of ``inputs`` through one predictor of
        ``create_predictor(path_prefix, num_threads)`` on AVX2 kernels, a list per call."""
        directory = pathlib.Path(tempfile.mkdtemp(prefix="avx2_"))
        try:
            np.savez(directory / "inputs.npz", *inputs)
            self._request({
                "prefix": os.fspath(path_prefix), "directory": str(directory), "calls": calls,
                "num_threads": num_threads,
            })
            with np.load(directory / "outputs.npz") as outputs:
                count = len(outputs.files) // calls
                return [[outputs[f"arr_{call * count + i}"] for i in range(count)] for call in range(calls)]
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def report(self, path_prefix: str | os.PathLike) -> dict:
        """``int8_report(path_prefix)``'s fields, as Paddle Inference's passes run on AVX2."""
        reply = self._request({"prefix": os.fspath(path_prefix), "report": True})
        return reply["report"]

    def _request(self, request: dict) -> dict:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        reply = json.loads(self._process.stdout.readline() or '{"error": "worker died"}')
        if "error" in reply:
            raise RuntimeError(f"AVX2 worker failed on {request['prefix']}: {reply['error']}")
        return reply

    def close(self) -> None:
        """Ends the worker (it exits when its input closes)."""
        self._process.stdin.close()
        self._process.wait(self._timeout)


_SHARED: list[Avx2Runner] = []


def shared_runner() -> Avx2Runner | None:
    """This process's :class:`Avx2Runner` (started on first use, ended at exit), or ``None``
    where this CPU's int8 kernels are AVX2 already."""
    import imperative_ptq as ip

    if ip.cpu_info().isa == "avx2":
        return None
    if not _SHARED:
        _SHARED.append(Avx2Runner())
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


def exact_natively(target: str | None) -> bool:
    """Whether this CPU's own int8 kernels are those ``target``'s export is written for: all
    but ``x86-avx2`` where they are not AVX2 (an ``x86-vnni`` export is run natively on every
    CPU: exact with VNNI, and without it exact wherever no int8 layer reads a signed input)."""
    import imperative_ptq as ip

    return target != "x86-avx2" or ip.cpu_info().isa == "avx2"


def on_avx2(avx2_runner: Avx2Runner | None, target: str) -> Avx2Runner | None:
    """The AVX2-kernel runner where ``target``'s export must be exact on AVX2 kernels too
    (``x86``; ``x86-vnni`` saturates there by design)."""
    return avx2_runner if target == "x86" else None


def paddle_inference_outputs(
    path_prefix: str | os.PathLike, inputs: Sequence[np.ndarray], avx2_runner: Avx2Runner | None,
    on_avx2: bool = True,
) -> dict[str, list[np.ndarray]]:
    """Paddle Inference's outputs (one thread) on the kernels the export's target is exact on.

    Returns:
        ``"native"``: this CPU's kernels, unless :func:`exact_natively` says the target's are
        others. ``"AVX2 kernels"``: oneDNN's AVX2 kernels (under the cap where this CPU's
        int8 kernels are others), for an ``x86-avx2`` export always and for an ``x86`` export
        when ``avx2_runner`` is given and ``on_avx2``; never for an ``x86-vnni`` export, which
        saturates there by design.
    """
    from imperative_ptq.export import create_predictor, predict
    from imperative_ptq.export.predictor import exported_target

    target = exported_target(os.fspath(path_prefix))
    outputs = {}
    if exact_natively(target):
        outputs["native"] = predict(create_predictor(path_prefix, num_threads=1), *inputs)
    runner = shared_runner() if target == "x86-avx2" else avx2_runner if on_avx2 and target != "x86-vnni" else None
    if runner is not None:
        outputs["AVX2 kernels"] = runner.predict(path_prefix, *inputs)
    return outputs
