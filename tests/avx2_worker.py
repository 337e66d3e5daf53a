"""Runs exported programs in Paddle Inference for :class:`avx2_kernels.Avx2Runner`, under the
ISA cap its environment sets. One JSON request per input line: ``prefix`` and either
``directory`` (holding ``inputs.npz``; the outputs of ``calls`` runs on ``num_threads``
threads, one by default, are written to ``outputs.npz`` there, call after call) or
``report`` (the reply carries ``int8_report``'s fields). One JSON reply line each."""

import dataclasses
import json
import os
import sys
import traceback

import numpy as np

from imperative_ptq.export import create_predictor, int8_report, predict


def _serve(request: dict) -> dict:
    if request.get("report"):
        return {"report": dataclasses.asdict(int8_report(request["prefix"]))}
    with np.load(f"{request['directory']}/inputs.npz") as data:
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    predictor = create_predictor(request["prefix"], num_threads=request.get("num_threads", 1))
    outputs = [output for _ in range(request.get("calls", 1)) for output in predict(predictor, *inputs)]
    np.savez(f"{request['directory']}/outputs.npz", *outputs)
    return {"ok": True}


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever Paddle writes to stdout must not mix with the replies
    for line in sys.stdin:
        try:
            reply = _serve(json.loads(line))
        except Exception:  # reported to the test, which fails naming it
            reply = {"error": traceback.format_exc()[-2000:]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
