"""End-to-end smoke test of the calibration lifecycle on a tiny CNN."""

import numpy as np
import paddle
import pytest

from imperative_ptq import ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq import QuantizedLayer


@pytest.mark.parametrize("target", ["x86", "x86-vnni"])
def test_quantize_calibrate_convert_keeps_outputs_close(target: str) -> None:
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3),
        paddle.nn.BatchNorm2D(8),
        paddle.nn.ReLU(),
        paddle.nn.Flatten(),
        paddle.nn.Linear(8 * 6 * 6, 10),
    )
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    batches = [paddle.randn([4, 3, 8, 8]) for _ in range(3)]
    for x in batches:
        qmodel(x)
    table = ptq.calibration_table(qmodel)
    assert set(table) == {"0", "1", "2", "4"}
    assert len(table["0"]["weight"]) == 8 and len(table["4"]["weight"]) == 10
    ptq.convert(qmodel)
    # The conv reads a signed input: int8 on s8 where the target has VNNI, on a shifted u8 grid
    # on x86 (unpadded, every output reads the shift whole: the bias takes it back).
    assert isinstance(qmodel[0], QuantizedLayer) and qmodel[0].input_shifted == (target == "x86")
    assert isinstance(qmodel[4], QuantizedLayer) and qmodel[4].input_unsigned
    x = batches[0]
    reference, simulated = model(x).numpy().ravel(), qmodel(x).numpy().ravel()
    cosine = reference @ simulated / np.linalg.norm(reference) / np.linalg.norm(simulated)
    assert cosine > 0.98
