"""An input_spec that contradicts the model fails before the previous export is replaced."""

from __future__ import annotations

import hashlib
import logging
import pathlib

import paddle
import pytest

from imperative_ptq import AbsmaxQuantizer, ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig
from imperative_ptq.export import create_predictor, predict


class _Net(paddle.nn.Layer):
    def __init__(self, head_features: int | None = None) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)
        self.relu = paddle.nn.ReLU()
        # Pooled to 2x2 (any image size), or flattened (one image size only).
        self.pool = paddle.nn.AdaptiveAvgPool2D(2) if head_features is None else None
        self.fc = paddle.nn.Linear(head_features or 16, 3)

    def forward(self, x):
        x = self.relu(self.conv(x))
        if self.pool is not None:
            x = self.pool(x)
        return self.fc(paddle.flatten(x, 1))


def _spec(*shape) -> list:
    return [paddle.static.InputSpec(list(shape), "float32", "x")]


def _converted(head_features: int | None = None) -> tuple[ImperativePTQ, paddle.nn.Layer]:
    paddle.seed(1)
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_Net(head_features))
    qmodel(paddle.rand([2, 3, 8, 8]))
    ptq.convert(qmodel)
    return ptq, qmodel


def _files(directory: pathlib.Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden staging files included) and its digest."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


@pytest.mark.parametrize(
    "shape, match",
    [
        # Paddle's "(InvalidArgument) ..." line, not its last, generic "[Hint: Expected ...]".
        ((None, 5, 8, 8), r"input_spec \[\[-1, 5, 8, 8\].*does not fit the model.*\(InvalidArgument\) "
                          r"The number of input's channels .* the input's channels is 5"),
        ((4, 3, 8), r"input_spec \[\[4, 3, 8\].*does not fit the model"),  # one rank short
    ],
)
def test_contradicting_input_spec_fails_before_the_previous_export_is_replaced(
    tmp_path, shape, match
) -> None:
    ptq, qmodel = _converted()
    prefix = tmp_path / "model"
    ptq.save_quantized_model(qmodel, prefix, _spec(None, 3, 8, 8))
    before = _files(tmp_path)
    assert set(before) == {"model.pdmodel", "model.pdiparams", "model.calibration.json"}
    with pytest.raises(ValueError, match=match):
        ptq.save_quantized_model(qmodel, prefix, _spec(*shape))
    assert _files(tmp_path) == before  # byte-identical, nothing else left behind
    x = paddle.rand([2, 3, 8, 8])
    expected = qmodel(x).numpy()
    deployed = predict(create_predictor(str(prefix)), x.numpy())[0]
    assert deployed.shape == expected.shape


def test_dynamic_dimensions_are_checked_at_a_size_the_model_runs(tmp_path, caplog) -> None:
    ptq, qmodel = _converted()
    with caplog.at_level(logging.WARNING):
        ptq.save_quantized_model(qmodel, tmp_path / "model", _spec(None, 3, None, None))
    assert "could not check input_spec" not in caplog.text
    # A head that takes 8x8 images only: checked at the size it was calibrated on.
    ptq, qmodel = _converted(head_features=4 * 8 * 8)
    with caplog.at_level(logging.WARNING):
        ptq.save_quantized_model(qmodel, tmp_path / "calibrated", _spec(None, 3, None, None))
    assert "could not check input_spec" not in caplog.text
    # Converted from a table (no calibration call seen): no size of the grid fits, so it is
    # exported with a warning (refusing would be wrong: the spec leaves the size open).
    table = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, table)
    loading = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    paddle.seed(1)
    loaded = loading.quantize(_Net(4 * 8 * 8))
    loading.load_calibration_table(loaded, table)
    loading.convert(loaded)
    with caplog.at_level(logging.WARNING):
        loading.save_quantized_model(loaded, tmp_path / "flat", _spec(None, 3, None, None))
    assert "could not check input_spec [[-1, 3, -1, -1]" in caplog.text
    assert (tmp_path / "flat.pdmodel").exists()


