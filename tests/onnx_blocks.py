"""A small ONNX file through the whole path a user takes: ``load_onnx_model``, a check of the
converted model against ONNX Runtime's values of the file, PTQ, and both runtimes' int8 against
the simulation."""

from __future__ import annotations

import numpy as np
import paddle

import imperative_ptq as ip
from ties import assert_both_runtimes_compute_the_simulation


def assert_onnx_block_quantizes_and_runs_its_simulation(
    path: str, shape: list[int], weight_products: int, directory
) -> paddle.nn.Layer:
    """Loads the file at ``path`` (one float input ``x`` of ``shape``, batch 1), asserts the
    converted model computes ONNX Runtime's values of the file at batch 3, quantizes it
    (abs-max activations, per-channel weights, four calibration batches) with
    ``weight_products`` layers converted, and asserts the simulation is close to fp32 and that
    Paddle Inference and ONNX Runtime compute it.

    Returns:
        The converted model.
    """
    import onnxruntime

    from imperative_ptq.onnx_import import load_onnx_model

    model = load_onnx_model(path, directory / "converted", {"x": shape}, dynamic_batch=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal([3, *shape[1:]]).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    with paddle.no_grad():
        np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), expected, rtol=0, atol=2e-5 * np.abs(expected).max())

    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    quantized = ptq.quantize(model)
    for _ in range(4):
        quantized(paddle.to_tensor(rng.standard_normal([3, *shape[1:]]).astype(np.float32)))
    ptq.convert(quantized)
    converted = [layer for layer in quantized.sublayers() if isinstance(layer, ip.QuantizedLayer)]
    assert len(converted) == weight_products, [type(layer).__name__ for layer in quantized.sublayers()]
    with paddle.no_grad():
        simulated = quantized(paddle.to_tensor(x)).numpy()
    cosine = float((simulated * expected).sum() / np.linalg.norm(simulated) / np.linalg.norm(expected))
    assert 0.99 < cosine < 1.0, cosine
    spec = [paddle.static.InputSpec([None, *shape[1:]], "float32", "x")]
    assert_both_runtimes_compute_the_simulation(ptq, quantized, spec, [x], directory)
    return quantized
