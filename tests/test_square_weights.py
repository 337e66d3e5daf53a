"""Square 2-D weights: the Paddle export stores them on one per-tensor threshold on every target
(Paddle Inference's oneDNN pass misreads per-channel scales of a square weight), so the
simulation computes with that threshold on every target too (on ``x86`` a Linear whose channels
differ this much runs as a 1x1 conv instead, per channel)."""

from __future__ import annotations

import numpy as np
import paddle

import imperative_ptq as ip
from imperative_ptq.export.graph import get_tensor
from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program


def _stored_weights(prefix: str) -> list[np.ndarray]:
    """The int8 2-D weights of the saved program, dequantized as its dequantize_linear ops do."""
    found = []
    with legacy_static_mode():
        loaded = load_legacy_program(prefix)
        for op in loaded.program.global_block().ops:
            if op.type != "dequantize_linear" or loaded.scope.find_var(op.input("X")[0]) is None:
                continue
            codes = get_tensor(loaded, op.input("X")[0])
            if codes.dtype == np.int8 and codes.ndim == 2:
                scale = get_tensor(loaded, op.input("Scale")[0]).astype(np.float32)
                found.append(codes.astype(np.float32) * (scale.reshape(1, -1) if scale.size > 1 else scale) / 127)
    return found


def _converted(target: str) -> tuple[ip.ImperativePTQ, paddle.nn.Layer]:
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(64, 64))
    # output channels of very different widths, as attention projections have
    weight = rng.standard_normal((64, 64)).astype(np.float32) * np.logspace(-2, 0, 64, dtype=np.float32)
    model[0].weight.set_value(weight)
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    quantized = ptq.quantize(model)
    ptq.calibrate(quantized, [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(4)], progress=False)
    ptq.convert(quantized)
    return ptq, quantized


def test_a_square_weight_is_simulated_as_the_program_stores_it(tmp_path) -> None:
    """Target ``arm`` (Paddle Lite's program). Measured before: the program's weight 1.75% off
    the simulation's, its output 42% off on the smallest channels."""
    ptq, quantized = _converted("arm")
    ptq.save_quantized_model(quantized, str(tmp_path / "m"), [paddle.static.InputSpec([8, 64], "float32", "x")])
    (stored,) = _stored_weights(str(tmp_path / "m"))
    simulated = quantized[0].program_weight if quantized[0].program_weight is not None else quantized[0].layer.weight.numpy()
    np.testing.assert_allclose(stored, simulated, rtol=0, atol=1e-6 * np.abs(simulated).max())
    assert quantized[0].shared_weight_threshold
