"""A constant ``pad`` op (MediaPipe's BlazeFace widens a residual branch so; x2paddle writes every
ONNX ``Pad`` so) runs in Paddle's CPU kernel: Paddle 3.3.1's oneDNN ``pad`` pads other axes than
it is given and writes outside its output, fp32 alike (the predictor then corrupted the heap
and hung), on the channels as on the height and width."""

from __future__ import annotations

import subprocess
import sys

import paddle
import pytest

from imperative_ptq.export import save_fp32_model
from imperative_ptq.export.predictor import pads_paddle_misplaces, program_desc

_PADDED_NET = '''
import sys
import numpy as np
import paddle
import imperative_ptq as ip
from imperative_ptq.export import create_predictor, int8_report, predict, save_fp32_model


class PaddedNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.head = paddle.nn.Conv2D(8 + PADDINGS[2] + PADDINGS[3], 4, 1)

    def forward(self, x):
        widened = paddle.nn.functional.pad(paddle.nn.functional.relu(self.conv(x)), PADDINGS)
        return self.head(widened)


PADDINGS = [int(p) for p in sys.argv[2].split(",")]
paddle.seed(0)
model = PaddedNet()
model.eval()
spec = [paddle.static.InputSpec([1, 3, 16, 16], "float32", "x")]
x = np.random.default_rng(0).random([1, 3, 16, 16], dtype=np.float32)
prefix = sys.argv[1]
save_fp32_model(model, prefix + "_fp32", input_spec=spec)
ran = predict(create_predictor(prefix + "_fp32", int8=False), x)[0]
expected = model(paddle.to_tensor(x)).numpy()
print("fp32", ran.shape, float(np.abs(ran - expected).max() / np.abs(expected).max()))
ptq = ip.ImperativePTQ()
quantized = ptq.quantize(model)
for seed in range(3):
    quantized(paddle.to_tensor(np.random.default_rng(seed + 1).random([1, 3, 16, 16], dtype=np.float32)))
ptq.convert(quantized)
ptq.save_quantized_model(quantized, prefix, input_spec=spec)
ran = predict(create_predictor(prefix), x)[0]
simulated = quantized(paddle.to_tensor(x)).numpy()
print("int8", ran.shape, float(np.abs(ran - simulated).max() / np.abs(simulated).max()))
print("report", int8_report(prefix).int8)
'''


def test_channel_pads_are_found_and_batch_pads_too(tmp_path) -> None:
    def padded(paddings: list[int]) -> bool:
        class Pad(paddle.nn.Layer):
            def forward(self, x):
                return paddle.nn.functional.pad(x, paddings)

        prefix = str(tmp_path / "_".join(map(str, paddings)))
        save_fp32_model(Pad(), prefix, input_spec=[paddle.static.InputSpec([1, 3, 8, 8], "float32", "x")])
        return pads_paddle_misplaces(program_desc(prefix + ".pdmodel"))

    assert padded([0, 0, 0, 4, 0, 0, 0, 0])  # channels
    assert padded([1, 0, 0, 0, 0, 0, 0, 0])  # batch
    assert padded([0, 0, 0, 0, 1, 1, 2, 2])  # height and width only: oneDNN's writes outside its output too
    assert not padded([0, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.slow
@pytest.mark.parametrize("paddings,shape", [
    ("0,0,0,4,0,0,0,0", "(1, 4, 16, 16)"),  # channels
    ("0,0,0,0,1,1,2,2", "(1, 4, 18, 20)"),  # height and width (ConvBERT's predictor hung on such a pad)
])
def test_a_pad_runs_as_dygraph_in_both_pipelines(tmp_path, paddings: str, shape: str) -> None:
    """(A subprocess: the unpatched predictor corrupted the heap and hung.)"""
    script = tmp_path / "padded_net.py"  # (a file: the export's trace reads the forward's source)
    script.write_text(_PADDED_NET)
    try:
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "padded"), paddings], capture_output=True, text=True, timeout=240,
        )
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"the predictor hung: {hung.stderr!r}"[-3000:]) from None
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("fp32", "int8", "report")))
    for pipeline in ("fp32", "int8"):
        ran_shape, error = lines[pipeline].rsplit(" ", 1)
        assert ran_shape == shape and float(error) < 1e-5, result.stdout
    assert "'fused_conv2d': 2" in lines["report"], result.stdout
