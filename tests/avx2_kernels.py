"""Paddle Inference with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``): the arithmetic
of a CPU without VNNI, on this one. The cap is read when oneDNN starts, so tests send their
exported files to a subprocess that started with it (:class:`Avx2Runner`)."""

from __future__ import annotations

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
        directory = pathlib.Path(tempfile.mkdtemp(prefix="avx2_"))
        try:
            np.savez(directory / "inputs.npz", *inputs)
            self._request({"prefix": os.fspath(path_prefix), "directory": str(directory)})
            with np.load(directory / "outputs.npz") as outputs:
                return [outputs[f"arr_{i}"] for i in range(len(outputs.files))]
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


def on_avx2(avx2_runner: Avx2Runner | None, target: str) -> Avx2Runner | None:
    """The AVX2-kernel runner where ``target``'s export must be exact on AVX2 kernels too
    (``x86``; ``x86-vnni`` saturates there by design)."""
    return avx2_runner if target == "x86" else None


def paddle_inference_outputs(
    path_prefix: str | os.PathLike, inputs: Sequence[np.ndarray], avx2_runner: Avx2Runner | None,
    on_avx2: bool = True,
) -> dict[str, list[np.ndarray]]:
    """Paddle Inference's outputs (one thread) on this CPU's kernels (``"native"``) and, when
    ``avx2_runner`` is given and ``on_avx2`` (False for exports meant for VNNI only), on
    oneDNN's AVX2 kernels (``"AVX2 kernels"``)."""
    from imperative_ptq.export import create_predictor, predict

    outputs = {"native": predict(create_predictor(path_prefix, num_threads=1), *inputs)}
    if avx2_runner is not None and on_avx2:
        outputs["AVX2 kernels"] = avx2_runner.predict(path_prefix, *inputs)
    return outputs
