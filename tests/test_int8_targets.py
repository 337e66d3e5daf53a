"""Deployment targets: the exported int8 model computes what the simulation promises, on the CPU
at hand and on AVX2 kernels (oneDNN capped with ``ONEDNN_MAX_CPU_ISA=AVX2`` in a subprocess when
this CPU has VNNI), and the plain form's saturation without VNNI is pinned per ISA."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest

import imperative_ptq as ip
from imperative_ptq.cpu import CpuInfo, cpu_info
from imperative_ptq.export import create_predictor, int8_report, save_quantized_model
from imperative_ptq.export import predictor as predictor_module
from checkout import checkout_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROBE = ROOT / "benchmarks" / "int8_arithmetic_probe.py"
AVX2 = checkout_env(ONEDNN_MAX_CPU_ISA="AVX2", GLOG_minloglevel="2")


def _probe_module():
    spec = importlib.util.spec_from_file_location("int8_arithmetic_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe_here(target: str, directory: str) -> dict[str, dict[str, float]]:
    results = _probe_module().probe(target, directory)
    return {f"{layer}-{source}": errors for (layer, source), errors in results.items()}


def _probe_on_avx2(target: str, directory: str) -> dict[str, dict[str, float]]:
    script = textwrap.dedent(
        f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("probe", {str(PROBE)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results = module.probe({target!r}, {directory!r})
        print("RESULT" + json.dumps({{f"{{l}}-{{s}}": e for (l, s), e in results.items()}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=AVX2, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


NATIVE_IS_AVX2 = not cpu_info().vnni
needs_vnni_host = pytest.mark.skipif(
    NATIVE_IS_AVX2, reason="this CPU runs AVX2 kernels natively: the native tests cover them"
)


def _assert_exact(results: dict[str, dict[str, float]]) -> None:
    for case, errors in results.items():
        # Convs are exact to float rounding; a Linear keeps ~2e-4 from oneDNN rounding the
        # re-derived fc weight (quant_layers.paddle_fc_weight) in float32.
        bound = 1e-5 if case.startswith("conv") else 1e-3
        assert errors["simulation"] < bound, (case, errors)
        assert errors["exact"] < bound, (case, errors)


def test_x86_target_is_exact_here(tmp_path) -> None:
    _assert_exact(_probe_here("x86", str(tmp_path)))


@pytest.mark.slow
@needs_vnni_host
def test_x86_target_is_exact_on_avx2_kernels(tmp_path) -> None:
    _assert_exact(_probe_on_avx2("x86", str(tmp_path)))


def _assert_plain_form_truth(results: dict[str, dict[str, float]], vnni: bool) -> None:
    conv = results["conv-relu"]
    if vnni:
        assert conv["exact"] < 1e-5, conv
    else:
        # u8 codes up to 255: the int16 pair sums saturate, exactly as emulated.
        assert conv["pair-saturating"] < 1e-5 and conv["exact"] > 0.01, conv
        linear = results["linear-dense"]  # s8 shifted by +128 into u8, then saturated
        assert linear["exact"] > 0.1 and linear["pair-saturating"] < 0.05, linear


def test_plain_form_per_isa_truth_here(tmp_path) -> None:
    _assert_plain_form_truth(_probe_here("arm", str(tmp_path)), cpu_info().vnni)


@pytest.mark.slow
@needs_vnni_host
def test_plain_form_saturates_on_avx2_kernels(tmp_path) -> None:
    _assert_plain_form_truth(_probe_on_avx2("arm", str(tmp_path)), vnni=False)


def _probe_avx2_kernels(target: str, directory: str) -> dict[str, dict[str, float]]:
    """The probe on oneDNN's AVX2 kernels: natively where they are this CPU's, else in a
    subprocess capped at AVX2 (a VNNI CPU); skipped on AVX-512 without VNNI."""
    if cpu_info().isa == "avx2":
        return _probe_here(target, directory)
    if not cpu_info().vnni:
        pytest.skip("this CPU's int8 kernels are AVX-512 without VNNI")
    return _probe_on_avx2(target, directory)


def test_signed_conv_inputs_halve_the_weight_on_avx2_kernels(tmp_path) -> None:
    """What x86-avx2 simulates: an s8-input conv (x86-vnni's export) computes with its weight
    rounded on half its scale on AVX2 kernels, exactly; x86-avx2 runs it so, as simulated."""
    conv = _probe_avx2_kernels("x86-vnni", str(tmp_path))["conv-signed"]
    assert conv["halved weights"] < 1e-5 and conv["exact"] > 1e-3, conv
    _assert_exact(_probe_avx2_kernels("x86-avx2", str(tmp_path)))


# ------------------------------------------------------------------------------- the API
class _Net(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = paddle.nn.Linear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def _converted(target: str, x: paddle.Tensor) -> tuple[ip.ImperativePTQ, paddle.nn.Layer]:
    paddle.seed(0)
    model = _Net()
    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    qmodel(x)
    ptq.convert(qmodel)
    return ptq, qmodel


def test_default_target_shifts_a_signed_fc_input_into_u8() -> None:
    _, qmodel = _converted("x86", paddle.randn([32, 8]))
    # Reads a signed input: u8 codes 0..127 after a shift (tests/test_shifted_inputs.py).
    assert isinstance(qmodel.fc1, ip.QuantizedLayer) and qmodel.fc1.input_shifted
    assert not qmodel.fc1.input_unsigned
    assert isinstance(qmodel.fc2, ip.QuantizedLayer) and qmodel.fc2.input_unsigned
    assert not qmodel.fc2.input_shifted


def test_vnni_target_quantizes_signed_inputs() -> None:
    _, qmodel = _converted("x86-vnni", paddle.randn([32, 8]))
    assert isinstance(qmodel.fc1, ip.QuantizedLayer) and not qmodel.fc1.input_unsigned
    assert not qmodel.fc1.input_shifted  # s8, exact with VNNI
    assert qmodel.fc2.input_unsigned


def test_unsigned_input_simulation_clips_negatives_to_zero() -> None:
    _, qmodel = _converted("x86", paddle.rand([32, 8]))
    layer = qmodel.fc1
    assert layer.input_unsigned
    x = paddle.to_tensor([[-1.0] * 8])
    np.testing.assert_allclose(layer(x).numpy(), layer.layer(paddle.zeros([1, 8])).numpy())


def test_input_minima_round_trip_through_table_and_state(tmp_path) -> None:
    paddle.seed(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_Net())
    qmodel(paddle.rand([16, 8]) + 0.25)
    table_path, state_path = tmp_path / "table.json", tmp_path / "state.npz"
    ptq.save_calibration_table(qmodel, table_path)
    ptq.save_state(qmodel, state_path)
    document = json.loads(table_path.read_text())
    assert document["input_minima"]["fc1"] >= 0.25 and document["input_minima"]["fc2"] == 0.0
    for load in (ptq.load_calibration_table, ptq.load_state):
        fresh = ptq.quantize(_Net())
        load(fresh, table_path if load == ptq.load_calibration_table else state_path)
        ptq.convert(fresh)
        assert fresh.fc1.input_unsigned and fresh.fc2.input_unsigned
    # Merging a shard that saw a negative input makes the input signed.
    shard = ptq.quantize(_Net())
    shard(paddle.rand([16, 8]) - 0.5)
    ptq.save_state(shard, state_path)
    ptq.load_state(qmodel, state_path, merge=True)
    ptq.convert(qmodel)
    # Signed on x86 now: a shifted grid covering the shard's negative values.
    assert qmodel.fc1.input_shifted and not qmodel.fc1.input_unsigned
    assert qmodel.fc1.input_zero_point > 0
    document["input_minima"] = {"fc1": "low"}
    table_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="input_minima"):
        ptq.load_calibration_table(ptq.quantize(_Net()), table_path)


@pytest.mark.parametrize(
    "target, error, match",
    [("x87", ValueError, "unknown target 'x87'.*x86-vnni"), (86, TypeError, "target must be a string")],
)
def test_bad_target_is_refused(target, error, match) -> None:
    with pytest.raises(error, match=match):
        ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target)


def test_export_refuses_another_target_than_converted(tmp_path) -> None:
    _, qmodel = _converted("x86", paddle.rand([32, 8]))
    spec = [paddle.static.InputSpec([None, 8], "float32", "x")]
    with pytest.raises(ValueError, match="converted for 'x86'.*target='arm'"):
        save_quantized_model(qmodel, str(tmp_path / "m"), spec, target="arm")
    with pytest.raises(ValueError, match="unknown target"):
        save_quantized_model(qmodel, str(tmp_path / "m"), spec, target="risc-v")
    assert not os.listdir(tmp_path)
    save_quantized_model(qmodel, str(tmp_path / "m"), spec, target="x86")
    assert json.loads((tmp_path / "m.calibration.json").read_text())["config"]["target"] == "x86"


AVX2_EPYC = CpuInfo("AMD EPYC 7B13", frozenset({"avx2"}))


def test_vnni_export_warns_on_a_cpu_without_vnni(tmp_path, monkeypatch, caplog) -> None:
    ptq, qmodel = _converted("x86-vnni", paddle.randn([32, 8]))
    prefix = str(tmp_path / "m")
    from imperative_ptq.export import paddle_export

    monkeypatch.setattr(paddle_export, "cpu_info", lambda: AVX2_EPYC)
    monkeypatch.setattr(predictor_module, "cpu_info", lambda: AVX2_EPYC)
    with caplog.at_level(logging.WARNING):
        ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 8], "float32", "x")])
        assert "x86-vnni" in caplog.text and "AMD EPYC 7B13 (avx2)" in caplog.text
        caplog.clear()
        create_predictor(prefix, num_threads=1)
    assert "x86-vnni" in caplog.text and "PTQConfig(target='x86')" in caplog.text
    assert predictor_module.exported_target(prefix) == "x86-vnni"


def test_arm_export_warns_in_paddle_inference(tmp_path, caplog) -> None:
    """An ``arm`` export simulates Paddle Lite's kernels; Paddle Inference ran it without a word
    (a PP-LCNet-style net 25% of the largest logit off its simulation there)."""
    ptq, qmodel = _converted("arm", paddle.randn([32, 8]))
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 8], "float32", "x")])
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.export.predictor"):
        create_predictor(prefix, num_threads=1)
    assert "target 'arm'" in caplog.text and "Paddle Lite" in caplog.text and "target='x86'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imperative_ptq.export.predictor"):
        create_predictor(prefix, int8=False, num_threads=1)  # its fp32 program: nothing to say
    assert not caplog.text


# ------------------------------------------------------------------- the x86 program rewrite
def _export_kl(model: paddle.nn.Layer, x: np.ndarray, prefix: str):
    """KL thresholds (they clip), x86 target: (op types of the program, runtime output,
    simulated output, int8 report)."""
    from imperative_ptq.export import int8_report, predict
    from imperative_ptq.export.legacy_program import legacy_static_mode, load_legacy_program

    model.eval()
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    for batch in np.split(x, 4):
        qmodel(paddle.to_tensor(batch))
    ptq.convert(qmodel)
    spec = [paddle.static.InputSpec([None, *x.shape[1:]], "float32", "x")]
    ptq.save_quantized_model(qmodel, prefix, spec)
    with legacy_static_mode():
        ops = [op.type for op in load_legacy_program(prefix).program.global_block().ops]
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    return ops, ran, qmodel(paddle.to_tensor(x)).numpy(), int8_report(prefix)


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_conv_relu_is_clipped_for_free_by_a_rescaled_relu6(tmp_path) -> None:
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 3, padding=1),
    )
    x = np.abs(np.random.default_rng(0).standard_normal((16, 3, 8, 8))).astype("float32")
    ops, ran, simulated, report = _export_kl(model, x, str(tmp_path / "m"))
    # One clip, for the network input; the ReLU became a relu6 fused into the first conv.
    assert "relu6" in ops and ops.count("clip") == 1 and "elementwise_min" not in ops, ops
    assert report.int8 == {"fused_conv2d": 2} and not report.signed_inputs, report
    assert _relative_error(ran, simulated) < 1e-5  # exact, KL's clipped tail included


def test_pooled_relu_is_clipped_in_front_of_the_next_conv(tmp_path) -> None:
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU(), paddle.nn.MaxPool2D(2),
        paddle.nn.Conv2D(8, 8, 3, padding=1),
    )
    x = np.abs(np.random.default_rng(0).standard_normal((16, 3, 8, 8))).astype("float32")
    ops, ran, simulated, report = _export_kl(model, x, str(tmp_path / "m"))
    # The network input is clipped in front of its quantize op; the ReLU by the conv's scaled
    # relu6, whose codes the int8 pool hands on (a clip after the pool before).
    assert "relu6" in ops and ops.count("clip") == 1, ops
    assert report.int8 == {"fused_conv2d": 2} and not report.signed_inputs, report
    assert _relative_error(ran, simulated) < 1e-5


@pytest.mark.parametrize("activation", [paddle.nn.ReLU, paddle.nn.ReLU6])
def test_fc_activation_outputs_run_as_u8_clipped(activation, tmp_path) -> None:
    """After a fc a fused relu6 runs s8 in Paddle and a fused relu cannot clip at the
    threshold (measured): the activation becomes a relu (Paddle runs it u8) followed by a
    relu6 on the fc's output scaled by about ``6 / t`` (the fc writes u8 codes 0..127,
    tests/test_fc_u8_chain.py); before, both got an explicit clip and relu."""
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Linear(32, 64), activation(), paddle.nn.Linear(64, 16)
    )
    x = np.abs(np.random.default_rng(0).standard_normal((64, 32))).astype("float32")
    ops, ran, simulated, report = _export_kl(model, x, str(tmp_path / "m"))
    assert report.int8 == {"fc": 2} and not report.signed_inputs, report
    # The network input's clip only.
    assert ops.count("clip") + ops.count("elementwise_min") == 1 and ops.count("relu6") == 1, ops
    assert report.fused_activations == {"relu6": 1}, report
    assert _relative_error(ran, simulated) < 1e-3  # 8% without the clip after the relu


def test_layers_without_an_int8_kernel_stay_fp32_at_convert(tmp_path, caplog) -> None:
    """Paddle Inference has no int8 conv3d: ``convert`` keeps the Conv3D fp32 (it was simulated
    in int8 and only the export said it ran fp32), so the simulation is what runs."""

    class Net(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv = paddle.nn.Conv3D(4, 8, 3)
            self.fc = paddle.nn.Linear(8 * 2 * 2 * 2, 4)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return self.fc(paddle.nn.functional.relu(self.conv(x)).flatten(1))

    paddle.seed(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(Net())
    qmodel(paddle.rand([8, 4, 4, 4, 4]))
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.convert(qmodel)
    assert not isinstance(qmodel.conv, ip.QuantizedLayer)
    assert isinstance(qmodel.fc, ip.QuantizedLayer)
    assert "no int8 kernel" in caplog.text and "conv (Conv3D)" in caplog.text
    prefix = str(tmp_path / "m")
    ptq.save_quantized_model(
        qmodel, prefix, [paddle.static.InputSpec([None, 4, 4, 4, 4], "float32", "x")]
    )
    report = int8_report(prefix)
    assert report.fp32 == {"conv3d": 1} and sum(report.int8.values()) == 1, report


@pytest.mark.parametrize(
    "flags, expected",
    [
        (("avx2", "avx512f", "avx512_vnni"), "x86-vnni"),
        (("avx2",), "x86-avx2"),
        (("avx2", "avx512f"), "x86"),  # AVX-512 without VNNI: its int8 kernels were not measured
    ],
)
def test_native_target_picks_the_x86_target_this_cpu_runs(flags, expected, monkeypatch) -> None:
    """``target="native"`` is x86-vnni on a CPU with VNNI/AMX (as oneDNN dispatches them,
    ``ONEDNN_MAX_CPU_ISA`` included), x86-avx2 where the int8 kernels are AVX2, x86 elsewhere;
    the config records the resolved target."""
    from imperative_ptq import cpu as cpu_module

    monkeypatch.setattr(
        cpu_module, "cpu_info", lambda: CpuInfo(model="probe", flags=frozenset(flags))
    )
    config = ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="native")
    assert config.target == expected and config.to_dict()["target"] == expected
    with pytest.raises(ValueError, match="unknown target"):
        ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="nativ")


def _convert_warnings(
    model: paddle.nn.Layer, batch: paddle.Tensor, target: str, flags: tuple[str, ...], monkeypatch, caplog
) -> str:
    """The warnings of calibrating ``model`` on ``batch`` and converting it for ``target`` on a
    CPU reporting ``flags``."""
    from imperative_ptq import cpu as cpu_module

    monkeypatch.setattr(
        cpu_module, "cpu_info", lambda: CpuInfo(model="probe", flags=frozenset(flags))
    )
    model.eval()
    ptq = ip.ImperativePTQ(
        ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=target)
    )
    qmodel = ptq.quantize(model)
    qmodel(batch)
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        ptq.convert(qmodel)
    return caplog.text


@pytest.mark.parametrize(
    "flags, hint",
    [
        (("avx2", "avx512f", "avx512_vnni"), "target='native' picks x86-vnni here"),
        (("avx2",), "target='native' picks x86-avx2 here"),
        (("avx2", "avx512f"), None),
    ],
)
def test_signed_input_warning_points_to_native(flags, hint, monkeypatch, caplog) -> None:
    paddle.seed(0)
    # Padded convs: a signed input there cannot be shifted (a Linear's would be).
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(2, 2, 3, padding=1), paddle.nn.Conv2D(2, 2, 3, padding=1)
    )
    warnings = _convert_warnings(model, paddle.randn([4, 2, 5, 5]), "x86", flags, monkeypatch, caplog)
    assert "read a signed input and stay fp32" in warnings
    assert "target='x86-avx2' the convs" in warnings
    if hint is None:
        assert "target='native' picks" not in warnings
    else:
        assert hint in warnings


class _ScoresOfTwoProjections(paddle.nn.Layer):
    """Attention scores: a matmul of two activations, both signed."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key = paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 8)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(self.query(x), self.key(x), transpose_y=True)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize(
    "flags, hint",
    [(("avx2", "avx512f", "avx512_vnni"), "target='native' picks x86-vnni here"), (("avx2",), None)],
)
def test_activation_matmul_warning_names_vnni_as_the_only_target(
    target, flags, hint, monkeypatch, caplog
) -> None:
    """The warning of an activation matmul kept fp32 gave the conv/fc reasons and pointed an
    x86-avx2 user to target='x86-avx2' (and to 'native', which picks it on AVX2), neither of
    which runs it int8."""
    paddle.seed(0)
    warnings = _convert_warnings(
        _ScoresOfTwoProjections(), paddle.randn([4, 6, 8]), target, flags, monkeypatch, caplog
    )
    assert (f"target '{target}': 1 matmuls of two activations stay fp32 (activation_matmul_0): "
            "oneDNN runs both operands as s8, and without VNNI its int16 pair sums saturate. "
            "PTQConfig(target='x86-vnni') quantizes them for VNNI/AMX CPUs only") in warnings
    assert "target='x86-avx2'" not in warnings and "picks x86-avx2" not in warnings
    assert "read a signed input" not in warnings  # the Linears are shifted
    assert (hint in warnings) if hint else "target='native'" not in warnings


