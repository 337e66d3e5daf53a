"""convert compares its int8 simulation with the fp32 model on up to four calibration calls
drawn from all of them: the cosine of each output is logged, a low one warned of; the calls'
inputs are copies; the trial converts of QAT and the accuracy search stay quiet."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.accuracy_control import Candidate
from imperative_ptq.session import COMPARED_CALLS, calibrating_session
from imperative_ptq.simulation_check import WARN_BELOW

LOGGER = "imperative_ptq.simulation_check"


class _TwoHeads(paddle.nn.Layer):
    """A dict of two float outputs and an integer one (not compared)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = paddle.nn.Sequential(paddle.nn.Linear(16, 64), paddle.nn.ReLU())
        self.scores, self.boxes = paddle.nn.Linear(64, 8), paddle.nn.Linear(64, 4)

    def forward(self, x):
        features = self.body(x)
        scores = self.scores(features)
        return {"scores": scores, "boxes": self.boxes(features), "labels": scores.argmax(-1)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The slow, obvious reference."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def _calibrated(bits: int, batches):
    paddle.seed(0)
    model = _TwoHeads()
    model.eval()
    config = ip.PTQConfig(
        ip.AbsmaxQuantizer(quant_bits=bits), ip.PerChannelAbsmaxQuantizer(quant_bits=bits), target="arm"
    )
    ptq = ip.ImperativePTQ(config)
    qmodel = ptq.quantize(model)
    for x in batches:
        qmodel(x)
    return model, ptq, qmodel


@pytest.mark.parametrize("bits, warned", [(8, False), (2, True)])
def test_each_float_output_is_compared_on_the_last_calibration_call(bits, warned, caplog) -> None:
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((8, 16)).astype(np.float32)) for _ in range(3)]
    model, ptq, qmodel = _calibrated(bits, batches)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ptq.convert(qmodel)
    expected = [
        _cosine(
            np.concatenate([qmodel(x)[key].numpy().ravel() for x in batches]),
            np.concatenate([model(x)[key].numpy().ravel() for x in batches]),
        )
        for key in ("scores", "boxes")
    ]
    assert (min(expected) < WARN_BELOW) == warned, expected
    ours = [record for record in caplog.records if record.name == LOGGER]
    logged = [record.getMessage() for record in ours if record.levelno == logging.INFO]
    assert logged == [
        "convert: on 3 calibration batches the int8 simulation's output has cosine "
        + ", ".join(f"{cosine:.4f}" for cosine in expected) + " to the fp32 model's"
    ], logged
    warnings = [record.getMessage() for record in ours if record.levelno == logging.WARNING]
    if warned:
        worst = int(np.argmin(expected))
        assert len(warnings) == 1 and warnings[0].startswith(
            f"convert: on 3 calibration batches the int8 simulation's output {worst} has cosine "
            f"{expected[worst]:.3f} to the fp32 model's (below {WARN_BELOW:.2f})"
        ), warnings
        assert "analysis.analyze" in warnings[0] and "keep_fp32" in warnings[0]
        assert "quantize_with_accuracy_control(model, data, evaluate, max_drop)" in warnings[0]
    else:
        assert warnings == []


def test_the_calls_are_copies_of_inputs_the_caller_refills(caplog) -> None:
    """A loader writing each batch into one buffer: the buffer holds the next data when
    convert runs; compared on the copies, the 8-bit model stays quiet and its cosine is right."""
    rng = np.random.default_rng(0)
    buffer = paddle.zeros([8, 16])
    batches = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    model, ptq, qmodel = _calibrated(8, [])
    for batch in batches:
        paddle.assign(paddle.to_tensor(batch), output=buffer)
        qmodel(buffer)
    paddle.assign(paddle.to_tensor(100 * rng.standard_normal((8, 16)).astype(np.float32)), output=buffer)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ptq.convert(qmodel)
    expected = _cosine(
        np.concatenate([qmodel(paddle.to_tensor(x))["scores"].numpy().ravel() for x in batches]),
        np.concatenate([model(paddle.to_tensor(x))["scores"].numpy().ravel() for x in batches]),
    )
    ours = [record for record in caplog.records if record.name == LOGGER]
    assert len(ours) == 1 and f"has cosine {expected:.4f}, " in ours[0].getMessage(), caplog.text
    assert ours[0].levelno == logging.INFO


def test_qat_and_the_accuracy_search_trial_converts_do_not_compare(caplog) -> None:
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((8, 16)).astype(np.float32)) for _ in range(2)]
    _, ptq, qmodel = _calibrated(2, batches)
    ptq.remove_hooks(qmodel)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ip.ImperativeQAT(ptq).quantize(qmodel)
    assert [record for record in caplog.records if record.name == LOGGER] == []
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 64), paddle.nn.ReLU(), paddle.nn.Linear(64, 8))
    model.eval()
    two_bits = ip.PTQConfig(ip.AbsmaxQuantizer(quant_bits=2), ip.PerChannelAbsmaxQuantizer(quant_bits=2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ip.quantize_with_accuracy_control(
            model, batches, lambda m: -float(paddle.abs(m(batches[0]) - model(batches[0])).mean()),
            max_drop=1e-9, candidates=[Candidate("two bits", two_bits)],
        )
    assert [record for record in caplog.records if record.name == LOGGER] == []


def test_nothing_is_compared_without_a_calibration_call(tmp_path, caplog) -> None:
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((8, 16)).astype(np.float32))]
    _, ptq, qmodel = _calibrated(8, batches)
    table = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, table)
    _, loading, loaded = _calibrated(8, [])
    loading.load_calibration_table(loaded, table)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loading.convert(loaded)
    assert [record for record in caplog.records if record.name == LOGGER] == []


def test_the_calls_compared_are_drawn_from_all_calls() -> None:
    """Not the last ones only: one batch decided the warning by its data before (a voice
    detector's calibration batches gave cosines from 0.76 to 0.99; silence the lowest)."""
    batches = [paddle.full([2, 16], float(index)) for index in range(20)]
    _, _, qmodel = _calibrated(8, batches)
    kept = sorted(int(args[0][0, 0]) for args, _, _ in calibrating_session(qmodel).compared_calls)
    assert len(kept) == COMPARED_CALLS == 4 and len(set(kept)) == 4
    assert kept[0] < 16, kept  # (seeded: the same calls every time)
