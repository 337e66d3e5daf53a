"""A fc's ReLU read by int8 fcs runs as u8 codes written by the fc itself (x86 targets).

The export keeps the fc's ``relu`` (Paddle then runs its output u8) and adds a ``relu6`` on
the output scaled by a factor near ``6 / t``; Paddle fuses both into the fc, which writes codes
0..127 straight into its readers, instead of an fp32 output, a clip, a relu and a quantize op.
Paddle's fc recomputes its int8 weight from the stored one (``quant_layers.paddle_fc_weight``),
whose float32 roundings can flip weight values next to a half code once the stored thresholds
are scaled, so the factor is one with which every scaled fc keeps the codes the simulation
computes with (``export.unsigned``)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.export import create_predictor, int8_report, predict
from imperative_ptq.export import unsigned
from imperative_ptq import quant_layers
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program
from imperative_ptq.quant_layers import (
    FcRecomputation, fc_runtime_integers, quantize_weight, stored_weight_thresholds, untied_fc_integers,
)
from ties import relative_error, simulation_up_to_ties


def _fc_codes_by_loops(integers: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Slow reference of the int8 weight Paddle's fc derives from 8-bit ``[in, out]`` codes
    stored with per-column ``thresholds``: each element dequantized as float32(code / 127)
    times its float32 threshold, output channel ``i``'s scale the abs-max of the ``i``-th run
    of ``in`` consecutive elements, ``w * (127 * (1 / max))`` rounded half to even, in float32."""
    inputs, outputs = integers.shape
    dequantized = np.empty(integers.shape, np.float32)
    for row in range(inputs):
        for column in range(outputs):
            code = np.float32(float(integers[row, column]) / 127.0)
            dequantized[row, column] = np.float32(code * np.float32(thresholds[column]))
    flat = dequantized.reshape(-1)
    codes = np.empty(integers.shape, np.int32)
    for column in range(outputs):
        largest = np.float32(max(abs(float(v)) for v in flat[column * inputs:(column + 1) * inputs]))
        multiplier = np.float32(np.float32(127) * np.float32(np.float32(1) / largest))
        for row in range(inputs):
            codes[row, column] = min(127, max(-128, int(np.rint(np.float32(dequantized[row, column] * multiplier)))))
    return codes


def test_fc_runtime_integers_match_the_slow_reference() -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((24, 10)) * np.exp(rng.standard_normal(10))).astype(np.float32)
    thresholds = np.abs(weight).max(axis=0)
    integers = quantize_weight(weight, thresholds, 8, 1)
    for factor in (1.0, 6 / 2.83, 2.83 / 6):
        scaled = stored_weight_thresholds(thresholds, weight.shape, 1, factor)
        np.testing.assert_array_equal(
            fc_runtime_integers(integers, scaled, 8, 1), _fc_codes_by_loops(integers, scaled)
        )


def test_the_recomputation_check_agrees_with_the_whole_recomputation() -> None:
    """``FcRecomputation`` recomputes only the values next to a half code and each run's
    abs-max; on 400 scalings of two weights (one of them square, stored per tensor) it says
    what comparing the whole recomputed weights says, flips found included."""
    rng = np.random.default_rng(2)
    found = {True: 0, False: 0}
    for shape in ((256, 96), (48, 48)):
        weight = (0.1 * rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[1]))).astype(np.float32)
        thresholds = np.abs(weight).max(axis=0)
        stored = stored_weight_thresholds(thresholds, shape, 1)
        integers = quantize_weight(weight, stored, 8, 1)
        kept = fc_runtime_integers(integers, stored, 8, 1)
        check = FcRecomputation(integers, stored, 8, 1)
        for factor in np.exp(rng.uniform(-2, 2, 200)):
            scaled = stored_weight_thresholds(thresholds, shape, 1, float(factor))
            whole = bool(np.array_equal(fc_runtime_integers(integers, scaled, 8, 1), kept))
            assert check.keeps_codes(scaled) == whole, (shape, factor)
            found[whole] += 1
    assert found[True] and found[False], found  # both outcomes occur