def test_signed_input_warning_on_x86_avx2_points_to_vnni_only(monkeypatch, caplog) -> None:
    """A layer x86-avx2 keeps fp32 (a grouped conv of 3 channels a group on a signed input:
    oneDNN's AVX2 kernel for it does not halve its weights) was told to use target='x86-avx2'."""
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(6, 6, 3, padding=1, groups=2), paddle.nn.Conv2D(6, 6, 3, padding=1, groups=2)
    )
    warnings = _convert_warnings(model, paddle.randn([4, 6, 5, 5]), "x86-avx2", ("avx2",), monkeypatch, caplog)
    assert "read a signed input and stay fp32" in warnings
    assert "PTQConfig(target='x86-vnni') quantizes them for VNNI/AMX CPUs only." in warnings
    assert "target='x86-avx2'" not in warnings and "target='native'" not in warnings


class _NormedLinear(paddle.nn.Layer):
    """A square Linear reading a LayerNorm output (signed: a shifted input on x86), or its
    ReLU (u8), then a head."""

    def __init__(self, signed: bool) -> None:
        super().__init__()
        self.signed = signed
        self.norm = paddle.nn.LayerNorm(32)
        self.fc = paddle.nn.Linear(32, 32)
        self.head = paddle.nn.Linear(32, 4)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        hidden = self.norm(x) if self.signed else paddle.nn.functional.relu(self.norm(x))
        return self.head(paddle.nn.functional.relu(self.fc(hidden)))