class _WidthLogged(paddle.nn.Layer):
    """A conv and a Linear over the pooled height that accepts any width, logging the input
    shapes it runs on (a CRNN-like recognizer; such a model's LSTM on a zero-width feature map
    crashed the process at a width of the spec check's grid)."""

    shapes: list = []

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.Linear(4, 5)

    def forward(self, x):
        if paddle.in_dynamic_mode():  # (not while the export traces it)
            _WidthLogged.shapes.append(list(x.shape))
        return self.fc(paddle.nn.functional.relu(self.conv(x)).mean([2]).transpose([0, 2, 1]))


def test_dynamic_dimensions_are_checked_first_at_the_calibrated_sizes(tmp_path) -> None:
    """The check runs the model at the calibration call's sizes first (batch 1): one run,
    at a width it is known to run at, rather than the grid's widths 1, 28, ... first."""
    paddle.seed(0)
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_WidthLogged())
    qmodel(paddle.rand([2, 3, 48, 320]))
    ptq.convert(qmodel)
    _WidthLogged.shapes.clear()
    ptq.save_quantized_model(qmodel, tmp_path / "model", _spec(None, 3, 48, None))
    assert _WidthLogged.shapes[0] == [1, 3, 48, 320], _WidthLogged.shapes
    assert [1, 3, 48, 1] not in _WidthLogged.shapes and [1, 3, 48, 28] not in _WidthLogged.shapes


def test_contradicting_input_spec_fails_at_onnx_export_too(tmp_path) -> None:
    pytest.importorskip("onnx")
    from imperative_ptq.export import export_onnx

    ptq, qmodel = _converted(head_features=4 * 8 * 8)  # the ONNX export has no adaptive pool
    path = export_onnx(qmodel, tmp_path / "model.onnx", _spec(None, 3, 8, 8))
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="does not fit the model"):
        export_onnx(qmodel, path, _spec(None, 5, 8, 8))
    assert _files(tmp_path) == before


def test_contradicting_input_spec_fails_at_fp32_export_too(tmp_path) -> None:
    """``save_fp32_model`` checks the spec too: a wrong channel count kept the previous fp32
    baseline from being replaced by a program that cannot run."""
    from imperative_ptq.export import save_fp32_model

    paddle.seed(1)
    model = _Net()
    model.eval()
    prefix = tmp_path / "fp32"
    save_fp32_model(model, prefix, _spec(None, 3, 8, 8))
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit the model"):
        save_fp32_model(model, prefix, _spec(None, 5, 8, 8))
    assert _files(tmp_path) == before


