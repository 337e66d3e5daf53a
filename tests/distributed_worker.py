"""Worker for the two-process distributed calibration test (spawned by paddle.distributed)."""

from __future__ import annotations

import json
import os

import numpy as np


def shard_batches(rank: int) -> list[np.ndarray]:
    """The calibration batches of one rank; each rank's data has another scale."""
    rng = np.random.default_rng(rank)
    return [rng.standard_normal((1024, 8)).astype("float32") * (rank + 1) for _ in range(3)]


def build_model():
    import paddle

    paddle.seed(0)
    return paddle.nn.Sequential(
        paddle.nn.Linear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 4)
    )


ALGORITHMS = ("AbsmaxQuantizer", "KLQuantizer", "HistQuantizer")


def run(out_dir: str) -> None:
    """Calibrates this rank's shard with each algorithm, syncs, and writes the tables."""
    import paddle
    import paddle.distributed as dist

    import imperative_ptq

    dist.init_parallel_env()
    rank = dist.get_rank()
    for algorithm in ALGORITHMS:
        config = imperative_ptq.PTQConfig(
            getattr(imperative_ptq, algorithm)(), imperative_ptq.PerChannelAbsmaxQuantizer()
        )
        ptq = imperative_ptq.ImperativePTQ(config)
        qmodel = ptq.quantize(build_model())
        for batch in shard_batches(rank):
            qmodel(paddle.to_tensor(batch))
        ptq.sync(qmodel)
        ptq.save_state(qmodel, os.path.join(out_dir, f"rank{rank}_{algorithm}.npz"))
        with open(os.path.join(out_dir, f"rank{rank}_{algorithm}.json"), "w") as file:
            json.dump(ptq.calibration_table(qmodel), file)