@pytest.mark.parametrize("signed", [True, False], ids=["shifted", "u8"])
@pytest.mark.parametrize("bits", [6, 7])
def test_per_tensor_weights_below_8_bits_run_as_simulated(signed, bits, tmp_path) -> None:
    """Paddle dequantizes stored weight codes as ``float32(float32(code / 127) * scale)`` before
    its fc re-derives their scales; at the re-derivation's rounding ties (a code half its
    channel's largest) that float32 value decides the side. Simulated as one float64 product,
    a 6-bit per-tensor square Linear was 0.4-0.8% off Paddle Inference."""
    import imperative_ptq as ip
    from imperative_ptq.export import create_predictor, predict

    paddle.seed(0)
    model = _NormedLinear(signed)
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.AbsmaxQuantizer(bits)))
    quantized = ptq.quantize(model)
    for _ in range(3):
        quantized(paddle.to_tensor(rng.standard_normal((16, 32)).astype("float32")))
    ptq.convert(quantized)
    x = rng.standard_normal((64, 32)).astype("float32")
    simulated = quantized(paddle.to_tensor(x)).numpy()
    prefix = str(tmp_path / "normed")
    ptq.save_quantized_model(quantized, prefix, [paddle.static.InputSpec([None, 32], "float32", "x")])
    np.testing.assert_allclose(
        predict(create_predictor(prefix, num_threads=1), x)[0], simulated, atol=1e-5 * np.abs(simulated).max()
    )


