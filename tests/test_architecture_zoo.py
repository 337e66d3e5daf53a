"""Fifteen architectures beyond ``paddle.vision.models`` (tests/architectures.py: speech,
sequence, vision transformers, detection and segmentation heads, mobile CNNs, two inputs):
each quantizes with the default configuration, exports, and runs in Paddle Inference (oneDNN
int8, ``x86`` and ``x86-avx2``) and ONNX Runtime what the dygraph simulation computes, up to
rounding ties (tests/ties.py). Measured on the AVX2 EPYC: 7.5e-8 .. 7.6e-7 after ties, in both
runtimes, on either target."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from architectures import ZOO
from imperative_ptq.export import create_predictor, export_onnx, predict
from ties import relative_error, simulation_up_to_ties

#: The layers each target runs int8 in each model: the default ``x86`` (others stay fp32 with a
#: warning: padded convs reading signed inputs, transposed convs, a 2-layer bidirectional
#: LSTM), and ``x86-avx2``, which runs the padded convs too, on halved weights.
INT8_LAYERS = {
    "x86": {
        "ecapa_tdnn": 12, "tcn": 7, "convnext": 7, "vit": 13, "swin": 9, "unet": 5, "deeplab_aspp": 8,
        "yolo": 17, "textcnn": 4, "ghostnet": 8, "mlp_mixer": 9, "efficientnet": 18, "bilstm_tagger": 1,
        "conformer": 24, "two_inputs": 3,
    },
    "x86-avx2": {
        "ecapa_tdnn": 19, "tcn": 8, "convnext": 12, "vit": 14, "swin": 10, "unet": 8, "deeplab_aspp": 9,
        "yolo": 23, "textcnn": 4, "ghostnet": 11, "mlp_mixer": 10, "efficientnet": 23, "bilstm_tagger": 1,
        "conformer": 26, "two_inputs": 4,
    },
}


def _outputs(value) -> list[np.ndarray]:
    return [t.numpy() for t in (value if isinstance(value, (list, tuple)) else [value])]


@pytest.mark.parametrize("target", list(INT8_LAYERS))
@pytest.mark.parametrize("name", list(ZOO))
def test_architecture_runs_in_both_runtimes_what_the_simulation_computes(
    name: str, target: str, tmp_path, avx2_runner
) -> None:
    ort = pytest.importorskip("onnxruntime")
    model_class, inputs = ZOO[name]
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = model_class()
    model.train()  # BatchNorm statistics of the data, as a trained model has
    with paddle.no_grad():
        for _ in range(4):
            model(*[paddle.to_tensor(make(rng, 4)) for make, _ in inputs])
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [[make(rng, 4) for make, _ in inputs] for _ in range(4)], progress=False)
    ptq.convert(qmodel, progress=False)
    assert sum(isinstance(layer, (ip.QuantizedLayer, ip.QuantizedMatmul)) for layer in qmodel.sublayers()) == INT8_LAYERS[target][name]
    specs = [paddle.static.InputSpec(spec.shape, spec.dtype, f"input{index}") for index, (_, spec) in enumerate(inputs)]
    xs = [make(rng, 3) for make, _ in inputs]
    prefix = str(tmp_path / "int8")
    ptq.save_quantized_model(qmodel, prefix, specs)
    if target == "x86" or ip.cpu_info().isa == "avx2":
        paddle_inference = predict(create_predictor(prefix, num_threads=1), *xs)
    elif avx2_runner is not None:  # x86-avx2's arithmetic is that of AVX2 kernels
        paddle_inference = avx2_runner.predict(prefix, *xs)
    else:
        pytest.skip("no AVX2 int8 kernels on this CPU (AVX-512 without VNNI)")
    session = ort.InferenceSession(
        export_onnx(qmodel, prefix, specs, int8_residual_branches=False), providers=["CPUExecutionProvider"]
    )
    onnx_runtime = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), xs)})
    for index, (ran_pi, ran_ort) in enumerate(zip(paddle_inference, onnx_runtime)):
        def simulate(index: int = index) -> np.ndarray:
            with paddle.no_grad():
                return _outputs(qmodel(*[paddle.to_tensor(x) for x in xs]))[index]

        for runtime, ran in (("Paddle Inference", ran_pi), ("ONNX Runtime", ran_ort)):
            simulated, _ = simulation_up_to_ties(simulate, ran, 2e-6, candidates=16, max_flips=3)
            assert relative_error(ran, simulated) < 2e-6, (runtime, index, relative_error(ran, simulated))
