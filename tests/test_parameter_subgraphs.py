"""Tensors a model computes from its parameters alone on every call (SVTR resizes its
positional embedding from a learned grid: slice, reshape, transpose, cast, bicubic resize,
concat with its extra tokens, of which it has none). Paddle 3.3.1's predictor ran that chain in
oneDNN kernels and failed at the first run on the empty slice ("could not reshape a memory
descriptor"), fp32 and int8 alike; the Paddle exports now compute such subgraphs once and store
them as parameters (``export.constant_folding``)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from imperative_ptq.export import create_predictor, export_onnx, predict, save_quantized_model
from imperative_ptq.export.constant_folding import fold_parameter_subgraphs
from imperative_ptq.export.paddle_export import save_fp32_model
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program, save_legacy_program
from imperative_ptq.export.tracing import trace_to_legacy_program
from models import converted, largest_error_in_paddle_inference

nn = paddle.nn
F = paddle.nn.functional
SHAPE = [3, 8, 16]
GRID = (2, 4)  # the learned positional grid, resized to the 2 x 4 patches of an 8 x 16 input


class _ResizedPositions(nn.Layer):
    """Patch embedding plus a positional embedding resized from a smaller learned grid and
    prefixed by its ``extra`` tokens, as SVTR computes it; a Linear encoder and head."""

    def __init__(self, extra: int, dim: int = 16) -> None:
        super().__init__()
        self.extra = extra
        self.patches = nn.Conv2D(3, dim, 4, stride=4)
        self.positions = self.create_parameter([1, extra + GRID[0] * GRID[1] // 2, dim])
        self.encoder = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def resized_positions(self) -> paddle.Tensor:
        extra, grid = self.positions[:, :self.extra], self.positions[:, self.extra:]
        grid = grid.reshape([1, GRID[0] // 2, GRID[1], -1]).transpose([0, 3, 1, 2]).cast("float32")
        grid = F.interpolate(grid, size=GRID, mode="bicubic", align_corners=False)
        return paddle.concat([extra, grid.flatten(2).transpose([0, 2, 1])], axis=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        tokens = self.patches(x).flatten(2).transpose([0, 2, 1])
        tokens = tokens + self.resized_positions()[:, self.extra:]
        return self.head(F.gelu(self.encoder(tokens)).mean(axis=1))


def _model(extra: int = 0) -> _ResizedPositions:
    paddle.seed(0)
    return _ResizedPositions(extra).eval()


def _batches(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal([2, *SHAPE]).astype("float32") for _ in range(count)]


def _spec() -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec([None, *SHAPE], "float32", "x")]


@pytest.mark.parametrize("extra", [0, 1])
def test_the_fp32_export_runs_in_paddle_inference(tmp_path, extra: int) -> None:
    (x,) = _batches(1)
    model = _model(extra)
    expected = model(paddle.to_tensor(x)).numpy()
    save_fp32_model(model, str(tmp_path / "fp32"), _spec())
    ran = predict(create_predictor(str(tmp_path / "fp32"), int8=False), x)[0]
    assert np.abs(ran - expected).max() <= 1e-5 * np.abs(expected).max()


def test_the_int8_export_runs_as_simulated_in_both_runtimes(tmp_path) -> None:
    *calibration, x = _batches(4)
    qmodel = converted(_model(), [paddle.to_tensor(batch) for batch in calibration])
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) <= 2e-6
    # Nothing left to fold in the int8 program: its weights' dequantize ops stay.
    save_quantized_model(qmodel, str(tmp_path / "int8"), _spec())
    with legacy_static_mode():
        loaded = load_legacy_program(str(tmp_path / "int8"))
        assert _ops(loaded).count("dequantize_linear") >= 3  # the conv's and Linears' weights
        assert fold_parameter_subgraphs(loaded) == 0
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(qmodel, str(tmp_path / "m.onnx"), _spec())
    ran = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    simulated = qmodel(paddle.to_tensor(x)).numpy()
    assert np.abs(ran - simulated).max() <= 2e-6 * np.abs(simulated).max()


def _traced(model: nn.Layer, tmp_path) -> str:
    prefix = str(tmp_path / "traced")
    trace_to_legacy_program(model, _spec(), prefix)
    return prefix


def _ops(loaded) -> list[str]:
    return [op.type for op in loaded.program.global_block().ops]


def _runs_as_dygraph(model: nn.Layer, loaded, tmp_path) -> None:
    prefix = str(tmp_path / "folded")
    with legacy_static_mode():
        save_legacy_program(loaded, prefix)
    (x,) = _batches(1)
    expected = model(paddle.to_tensor(x)).numpy()
    ran = predict(create_predictor(prefix, int8=False), x)[0]
    assert np.abs(ran - expected).max() <= 1e-5 * np.abs(expected).max()


def _folded(model: nn.Layer, tmp_path) -> tuple:
    """The traced program of ``model`` folded, its op types before and after, and the count
    :func:`fold_parameter_subgraphs` returned."""
    prefix = _traced(model, tmp_path)
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        before = _ops(loaded)
        folded = fold_parameter_subgraphs(loaded)
    return loaded, before, folded, _ops(loaded)


def test_only_the_parameter_chain_is_folded(tmp_path) -> None:
    model = _model()
    loaded, before, folded, after = _folded(model, tmp_path)
    assert {"slice", "bicubic_interp_v2", "concat"} <= set(before)
    assert not {"slice", "bicubic_interp_v2", "concat", "cast"} & set(after)
    assert folded == len(before) - len(after)
    # The conv, the matmuls, the tokens' transposes and the add of the positions stay.
    for kind in ("conv2d", "matmul_v2", "gelu", "reduce_mean", "elementwise_add", "transpose2"):
        assert after.count(kind) >= 1, kind
    assert after.count("matmul_v2") == before.count("matmul_v2") == 2
    _runs_as_dygraph(model, loaded, tmp_path)


class _StandardizedFilter(nn.Layer):
    """A conv on a weight standardized in the graph (x2paddle's Conv nodes), scaled by a gain
    computed from a parameter alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = self.create_parameter([4, 3, 3, 3])
        self.gain = self.create_parameter([4])
        self.shift = self.create_parameter([1, 4, 1, 1])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        filter_ = (self.weight - self.weight.mean()) * 2.0
        return F.conv2d(x, filter_) * self.gain.reshape([1, 4, 1, 1]).exp() + self.shift


def test_a_computed_conv_weight_stays_computed_and_a_computed_gain_is_folded(tmp_path) -> None:
    paddle.seed(0)
    model = _StandardizedFilter().eval()
    loaded, before, folded, after = _folded(model, tmp_path)
    assert "exp" in before and "exp" not in after
    assert folded == len(before) - len(after) == 2  # the gain's reshape2 and exp
    assert after.count("reduce_mean") == 1 and "conv2d" in after  # the filter's chain
    _runs_as_dygraph(model, loaded, tmp_path)


def test_an_op_carrying_a_calibrated_output_scale_is_not_folded(tmp_path) -> None:
    paddle.seed(0)
    model = _StandardizedFilter().eval()
    prefix = _traced(model, tmp_path)
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        exp = next(op for op in loaded.program.global_block().ops if op.type == "exp")
        exp._set_attr("out_threshold", 3.0)
        assert fold_parameter_subgraphs(loaded) == 1  # the gain's reshape2 only
        assert "exp" in _ops(loaded)
    _runs_as_dygraph(model, loaded, tmp_path)
