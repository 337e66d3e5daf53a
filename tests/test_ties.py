"""The tie-aware comparison of tests/ties.py explains a rounding tie decided the other way, and
nothing else: a wrong scale stays an error."""

from __future__ import annotations

from typing import Callable

import numpy as np
import paddle

import imperative_ptq as ip
from models import mlp
from ties import TIE_DISTANCE, TieSite, _recorded, _Rounding, relative_error, simulation_up_to_ties


def _absmax_converted(model: paddle.nn.Layer, batch: np.ndarray) -> paddle.nn.Layer:
    """``model`` converted with abs-max thresholds calibrated on ``batch``."""
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    qmodel(paddle.to_tensor(batch))
    ptq.convert(qmodel)
    return qmodel


def _run(simulate: Callable[[], np.ndarray], flips: list[TieSite]) -> tuple[np.ndarray, _Rounding]:
    """The simulation of a 3-row batch with ``flips`` decided the other way (a "runtime" that
    rounds them so), and its rounding record (its tie sites where ``flips`` is empty)."""
    rounding = _Rounding(3, frozenset((site.call, site.element) for site in flips))
    with _recorded(rounding), paddle.no_grad():
        return simulate(), rounding


def _converted() -> tuple[paddle.nn.Layer, np.ndarray]:
    """A converted Linear and a batch whose row 1 holds an input exactly on a half code."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = _absmax_converted(mlp(16, 4), rng.random([8, 16], np.float32))  # a flipped code moves the outputs
    x = rng.random([3, 16], np.float32) * 0.9
    step = np.float32(qmodel[0].input_thresholds[0]) / np.float32(127)
    x[1, 5] = np.float32(40.5) * step
    return qmodel, x


def test_a_tie_decided_the_other_way_is_explained() -> None:
    qmodel, x = _converted()
    simulate = lambda: qmodel(paddle.to_tensor(x)).numpy()  # noqa: E731
    plain, recorded = _run(simulate, [])
    tie = next(site for site in recorded.sites if site.call == 0 and site.element == 16 + 5)
    assert tie.distance <= TIE_DISTANCE and tie.row == 1
    # A "runtime" that rounds that one input the other way.
    ran, _ = _run(simulate, [tie])
    assert relative_error(ran, plain) > 1e-3
    explained, flipped = simulation_up_to_ties(simulate, ran, 1e-6)
    assert flipped == [tie] and relative_error(ran, explained) == 0.0


def test_a_wrong_scale_is_not_explained() -> None:
    qmodel, x = _converted()
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    ran = simulated * np.float32(1.01)  # every output 1% off, as a wrong output scale makes it
    explained, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 1e-5)
    assert relative_error(ran, explained) > 5e-3


def test_a_conv_output_exactly_on_a_half_is_a_near_tie_first_in_line() -> None:
    """float32 noise can put a layer's value exactly on a half code (measured on an AVX2
    EPYC: a DLA stem conv's output at 123.5 in the simulation, code 123 in ONNX Runtime): such a
    site is tried before the near-ties around it, not after them as the exact halves of a
    global pool's integer mean are, even where a row holds more near-ties than candidates."""
    qmodel, x = _converted()
    step = np.float32(qmodel[0].input_thresholds[0]) / np.float32(127)
    for column in range(9):  # nine near-ties besides the exact half in column 5
        if column != 5:
            x[1, column] = np.float32(20.5 + column + 3e-5) * step
    x[1, 9] = np.float32(60.5 + 3e-5) * step
    simulate = lambda: qmodel(paddle.to_tensor(x)).numpy()  # noqa: E731
    _, recorded = _run(simulate, [])
    row_sites = [site for site in recorded.sites if site.row == 1]
    tie = next(site for site in row_sites if site.element == 16 + 5)
    assert tie.distance == 0.0 and not tie.exact and len(row_sites) > 8
    ran, _ = _run(simulate, [tie])
    explained, flipped = simulation_up_to_ties(simulate, ran, 1e-6)
    assert flipped == [tie] and relative_error(ran, explained) == 0.0