def test_create_predictor_warns_about_patch_convs_on_amx_cpus(tmp_path, caplog) -> None:
    """oneDNN's AMX int8 kernels computed an unpadded conv with its kernel equal to its stride
    wrongly for some channel counts (measured on this package's AMX Xeon: Conv2D(32, 32, 4,
    stride=4) at cosine 0.09 to the simulation, exact on its VNNI kernels): on an AMX CPU
    ``create_predictor`` names such convs and the fix; elsewhere it says nothing."""
    from imperative_ptq.export.predictor import patch_convs, program_desc

    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(32, 32, 4, stride=4), paddle.nn.ReLU(), paddle.nn.Conv2D(32, 8, 3, stride=1, padding=1)
    )
    model.eval()
    rng = np.random.default_rng(0)
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target="x86-vnni"))
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, [rng.standard_normal((2, 32, 16, 16)).astype(np.float32) for _ in range(2)], progress=False)
    ptq.convert(qmodel)
    prefix = str(tmp_path / "m")
    save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 32, 16, 16], "float32", "x")])
    assert len(patch_convs(program_desc(prefix + ".pdmodel"))) == 1  # the 4x4 stride-4 conv only
    with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
        create_predictor(prefix)
    warned = "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI" in caplog.text
    assert warned == (ip.cpu_info().isa == "amx"), caplog.text


def test_signed_input_warning_names_every_layer_it_keeps_fp32(monkeypatch, caplog) -> None:
    """The warning named the first 10 of the layers it kept fp32 and ended with "...": a
    detector with 30 such convs left 20 unnamed."""
    paddle.seed(0)
    model = paddle.nn.Sequential(*[paddle.nn.Conv2D(2, 2, 3, padding=1) for _ in range(12)])
    warnings = _convert_warnings(model, paddle.randn([4, 2, 5, 5]), "x86", ("avx2",), monkeypatch, caplog)
    # (The first conv reads the signed input too.)
    names = ", ".join(str(index) for index in range(12))
    assert f"target 'x86': 12 layers read a signed input and stay fp32 ({names}):" in warnings
