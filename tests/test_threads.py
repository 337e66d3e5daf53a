"""Two ImperativePTQ sessions calibrating two models in two threads give the tables they give
one after the other (see docs/api.md, "Threads")."""

from __future__ import annotations

import threading

import numpy as np
import paddle

from imperative_ptq import HistQuantizer, ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig


def _conv_net() -> paddle.nn.Layer:
    paddle.seed(1)
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.Flatten(), paddle.nn.Linear(8 * 16 * 16, 10),
    )


def _mlp() -> paddle.nn.Layer:
    paddle.seed(2)
    return paddle.nn.Sequential(
        paddle.nn.Linear(64, 128), paddle.nn.ReLU(), paddle.nn.Linear(128, 10)
    )


def _jobs() -> list[tuple]:
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((8, 3, 16, 16)).astype(np.float32) * (i + 1) for i in range(6)]
    vectors = [rng.standard_normal((32, 64)).astype(np.float32) * (i + 1) for i in range(6)]
    # Built here, in one thread: paddle.seed and the parameter initializers share one global
    # generator, so models built in two threads at once get interleaved random weights.
    return [
        (PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()), _conv_net(), images),
        (PTQConfig(HistQuantizer(), PerChannelAbsmaxQuantizer()), _mlp(), vectors),
    ]


def _calibrate(config: PTQConfig, model, batches, start: threading.Barrier | None = None) -> dict:
    ptq = ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    if start is not None:
        start.wait()
    ptq.calibrate(qmodel, batches, progress=False)
    return ptq.calibration_table(qmodel)


def test_two_sessions_in_two_threads_give_the_sequential_tables() -> None:
    sequential = [_calibrate(*job) for job in _jobs()]
    for _ in range(3):
        jobs = _jobs()
        results: list = [None, None]
        start = threading.Barrier(2)

        def run(index: int) -> None:
            try:
                results[index] = _calibrate(*jobs[index], start)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                results[index] = error

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        assert results == sequential


def test_export_outside_the_main_thread_is_a_clear_error(tmp_path) -> None:
    """Paddle 3.3.1 enters static-graph mode only in the main thread: an export elsewhere
    failed deep inside Paddle; it is refused up front and writes nothing."""
    config, model, batches = _jobs()[1]
    ptq = ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, batches, progress=False)
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, 64], "float32", "x")]
    errors: list[BaseException] = []

    def export() -> None:
        try:
            ptq.save_quantized_model(qmodel, tmp_path / "model", spec)
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    thread = threading.Thread(target=export)
    thread.start()
    thread.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "must run in the main thread" in str(errors[0])
    assert list(tmp_path.iterdir()) == []
    ptq.save_quantized_model(qmodel, tmp_path / "model", spec)  # the main thread exports
    assert (tmp_path / "model.pdmodel").exists()