def test_the_copies_of_a_value_a_nearest_upsample_made_flip_as_one() -> None:
    """Paddle rounds a fused conv's output once and its nearest upsample copies the code; the
    simulation rounds each copy after the upsample: four sites of one value, which the runtime
    decided the same way (measured on a Zen 5 EPYC, x86-vnni: an HRNet-style fuse 2.7e-3 off
    until all four flipped). They count as one site of the default two."""
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Upsample(scale_factor=2, mode="nearest"), paddle.nn.Conv2D(2, 4, 1))
    rng = np.random.default_rng(0)
    qmodel = _absmax_converted(model, rng.random([4, 2, 4, 4], np.float32))
    x = rng.random([3, 2, 4, 4], np.float32) * 0.9
    step = np.float32(qmodel[1].input_thresholds[0]) / np.float32(127)
    x[1, 0, 2, 1] = np.float32(40.5) * step
    simulate = lambda: qmodel(paddle.to_tensor(x)).numpy()  # noqa: E731
    _, recorded = _run(simulate, [])
    copies = [site for site in recorded.sites if site.row == 1 and site.value == recorded.sites[0].value]
    assert len(copies) == 4 and len({site.call for site in copies}) == 1
    ran, _ = _run(simulate, copies)
    explained, flipped = simulation_up_to_ties(simulate, ran, 1e-6)
    assert sorted(flipped, key=lambda site: site.element) == copies and relative_error(ran, explained) == 0.0


class _TwoReaders(paddle.nn.Layer):
    """Two Linear layers reading one input, as a transformer's q and k projections do."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = paddle.nn.Linear(16, 4), paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.first(x) + self.second(x)


def test_one_input_several_layers_read_flips_as_one() -> None:
    """Paddle quantizes an input that layers read on one grid once; the simulation rounds it in
    each layer (measured: a DeiT-style block's LayerNorm output read by q, k and v, 2.2e-2 off
    until all three flipped)."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    qmodel = _absmax_converted(_TwoReaders(), rng.random([8, 16], np.float32))
    assert qmodel.first.input_thresholds == qmodel.second.input_thresholds
    x = rng.random([3, 16], np.float32) * 0.9
    x[1, 5] = np.float32(40.5) * np.float32(qmodel.first.input_thresholds[0]) / np.float32(127)
    simulate = lambda: qmodel(paddle.to_tensor(x)).numpy()  # noqa: E731
    _, recorded = _run(simulate, [])
    copies = [site for site in recorded.sites if site.row == 1 and site.element == 16 + 5]
    assert len(copies) == 2 and len({site.call for site in copies}) == 2
    ran, _ = _run(simulate, copies)
    explained, flipped = simulation_up_to_ties(simulate, ran, 1e-6, max_flips=1)
    assert flipped == copies and relative_error(ran, explained) == 0.0


def test_a_tie_in_an_lstm_data_code_is_explained() -> None:
    """An LSTM's input and hidden state are rounded on its data grid at every step
    (``QuantizedLSTM.quantize_data``), and a tie there moves every later step (measured on a
    Zen 5 EPYC: an embedding LSTM 1.5e-2 off in Paddle Inference, one hidden code 1.9e-6 from
    a half)."""
    from imperative_ptq.quant_rnn import QuantizedLSTM

    paddle.seed(1)
    lstm = paddle.nn.LSTM(8, 16)
    lstm.eval()
    lstm.weight_ih_l0.set_value(lstm.weight_ih_l0.numpy() * 5)  # one input code moves a hidden code
    simulated = QuantizedLSTM(lstm, [2.5], [0.7], 1.0)  # data threshold 2.5
    x = np.random.default_rng(1).uniform(-1, 1, [3, 5, 8]).astype(np.float32)
    x[2, 1, 3] = np.float32(40.5) * np.float32(2.5) / np.float32(127)
    simulate = lambda: simulated(paddle.to_tensor(x))[0].numpy()  # noqa: E731
    plain, recorded = _run(simulate, [])
    tie = next(site for site in recorded.sites if site.call == 0 and site.element == 2 * 5 * 8 + 1 * 8 + 3)
    assert tie.row == 2
    ran, _ = _run(simulate, [tie])
    assert relative_error(ran, plain) > 1e-3
    explained, flipped = simulation_up_to_ties(simulate, ran, 1e-6)
    assert flipped == [tie] and relative_error(ran, explained) == 0.0