def _untied_by_loops(integers: np.ndarray, weight: np.ndarray, threshold: float) -> np.ndarray:
    """Slow reference for codes stored on one threshold: output channel ``j``'s scale is the
    largest code ``m`` of the ``j``-th run of ``in`` consecutive elements of the row-major
    weight (Paddle's fc), so code ``c`` of column ``j`` recomputes to exactly ``127 c / m``;
    where that is a half code, ``c`` moves one code towards ``weight / step`` (down when
    equal), again until none is (a moved code may be its run's largest)."""
    inputs, outputs = integers.shape
    steps = weight / np.float32(threshold / 127)
    moved = integers.astype(np.int64).copy()
    while True:
        flat = moved.reshape(-1).copy()
        tied = []
        for column in range(outputs):
            largest = max(abs(int(flat[i])) for i in range(column * inputs, (column + 1) * inputs))
            for row in range(inputs):
                exact = Fraction(127 * int(moved[row, column]), largest) if largest else Fraction(0)
                if exact - (exact.numerator // exact.denominator) == Fraction(1, 2):
                    tied.append((row, column))
        if not tied:
            return moved
        for row, column in tied:
            moved[row, column] += 1 if steps[row, column] > integers[row, column] else -1


def _square_weight(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A square weight and the one threshold the export stores it with."""
    rng = np.random.default_rng(seed)
    weight = (0.1 * rng.standard_normal((size, size)) * np.exp(0.5 * rng.standard_normal(size))).astype(np.float32)
    return weight, stored_weight_thresholds(np.abs(weight).max(axis=0), weight.shape, 1)


def test_codes_on_half_codes_of_the_recomputation_move_as_the_slow_reference_says() -> None:
    for seed in (0, 1, 28):  # seed 28 needs a second round
        weight, stored = _square_weight(seed)
        integers = quantize_weight(weight, stored, 8, 1)
        expected = _untied_by_loops(integers, weight, float(stored[0]))
        assert (expected != integers).sum() > 0  # the case exists: c = m / 2 of an even m
        np.testing.assert_array_equal(untied_fc_integers(integers, weight, stored, 8, 1), expected)
    # Per-channel thresholds of a non-square weight: no exact half codes, nothing moves.
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((40, 24)).astype(np.float32)
    thresholds = np.abs(weight).max(axis=0)
    integers = quantize_weight(weight, thresholds, 8, 1)
    assert untied_fc_integers(integers, weight, thresholds, 8, 1) is integers


def test_untied_codes_keep_their_recomputation_under_any_scaling() -> None:
    """Once no code recomputes to a half code, every scaling of the stored threshold keeps
    the fc's runtime codes (the u8 route's factor is free); the rounded codes do not."""
    weight, stored = _square_weight(0)
    integers = quantize_weight(weight, stored, 8, 1)
    untied = untied_fc_integers(integers, weight, stored, 8, 1)
    factors = np.exp(np.random.default_rng(0).uniform(-2, 2, 200))
    scalings = [stored_weight_thresholds(stored, weight.shape, 1, float(f)) for f in factors]
    assert all(FcRecomputation(untied, stored, 8, 1).keeps_codes(s) for s in scalings)
    assert not all(FcRecomputation(integers, stored, 8, 1).keeps_codes(s) for s in scalings)
    # The moved codes are still the nearest codes but one: within 1.5 steps of the weight.
    step = float(stored[0]) / 127
    assert np.abs(untied * step - weight).max() <= 1.5 * step


def _chain(seed: int) -> paddle.nn.Layer:
    paddle.seed(seed)
    model = paddle.nn.Sequential(paddle.nn.Linear(256, 96), paddle.nn.ReLU(), paddle.nn.Linear(96, 32))
    model.eval()
    return model


def _positive(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.abs(rng.standard_normal(shape)).astype("float32")


def _converted(
    model: paddle.nn.Layer, batches: list[np.ndarray]
) -> tuple[ip.ImperativePTQ, paddle.nn.Layer, dict]:
    """``model`` calibrated on ``batches`` (KL, per-channel weights, x86) and converted; the
    calibration table."""
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    for batch in batches:
        qmodel(paddle.to_tensor(batch))
    table = ptq.calibration_table(qmodel)
    ptq.convert(qmodel)
    return ptq, qmodel, table


def _flips_at(model: paddle.nn.Layer, table: dict, factor: float) -> int:
    """How many of the first Linear's runtime weight codes scaling its thresholds by
    ``factor`` changes."""
    weight = model[0].weight.numpy()
    thresholds = np.asarray(table["0"]["weight"], np.float32)
    stored = stored_weight_thresholds(thresholds, weight.shape, 1)
    integers = quantize_weight(weight, stored, 8, 1)
    scaled = stored_weight_thresholds(thresholds, weight.shape, 1, factor)
    return int((fc_runtime_integers(integers, scaled, 8, 1) != fc_runtime_integers(integers, stored, 8, 1)).sum())


def _export(ptq, qmodel, prefix: str, x: np.ndarray):
    """Exports ``qmodel`` for inputs shaped like ``x``: the program's op types, its int8 report
    and Paddle Inference's output for ``x`` off the simulation's, up to rounding ties."""
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, *x.shape[1:]], "float32", "x")])
    with legacy_static_mode():
        ops = [op.type for op in load_legacy_program(prefix).program.global_block().ops]
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 2e-6)
    return ops, int8_report(prefix), relative_error(ran, simulated)


def _exported_mlp(seed: int, sizes: tuple[int, int, int, int], prefix: str):
    """A Linear-ReLU-Linear-ReLU-Linear MLP of ``sizes`` calibrated on positive data (seeded),
    converted and exported: the converted model, the int8 report and the runtime's error."""
    paddle.seed(seed)
    model = paddle.nn.Sequential(
        paddle.nn.Linear(*sizes[:2]), paddle.nn.ReLU(), paddle.nn.Linear(*sizes[1:3]), paddle.nn.ReLU(),
        paddle.nn.Linear(*sizes[2:]),
    )
    model.eval()
    rng = np.random.default_rng(seed)
    ptq, qmodel, _ = _converted(model, [_positive(rng, (64, sizes[0])) for _ in range(4)])
    _, report, error = _export(ptq, qmodel, prefix, _positive(rng, (256, sizes[0])))
    return qmodel, report, error


@pytest.mark.parametrize("candidates", [unsigned.FACTOR_CANDIDATES, 1], ids=["searched", "6/t only"])
def test_the_fc_writes_u8_codes_with_a_factor_that_keeps_its_weight_codes(candidates, tmp_path, monkeypatch) -> None:
    """With ``6 / t`` itself 4 of the first fc's 24,576 runtime weight codes flip (before the
    search, a trained 784-128-100-10 MLP was 0.74% of the largest logit off the simulation this
    way); a factor that keeps them is found, and where none is (one candidate only here) the
    ReLU keeps its clip in front of a quantize op. Both exact up to rounding ties."""
    monkeypatch.setattr(unsigned, "FACTOR_CANDIDATES", candidates)
    model = _chain(7)
    rng = np.random.default_rng(7)
    ptq, qmodel, table = _converted(model, [_positive(rng, (64, 256)) for _ in range(4)])
    assert _flips_at(model, table, 6 / float(qmodel[2].input_thresholds[0])) > 0
    x = np.abs(np.random.default_rng(1).standard_normal((256, 256))).astype("float32")
    ops, report, error = _export(ptq, qmodel, str(tmp_path / "m"), x)
    assert report.int8 == {"fc": 2}, report
    if candidates > 1:
        # The network input's clip only; the fc fuses its relu and the relu6.
        assert ops.count("clip") + ops.count("elementwise_min") == 1 and "relu6" in ops, ops
        assert report.fused_activations == {"relu6": 1}, report
    else:
        assert ops.count("clip") + ops.count("elementwise_min") == 2 and "relu6" not in ops, ops
    assert error < 2e-6  # measured 1e-7 .. 3e-7


@pytest.mark.parametrize("untied", [True, False], ids=["codes moved", "codes rounded"])
def test_a_square_hidden_layer_takes_the_route(untied, tmp_path, monkeypatch) -> None:
    """The demo's MLP shape (784-100-100-10; 64-100-100-10 here): the square layer is stored on
    one threshold, whose recomputation puts codes on half codes. Rounded, they left no factor
    for one of the two ReLUs (which kept its clip: the demo's MLP had both); moved, both are
    fused relu6 writers. Both exact up to rounding ties."""
    if not untied:
        monkeypatch.setattr(quant_layers, "untied_fc_integers", lambda integers, *_: integers)
    qmodel, report, error = _exported_mlp(1, (64, 100, 100, 10), str(tmp_path / "m"))
    assert qmodel[2].shared_weight_threshold
    assert report.int8 == {"fc": 3}, report
    assert report.fused_activations == ({"relu6": 2} if untied else {"relu": 1, "relu6": 1}), report
    assert error < 2e-6  # measured 3.5e-7 / 3.9e-7


def test_a_chain_of_fcs_runs_on_codes_from_end_to_end(tmp_path) -> None:
    """The middle fc reads one rescaled ReLU and writes the next (its factors multiplied):
    no fp32 tensor between the three fcs."""
    _, report, error = _exported_mlp(3, (64, 48, 40, 16), str(tmp_path / "m"))
    assert report.int8 == {"fc": 3} and report.fused_activations == {"relu6": 2}, report
    assert error < 2e-6


class _NormedChain(paddle.nn.Layer):
    """Linear -> BatchNorm1D -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.norm, self.second = paddle.nn.Linear(32, 48), paddle.nn.BatchNorm1D(48), paddle.nn.Linear(48, 8)
        rng = np.random.default_rng(5)
        self.norm._mean.set_value((0.3 * rng.standard_normal(48)).astype("float32"))
        self.norm._variance.set_value(rng.uniform(0.5, 2.0, 48).astype("float32"))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.second(paddle.nn.functional.relu(self.norm(self.first(x))))


def test_a_batch_norm_after_the_fc_keeps_the_clip(tmp_path) -> None:
    """Paddle fuses neither the BatchNorm nor a relu6 after it into the fc, and runs that
    relu6's output s8: the route was 42% of the largest output off the simulation there."""
    paddle.seed(0)
    model = _NormedChain()
    model.eval()
    rng = np.random.default_rng(6)
    ptq, qmodel, _ = _converted(model, [_positive(rng, (64, 32)) for _ in range(4)])
    ops, _, error = _export(ptq, qmodel, str(tmp_path / "m"), _positive(rng, (256, 32)))
    assert "relu6" not in ops, ops
    assert error < 2e-6  # measured 2.5e-7


def test_a_relu6_after_the_fc_takes_the_route_too(tmp_path) -> None:
    """Its threshold is at most 6, so it becomes the fc's relu with the scaled relu6 after it
    clipping at the threshold (before: an fp32 round trip, as for a ReLU)."""
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Linear(32, 64), paddle.nn.ReLU6(), paddle.nn.Linear(64, 48), paddle.nn.ReLU6(),
        paddle.nn.Linear(48, 16),
    )
    model.eval()
    x = 3 * _positive(np.random.default_rng(0), (256, 32))
    ptq, qmodel, _ = _converted(model, np.split(x, 4))
    _, report, error = _export(ptq, qmodel, str(tmp_path / "m"), x)
    assert report.int8 == {"fc": 3} and report.fused_activations == {"relu6": 2}, report
    assert error < 2e-6  # measured 1.9e-7
