"""Audio front ends and Fourier mixing in ONNX: ``frame`` and the ``fft_*`` ops, complex
tensors held as two real parts (``export/onnx_spectral_ops.py``). Paddle Inference and ONNX
Runtime compute what the simulation does."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from models import KeywordSpotter, converted, largest_error_in_onnx_runtime, largest_error_in_paddle_inference
from ties import simulation_up_to_ties

onnxruntime = pytest.importorskip("onnxruntime")


class _FNet(paddle.nn.Layer):
    """FNet's token mixing: the real part of a 2-D transform over tokens and features."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = paddle.nn.Linear(16, 16), paddle.nn.LayerNorm(16), paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.inp(x)
        h = self.norm(h + paddle.real(paddle.fft.fft2(h, axes=(-2, -1))))
        return self.out(F.relu(h).mean(1))


class _RoundTrip(paddle.nn.Layer):
    """``irfft(rfft(x))`` (orthonormal) and ``|rfft(x)|`` (forward-normalized) features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(16 + 9, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        back = paddle.fft.irfft(paddle.fft.rfft(x, norm="ortho"), n=16, norm="ortho")
        magnitude = paddle.abs(paddle.fft.rfft(x, axis=-1, norm="forward"))
        return self.fc(F.relu(paddle.concat([back, magnitude], -1)))


class _ComplexCast(paddle.nn.Layer):
    """A cast to complex, a complex transform and its inverse, imaginary and real parts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        z = paddle.fft.fft(x.astype("complex64"), axis=-1)
        return self.fc(F.relu(paddle.imag(z) + paddle.real(paddle.fft.ifft(z))))


@pytest.mark.parametrize("build, shape", [
    (KeywordSpotter, [4000]), (_FNet, [8, 16]), (_RoundTrip, [16]), (_ComplexCast, [16]),
])
def test_signal_ops_run_as_simulated(build, shape, tmp_path) -> None:
    """The ONNX export had no ``frame`` or ``fft_*`` converter and no complex tensors; Paddle
    Inference failed to trace the spectrogram's captured window (see test_legacy_ops.py)."""
    paddle.seed(0)
    model = build()
    model.eval()
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal([4, *shape]).astype(np.float32)) for _ in range(2)])
    x = rng.standard_normal([3, *shape]).astype(np.float32)
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6


def test_a_spectrogram_of_any_length_runs_in_onnx_runtime(tmp_path) -> None:
    """Frames are gathered by an index table built from the waveform's length at run time."""
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    model = KeywordSpotter()
    model.eval()
    rng = np.random.default_rng(1)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal([2, 4000]).astype(np.float32)) for _ in range(2)])
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, None], "float32", "x")])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for length in (3000, 5123):
        x = rng.standard_normal([2, length]).astype(np.float32)
        ran = session.run(None, {"x": x})[0]
        simulated, _ = simulation_up_to_ties(lambda: qmodel(paddle.to_tensor(x)).numpy(), ran, 2e-6)
        assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()


class _ComplexProduct(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        z = paddle.fft.fft(x.astype("complex64"))
        return self.fc(paddle.real(paddle.fft.ifft(z * z)))


def test_an_op_on_complex_tensors_without_a_translation_is_named(tmp_path) -> None:
    from imperative_ptq.export import export_onnx

    paddle.seed(0)
    model = _ComplexProduct()
    model.eval()
    qmodel = converted(model, [paddle.randn([4, 16]) for _ in range(2)])
    with pytest.raises(NotImplementedError, match=r"elementwise_mul of a complex tensor is not exported"):
        export_onnx(qmodel, str(tmp_path / "m.onnx"), [paddle.static.InputSpec([None, 16], "float32", "x")])


class _Phase(paddle.nn.Layer):
    """Phase features ``atan2(imag, real)`` of a real transform: at the Nyquist bin the
    imaginary part is exactly 0, and a negative real part puts the phase at +pi."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(9, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        z = paddle.fft.rfft(x, axis=-1)
        return self.fc(F.relu(paddle.atan2(paddle.imag(z), paddle.real(z))))


def test_the_imaginary_part_of_dc_and_nyquist_bins_is_exactly_zero(tmp_path) -> None:
    """The sine table held sin(pi) = 1.2e-16 instead of 0 at the Nyquist bin: ONNX
    Runtime's phase flipped from pi to -pi there (1.1e-1 of the largest output off)."""
    paddle.seed(0)
    model = _Phase()
    model.eval()
    rng = np.random.default_rng(0)
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal([4, 6, 16]).astype(np.float32)) for _ in range(2)])
    x = rng.standard_normal([4, 6, 16]).astype(np.float32)
    assert largest_error_in_onnx_runtime(qmodel, x, tmp_path) < 2e-6