class _FoldedFrames(paddle.nn.Layer):
    """A video model that folds its frames into the batch (TSM, TSN): it averages the frames of
    each clip, so it runs only on a batch that is a multiple of its frame count."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.conv, self.fc = paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.Linear(4, 2)

    def forward(self, x):
        features = paddle.nn.functional.adaptive_avg_pool2d(paddle.nn.functional.relu(self.conv(x)), 1)
        return self.fc(features.reshape([-1, self.frames, 4]).mean(1))


@pytest.mark.parametrize("frames", [3, 8])
def test_a_dynamic_batch_is_checked_at_a_batch_the_model_runs(frames, tmp_path) -> None:
    """Refused before: the check ran batch 1 only ("does not fit the model: it fails on zeros
    of that shape (batch 1)"), though Paddle saves and runs the model at any multiple of
    ``frames``. The deployed model computes what the simulation does on two clips."""
    paddle.seed(0)
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_FoldedFrames(frames))
    qmodel(paddle.rand([2 * frames, 3, 8, 8]))
    ptq.convert(qmodel)
    ptq.save_quantized_model(qmodel, tmp_path / "model", _spec(None, 3, 8, 8))
    x = paddle.rand([2 * frames, 3, 8, 8])
    expected = qmodel(x).numpy()
    deployed = predict(create_predictor(str(tmp_path / "model")), x.numpy())[0]
    assert deployed.shape == expected.shape == (2, 2)
    assert abs(deployed - expected).max() <= 1e-5 * abs(expected).max()
    with pytest.raises(ValueError, match=r"does not fit the model: .*\(batch 1, 2, 3, 4, .*, 32\)"):
        ptq.save_quantized_model(qmodel, tmp_path / "wrong", _spec(None, 5, 8, 8))


def test_the_error_quoted_is_the_line_that_says_what_went_wrong() -> None:
    from imperative_ptq.export.spec_check import error_summary

    paddle_error = ValueError(
        "(InvalidArgument) The input of Op(Conv) should be a 4-D or 5-D Tensor. But received: "
        "input's dimension is 3.\n  [Hint: Expected in_dims.size() == 4 == true, but received "
        "0 != 1.] (at /paddle/paddle/phi/infermeta/binary.cc:1)\n  [operator < conv2d > error]"
    )
    assert error_summary(paddle_error) == (
        "(InvalidArgument) The input of Op(Conv) should be a 4-D or 5-D Tensor. But received: "
        "input's dimension is 3"
    )
    assert error_summary(TypeError("first\nlast line")) == "last line"
    assert error_summary(KeyError()) == "KeyError"



@pytest.mark.parametrize("export", ["ptq.save_quantized_model, calibrating", "save_quantized_model", "export_onnx"])
def test_a_refused_export_leaves_no_directory_it_created(export, tmp_path) -> None:
    """"Nothing was written", yet the missing directories of the path stayed behind, empty;
    directories that existed before stay, even empty."""
    from imperative_ptq.export import export_onnx, save_quantized_model

    (tmp_path / "existing").mkdir()
    ptq, qmodel = _converted()
    if export.endswith("calibrating"):
        qmodel = ptq.quantize(_Net())
        qmodel(paddle.rand([2, 3, 8, 8]))
    run = {"export_onnx": export_onnx, "save_quantized_model": save_quantized_model}.get(export, ptq.save_quantized_model)
    with pytest.raises(ValueError, match="does not fit the model"):
        run(qmodel, str(tmp_path / "existing" / "a" / "b" / "model"), _spec(None, 5, 8, 8))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]
    run(qmodel, str(tmp_path / "existing" / "a" / "b" / "model"), _spec(None, 3, 8, 8))
    assert (tmp_path / "existing" / "a" / "b").is_dir()


_PNET_EXPORT = """
import sys
import numpy as np, paddle
from imperative_ptq.export import create_predictor, predict, save_fp32_model
paddle.seed(0)
net = paddle.nn.Sequential(  # MTCNN's PNet: no padding, 12x12 at least
    paddle.nn.Conv2D(3, 10, 3), paddle.nn.PReLU(10), paddle.nn.MaxPool2D(2, 2, ceil_mode=True),
    paddle.nn.Conv2D(10, 16, 3), paddle.nn.PReLU(16), paddle.nn.Conv2D(16, 32, 3), paddle.nn.PReLU(32),
)
net.eval()
prefix = sys.argv[1]
save_fp32_model(net, prefix, [paddle.static.InputSpec([None, 3, None, None], "float32", "x")])
x = np.random.default_rng(0).random([1, 3, 12, 12], dtype=np.float32)
ran = predict(create_predictor(prefix, int8=False, num_threads=1), x)[0]
np.testing.assert_allclose(ran, net(paddle.to_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
try:
    save_fp32_model(net, prefix + "_1x1", [paddle.static.InputSpec([1, 3, 1, 1], "float32", "x")])
except ValueError as error:
    print(error)
"""


def test_an_input_smaller_than_the_kernels_is_refused_before_a_layer_reads_negative_sizes(tmp_path) -> None:
    """Paddle's dygraph conv returns ``[1, 10, -1, -1]`` for a 1x1 image and a 3x3 kernel; the
    check's first size for open dimensions (1) then ran PReLU and max-pool on it: the
    export of a PNet with a spec open in H and W hung or died with ``free(): invalid next
    size``. (A subprocess, so that a crash fails this test only.)"""
    import subprocess
    import sys

    prefix = str(tmp_path / "pnet")
    result = subprocess.run(
        [sys.executable, "-c", _PNET_EXPORT, prefix], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not fit the model" in result.stdout, result.stdout
    assert "Conv2D writes an output of shape [1, 10, -1, -1]: the input is smaller than its kernel" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pnet.pdiparams", "pnet.pdmodel"]
