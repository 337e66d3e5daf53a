"""ImperativePTQ's API: argument checking, model safety, hooks, tables, convert, registry."""

from __future__ import annotations

import json
import logging

import numpy as np
import paddle
import pytest
from paddle.quantization.imperative import ptq_quantizer as paddle_q
from paddle.quantization.imperative.ptq_config import PTQConfig as PaddlePTQConfig

from imperative_ptq import (
    AbsmaxQuantizer,
    CalibrationError,
    HistQuantizer,
    ImperativePTQ,
    KLQuantizer,
    MSEQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    PTQRegistry,
    QuantizedLayer,
    TensorRTKLQuantizer,
    register_layer,
)
from imperative_ptq.quantizers import MIN_THRESHOLD
from imperative_ptq.session import hooked_states



class Net(paddle.nn.Layer):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 4, 3, padding=1)
        self.bn1 = paddle.nn.BatchNorm2D(4)
        self.relu1 = paddle.nn.ReLU()
        self.pool = paddle.nn.AdaptiveAvgPool2D(2)
        self.flatten = paddle.nn.Flatten()
        self.fc = paddle.nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu1(self.bn1(self.conv1(x))))))


def _net(classes: int = 10) -> Net:
    model = Net(classes)
    with paddle.no_grad():
        model.bn1._mean.set_value(paddle.rand([4]))
        model.bn1._variance.set_value(paddle.rand([4]) + 0.5)
        model.bn1.weight.set_value(paddle.rand([4]) + 0.5)
        model.bn1.bias.set_value(paddle.rand([4]))
    model.eval()
    return model


def _batches(n: int = 3, shape=(2, 3, 8, 8)):
    return [paddle.randn(list(shape)) * (i + 1) for i in range(n)]


def _calibrate(ptq: ImperativePTQ, qmodel, batches=None):
    with paddle.no_grad():
        for x in batches if batches is not None else _batches():
            qmodel(x)
    return ptq.calibration_table(qmodel)


def _snapshot(model: paddle.nn.Layer):
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    hooks = {
        name: (
            list(layer._forward_pre_hooks),
            list(layer._forward_post_hooks),
            layer.training,
            sorted(vars(layer)),
        )
        for name, layer in model.named_sublayers(include_self=True)
    }
    return state, hooks


def _assert_same_snapshot(a, b) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        np.testing.assert_array_equal(a[0][key], b[0][key], err_msg=key)


def _hooked(model: paddle.nn.Layer) -> set[str]:
    return {state.name for state in hooked_states(model)}


# -------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("model", ["model", None, 3, paddle.randn([2])])
def test_non_layer_model_raises_type_error(model) -> None:
    with pytest.raises(TypeError, match="model"):
        ImperativePTQ().quantize(model)


def test_quant_config_type_checked() -> None:
    # (Paddle's own PTQConfig is taken as this package's: test_paddles_own_ptq_config_...)
    with pytest.raises(TypeError, match="quant_config must be an imperative_ptq.PTQConfig"):
        ImperativePTQ({"activation_quantizer": KLQuantizer()})
    assert ImperativePTQ(PaddlePTQConfig(paddle_q.KLQuantizer(), paddle_q.AbsmaxQuantizer())).quant_config.to_dict() == (
        PTQConfig(KLQuantizer(), AbsmaxQuantizer()).to_dict()
    )


@pytest.mark.parametrize(
    "activation, weight, argument",
    [
        (KLQuantizer, PerChannelAbsmaxQuantizer(), "activation_quantizer"),
        (KLQuantizer(), PerChannelAbsmaxQuantizer, "weight_quantizer"),
        (PerChannelAbsmaxQuantizer(), PerChannelAbsmaxQuantizer(), "activation_quantizer"),
        (KLQuantizer(), KLQuantizer(), "weight_quantizer"),
        (paddle_q.KLQuantizer(), PerChannelAbsmaxQuantizer(), "activation_quantizer"),
        (KLQuantizer(), paddle_q.PerChannelAbsmaxQuantizer(), "weight_quantizer"),
        ("kl", AbsmaxQuantizer(), "activation_quantizer"),
    ],
)
def test_wrong_quantizer_types(activation, weight, argument) -> None:
    with pytest.raises(TypeError, match=argument):
        PTQConfig(activation, weight)


@pytest.mark.parametrize(
    "factory",
    [
        AbsmaxQuantizer,
        PerChannelAbsmaxQuantizer,
        HistQuantizer,
        KLQuantizer,
        MSEQuantizer,
        TensorRTKLQuantizer,
    ],
)
def test_quant_bits_validated(factory) -> None:
    for bits in (0, -1, 17, 64):
        with pytest.raises(ValueError, match="quant_bits"):
            factory(quant_bits=bits)
    for bits in (8.0, "8", True, None):
        with pytest.raises(TypeError, match="quant_bits"):
            factory(quant_bits=bits)


def test_quant_bits_bounds_accepted() -> None:
    assert AbsmaxQuantizer(quant_bits=1).quant_bits == 1
    assert AbsmaxQuantizer(quant_bits=np.int64(16)).quant_bits == 16


def test_kl_with_too_few_bins() -> None:
    with pytest.raises(ValueError, match="bins"):
        KLQuantizer(bins=200)  # 8 bits needs >= 255
    with pytest.raises(ValueError, match="bins"):
        KLQuantizer(quant_bits=4, bins=14)
    assert KLQuantizer(quant_bits=4, bins=15).bins == 15
    with pytest.raises(ValueError, match="bins"):
        TensorRTKLQuantizer(bins=127)
    with pytest.raises(ValueError, match="bins"):
        HistQuantizer(bins=0)
    with pytest.raises(ValueError, match="hist_percent"):
        HistQuantizer(hist_percent=1.0)


# -------------------------------------------------------------------- batch norm & modes
def test_training_model_never_changes_batch_norm() -> None:
    model = _net()
    model.train()
    mean, var = model.bn1._mean.numpy().copy(), model.bn1._variance.numpy().copy()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    assert not qmodel.training and not qmodel.bn1.training
    assert model.training and model.bn1.training  # the user's model keeps its mode
    _calibrate(ptq, qmodel)
    np.testing.assert_array_equal(qmodel.bn1._mean.numpy(), mean)
    np.testing.assert_array_equal(qmodel.bn1._variance.numpy(), var)

    qmodel.train()
    with pytest.raises(CalibrationError, match="bn1"):
        qmodel(paddle.randn([2, 3, 8, 8]) * 10 + 5)
    np.testing.assert_array_equal(qmodel.bn1._mean.numpy(), mean)
    np.testing.assert_array_equal(qmodel.bn1._variance.numpy(), var)
    np.testing.assert_array_equal(model.bn1._mean.numpy(), mean)


def test_table_before_any_batch_raises() -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_net())
    with pytest.raises(CalibrationError):
        ptq.calibration_table(qmodel)
    with pytest.raises(CalibrationError):
        ptq.convert(qmodel)


def test_table_of_unprepared_model_raises() -> None:
    with pytest.raises(ValueError, match="quantize"):
        ImperativePTQ().calibration_table(_net())


# ------------------------------------------------------------------------------ odd data
@pytest.mark.parametrize(
    "quantizer", [KLQuantizer(), HistQuantizer(), AbsmaxQuantizer(), MSEQuantizer()],
    ids=["kl", "hist", "absmax", "mse"],
)
def test_nan_and_inf_are_ignored(quantizer) -> None:
    ptq = ImperativePTQ(PTQConfig(quantizer, PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_net())
    batches = _batches()
    data = batches[1].numpy()
    data[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    batches[1] = paddle.to_tensor(data)
    table = _calibrate(ptq, qmodel, batches)
    for name, entry in table.items():
        for role, values in entry.items():
            assert all(np.isfinite(values)) and all(v > 0 for v in values), (name, role)
    if isinstance(quantizer, AbsmaxQuantizer):
        values = np.concatenate([b.numpy().ravel() for b in batches])
        assert table["conv1"]["input"] == [float(np.abs(values[np.isfinite(values)]).max())]


def test_all_zero_tensor_gets_positive_threshold() -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_net())
    table = _calibrate(ptq, qmodel, [paddle.zeros([2, 3, 8, 8])] * 2)
    assert table["conv1"]["input"] == [MIN_THRESHOLD]
    for entry in table.values():
        for values in entry.values():
            assert all(np.isfinite(values)) and min(values) > 0
    ptq.convert(qmodel)
    assert np.all(np.isfinite(qmodel(paddle.randn([1, 3, 8, 8])).numpy()))


def test_batches_of_varying_shape() -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_net())
    shapes = [(1, 3, 8, 8), (4, 3, 5, 7), (2, 3, 16, 16)]
    table = _calibrate(ptq, qmodel, [paddle.randn(list(s)) for s in shapes])
    assert set(table) == {"conv1", "bn1", "relu1", "pool", "fc"}


# --------------------------------------------------------------------------------- hooks
def test_quantizing_twice_raises_and_never_doubles_hooks() -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_net())
    hooks = {n: len(l._forward_post_hooks) for n, l in qmodel.named_sublayers(include_self=True)}
    for inplace in (False, True):
        with pytest.raises(ValueError, match="already quantized"):
            ptq.quantize(qmodel, inplace=inplace)
    with pytest.raises(ValueError, match="already quantized"):
        ImperativePTQ().quantize(qmodel)
    assert hooks == {
        n: len(l._forward_post_hooks) for n, l in qmodel.named_sublayers(include_self=True)
    }
    assert hooks["conv1"] == 1
    _calibrate(ptq, qmodel)
    ptq.convert(qmodel)
    with pytest.raises(ValueError, match="already quantized"):
        ptq.quantize(qmodel)


def test_not_inplace_never_touches_user_model() -> None:
    model = _net()
    model.train()
    model.conv1.register_forward_post_hook(lambda layer, inputs, output: None)
    before = _snapshot(model)
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    assert qmodel is not model
    _calibrate(ptq, qmodel)
    ptq.convert(qmodel)
    _assert_same_snapshot(before, _snapshot(model))
    assert not _hooked(model)


def test_inplace_hooks_the_user_model() -> None:
    model = _net()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model, inplace=True)
    assert qmodel is model
    assert _hooked(model) == {"conv1", "bn1", "relu1", "pool", "fc"}
    assert len(model.conv1._forward_post_hooks) == 1


def test_skip_quant_layers_are_not_hooked() -> None:
    model = _net()
    model.conv1.skip_quant = True
    model.relu1.skip_quant = True
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    assert _hooked(qmodel) == {"bn1", "pool", "fc"}
    table = _calibrate(ptq, qmodel)
    assert "conv1" not in table and "relu1" not in table
    ptq.convert(qmodel)
    assert isinstance(qmodel.conv1, paddle.nn.Conv2D) and isinstance(qmodel.fc, QuantizedLayer)


def test_hook_runs_first_among_existing_post_hooks() -> None:
    model = _net()
    model.conv1.register_forward_post_hook(lambda layer, inputs, output: output * 100.0)
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), AbsmaxQuantizer()))
    qmodel = ptq.quantize(model)
    (state,) = [s for s in hooked_states(qmodel) if s.name == "conv1"]
    assert next(iter(qmodel.conv1._forward_post_hooks)) == state.hook._hook_id
    x = paddle.randn([2, 3, 8, 8])
    table = _calibrate(ptq, qmodel, [x])
    raw = paddle.nn.functional.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)
    assert table["conv1"]["output"] == [float(paddle.max(paddle.abs(raw)))]
    # The user's hook still runs after ours: the next layer sees the scaled output.
    scaled = model.bn1(model.conv1(x))
    assert table["bn1"]["output"] == [float(paddle.max(paddle.abs(scaled)))]


# ---------------------------------------------------------------------------------- fuse
def test_fuse_folds_conv_and_bn() -> None:
    model = _net()
    x = paddle.randn([2, 3, 8, 8])
    expected = model(x).numpy()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model, fuse=True, fuse_list=[["conv1", "bn1"]])
    assert isinstance(qmodel.bn1, paddle.nn.Identity)
    assert isinstance(model.bn1, paddle.nn.BatchNorm2D)  # the user's model is not folded
    np.testing.assert_allclose(qmodel(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert "bn1" not in ptq.calibration_table(qmodel)


@pytest.mark.parametrize(
    "fuse_list, error",
    [
        (None, TypeError),
        ("conv1", TypeError),
        ([["conv1"]], TypeError),
        ([["conv1", "bn1", "relu1"]], TypeError),
        ([["conv1", "relu1"]], ValueError),
        ([["nope", "bn1"]], ValueError),
        ([["conv1", "bn1.x"]], ValueError),
    ],
)
def test_bad_fuse_list_raises(fuse_list, error) -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(error):
        ImperativePTQ().quantize(model, fuse=True, fuse_list=fuse_list)
    _assert_same_snapshot(before, _snapshot(model))


# -------------------------------------------------------------------- calibration tables
def test_save_load_round_trip(tmp_path) -> None:
    model = _net()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    table = _calibrate(ptq, qmodel)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, path)

    fresh_ptq = ImperativePTQ()
    fresh = fresh_ptq.quantize(model)
    fresh_ptq.load_calibration_table(fresh, path)
    assert fresh_ptq.calibration_table(fresh) == table
    fresh_ptq.convert(fresh)
    ptq.convert(qmodel)
    x = paddle.randn([2, 3, 8, 8])
    np.testing.assert_array_equal(fresh(x).numpy(), qmodel(x).numpy())


def test_table_from_other_model_names_first_mismatch(tmp_path) -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_net())
    _calibrate(ptq, qmodel)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, path)

    class Renamed(Net):
        def __init__(self) -> None:
            super().__init__()
            self.head = self.fc
            del self.fc

        def forward(self, x):
            return self.head(self.flatten(self.pool(self.relu1(self.bn1(self.conv1(x))))))

    other = ImperativePTQ().quantize(Renamed())
    with pytest.raises(ValueError, match="'fc'"):
        ImperativePTQ().load_calibration_table(other, path)

    wider = ImperativePTQ().quantize(_net(classes=7))
    with pytest.raises(ValueError, match="'fc'"):
        ImperativePTQ().load_calibration_table(wider, path)


def test_round_trip_with_layers_that_saw_no_data(tmp_path) -> None:
    """A layer that never ran, or whose output is not a float tensor, is in the table as an
    empty entry (or without ``output``) and the table loads back into the same model."""

    class Branchy(Net):
        def __init__(self) -> None:
            super().__init__()
            self.unused = paddle.nn.Linear(16, 3)
            self.maxpool = paddle.nn.MaxPool2D(2, return_mask=True)

        def forward(self, x):
            x, _ = self.maxpool(self.relu1(self.bn1(self.conv1(x))))
            return self.fc(self.flatten(self.pool(x)))

    model = Branchy()
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    table = _calibrate(ptq, qmodel)
    assert "unused" not in table and "maxpool" not in table
    path = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, path)
    saved = json.loads(path.read_text())["layers"]
    assert saved["unused"] == {} and saved["maxpool"] == {}
    fresh_ptq = ImperativePTQ()
    fresh = fresh_ptq.quantize(model)
    fresh_ptq.load_calibration_table(fresh, path)
    assert fresh_ptq.calibration_table(fresh) == table
    fresh_ptq.convert(fresh)
    assert isinstance(fresh.unused, paddle.nn.Linear) and isinstance(fresh.fc, QuantizedLayer)


def test_unknown_format_version_raises(tmp_path) -> None:
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(_net())
    _calibrate(ptq, qmodel)
    path = tmp_path / "table.json"
    ptq.save_calibration_table(qmodel, path)
    document = json.loads(path.read_text())
    document["format_version"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="version"):
        ptq.load_calibration_table(ptq.quantize(_net()), path)
    document["format_version"] = 1
    document["layers"]["fc"]["input"] = [-1.0]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="fc"):
        ptq.load_calibration_table(ptq.quantize(_net()), path)


# -------------------------------------------------------------------------------- convert
def test_convert_removes_every_hook_and_wraps_layers() -> None:
    # x86-vnni: conv1 reads a signed input, which the default x86 target keeps fp32.
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target="x86-vnni"))
    qmodel = ptq.quantize(_net())
    _calibrate(ptq, qmodel)
    assert qmodel._forward_pre_hooks and qmodel._forward_post_hooks
    assert ptq.convert(qmodel) is qmodel
    for name, layer in qmodel.named_sublayers(include_self=True):
        assert not layer._forward_post_hooks, name
        assert not layer._forward_pre_hooks, name
    assert not hooked_states(qmodel)  # no calibration state left on any layer
    assert isinstance(qmodel.conv1, QuantizedLayer) and isinstance(qmodel.fc, QuantizedLayer)
    for name, layer in qmodel.named_sublayers():
        if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear)):
            assert name.endswith(".layer"), name  # only inside a QuantizedLayer
    structure = [(n, type(l)) for n, l in qmodel.named_sublayers()]
    assert ptq.convert(qmodel) is qmodel  # twice: a no-op
    assert structure == [(n, type(l)) for n, l in qmodel.named_sublayers()]


@pytest.mark.parametrize(
    "quantizer", [KLQuantizer(), HistQuantizer(hist_percent=0.99), AbsmaxQuantizer()],
    ids=["kl", "hist", "absmax"],
)
def test_synchronous_equals_asynchronous(quantizer) -> None:
    model = _net()
    batches = _batches(4)
    tables = []
    for asynchronous in (True, False):
        ptq = ImperativePTQ(PTQConfig(quantizer, PerChannelAbsmaxQuantizer()), asynchronous=asynchronous)
        tables.append(_calibrate(ptq, ptq.quantize(model), batches))
    assert tables[0] == tables[1]


@pytest.mark.parametrize("asynchronous", [True, False])
def test_in_place_op_between_hooked_layers(asynchronous: bool) -> None:
    """A tensor changed in place between two hooks is sampled again, not served from cache."""

    class InPlace(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = paddle.nn.Conv2D(3, 4, 3)
            self.conv2 = paddle.nn.Conv2D(4, 4, 1)

        def forward(self, x):
            y = self.conv1(x)
            y.scale_(100.0)
            return self.conv2(y)

    model = InPlace()
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), AbsmaxQuantizer()), asynchronous=asynchronous)
    x = paddle.randn([2, 3, 6, 6])
    table = _calibrate(ptq, ptq.quantize(model), [x])
    raw = float(paddle.max(paddle.abs(model.conv1(x))))
    assert table["conv1"]["output"] == [raw]
    assert table["conv2"]["input"] == [pytest.approx(100.0 * raw, rel=1e-6)]


class _IntOutput(paddle.nn.Layer):
    def forward(self, x):
        return paddle.argmax(x, axis=1)


def test_tuple_or_int_output_skipped_with_one_warning(caplog) -> None:
    PTQRegistry.register(_IntOutput)
    try:
        model = paddle.nn.Sequential(
            paddle.nn.Conv2D(3, 4, 3),
            paddle.nn.MaxPool2D(2, return_mask=True),  # returns (out, mask)
        )
        holder = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), _IntOutput())

        class Both(paddle.nn.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = model, holder

            def forward(self, x):
                return self.a(x)[0], self.b(x)

        ptq = ImperativePTQ()
        qmodel = ptq.quantize(Both())
        with caplog.at_level(logging.WARNING, logger="imperative_ptq"):
            table = _calibrate(ptq, qmodel)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        skipped = sorted(r.getMessage().split("'")[1] for r in warnings if "not calibrated" in r.getMessage())
        assert skipped == ["a.1", "b.1"]
        assert "output" in table["a.0"] and "a.1" not in table and "b.1" not in table
        ptq.convert(qmodel)
    finally:
        PTQRegistry.unregister(_IntOutput)


# ------------------------------------------------------------------------------- registry
def test_registry_queries_for_classes_and_instances() -> None:
    nn = paddle.nn
    for layer in (nn.Conv2D, nn.Conv2D(2, 2, 1), nn.Linear, nn.Linear(2, 3), nn.LSTM(2, 2)):
        assert PTQRegistry.is_supported_layer(layer)
        assert PTQRegistry.is_simulated_quant_layer(layer)
    for layer in (nn.ReLU, nn.ReLU(), nn.BatchNorm2D(3), nn.MaxPool2D(2)):
        assert PTQRegistry.is_supported_layer(layer)
        assert not PTQRegistry.is_simulated_quant_layer(layer)
    for layer in (nn.Flatten, nn.Flatten(), nn.GRU(2, 2), nn.Dropout):
        assert not PTQRegistry.is_supported_layer(layer)
        assert not PTQRegistry.is_simulated_quant_layer(layer)
        assert PTQRegistry.layer_info(layer) is None
    assert PTQRegistry.layer_info(nn.Linear(2, 3)).weight_channel_axis == 1
    assert PTQRegistry.layer_info(nn.Conv2D).weight_channel_axis == 0


def test_registry_has_paddles_names_for_its_queries_and_maps() -> None:
    """Paddle's ``is_registered_layer`` and its two maps answer as Paddle's registry does
    for the layers both hook (checked against Paddle's own registry)."""
    from paddle.quantization.imperative.ptq_registry import PTQRegistry as PaddleRegistry

    nn = paddle.nn
    for layer in (nn.Conv2D, nn.Linear(2, 3), nn.ReLU(), nn.BatchNorm2D(3), nn.MaxPool2D(2)):
        assert PTQRegistry.is_registered_layer(layer) == PaddleRegistry.is_registered_layer(layer) is True
    assert not PTQRegistry.is_registered_layer(nn.Flatten())
    PaddleRegistry._init()
    for layer_type in PaddleRegistry.supported_layers_map:
        assert PTQRegistry.supported_layers_map[layer_type].layer is layer_type
    assert PTQRegistry.registered_layers_map is PTQRegistry.supported_layers_map
    assert PTQRegistry.layer_info(nn.LSTM).weight_attribute == "weight_ih_l0"
    assert PTQRegistry.layer_info(nn.quant.add).input_names == ("X", "Y")


def test_registry_defaults() -> None:
    nn = paddle.nn
    assert PTQRegistry.layer_info(nn.Conv1D).weight_channel_axis == 0
    assert PTQRegistry.layer_info(nn.Conv2DTranspose(2, 3, 3)).weight_channel_axis == 1
    assert PTQRegistry.is_simulated_quant_layer(nn.Conv2DTranspose)
    grouped, depthwise = nn.Conv2D(4, 8, 3, groups=2), nn.Conv2D(4, 4, 3, groups=4)
    for conv in (grouped, depthwise):
        assert PTQRegistry.layer_info(conv).weight_channel_axis == 0
    model = paddle.nn.Sequential(
        nn.Conv1D(3, 4, 3), nn.ReLU()
    )
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    table = _calibrate(ptq, qmodel, [paddle.randn([2, 3, 10])])
    assert len(table["0"]["weight"]) == 4
    model = paddle.nn.Sequential(nn.Conv2DTranspose(3, 5, 3), depthwise.__class__(5, 5, 3, groups=5))
    ptq = ImperativePTQ()
    table = _calibrate(ptq, ptq.quantize(model), [paddle.randn([2, 3, 6, 6])])
    assert len(table["0"]["weight"]) == 5 and len(table["1"]["weight"]) == 5


def test_user_registered_layer_gets_hooked() -> None:
    @register_layer(weight_names=("W",), weight_channel_axis=0, simulated=True)
    class Scale(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.weight = self.create_parameter([3, 1])

        def forward(self, x):
            return x * self.weight

    try:
        assert isinstance(Scale, type)  # the decorator returns the class
        assert PTQRegistry.is_simulated_quant_layer(Scale())

        class SubScale(Scale):  # subclasses are covered through the MRO
            pass

        assert PTQRegistry.layer_info(SubScale).layer is Scale
        model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), Scale())
        ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
        qmodel = ptq.quantize(model)
        assert _hooked(qmodel) == {"0", "1"}
        x = paddle.randn([3, 4])
        table = _calibrate(ptq, qmodel, [x])
        expected = np.abs(model[1].weight.numpy()).max(axis=1).tolist()
        assert table["1"]["weight"] == expected
        assert table["1"]["input"] == table["0"]["output"]
    finally:
        PTQRegistry.unregister(Scale)
    assert not PTQRegistry.is_supported_layer(Scale)


def test_register_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="layer"):
        PTQRegistry.register(int)
    with pytest.raises(ValueError, match="weight_channel_axis"):
        PTQRegistry.register(paddle.nn.Identity, simulated=True)
    assert not PTQRegistry.is_supported_layer(paddle.nn.Identity)


def test_paddles_own_ptq_config_is_taken_as_the_same_quantizers() -> None:
    """A drop-in: ``ImperativePTQ(paddle.quantization.PTQConfig(...))`` was a TypeError
    ("got PTQConfig", which read as a contradiction)."""
    import paddle.quantization as paddle_quantization

    from imperative_ptq import AbsmaxQuantizer, HistQuantizer

    paddles = paddle_quantization.PTQConfig(
        paddle_quantization.HistQuantizer(quant_bits=7, bins=512, hist_percent=0.999),
        paddle_quantization.AbsmaxQuantizer(),
    )
    taken = ImperativePTQ(paddles).quant_config
    ours = PTQConfig(HistQuantizer(quant_bits=7, bins=512, hist_percent=0.999), AbsmaxQuantizer())
    assert taken.to_dict() == ours.to_dict()
    tables = []
    for config in (paddles, ours):
        ptq = ImperativePTQ(config)
        paddle.seed(0)
        qmodel = ptq.quantize(_net())
        tables.append(_calibrate(ptq, qmodel))
    assert tables[0] == tables[1]

    class _Custom(paddle_quantization.AbsmaxQuantizer):
        pass

    with pytest.raises(TypeError, match=r"activation quantizer .*_Custom, which imperative_ptq has no counterpart of"):
        ImperativePTQ(paddle_quantization.PTQConfig(_Custom(), paddle_quantization.AbsmaxQuantizer()))
    with pytest.raises(TypeError, match=r"quant_config must be an imperative_ptq.PTQConfig .*got builtins.int"):
        ImperativePTQ(3)


def test_support_lists_hold_paddles_quantizers_under_their_names() -> None:
    """``paddle.quantization.SUPPORT_ACT_QUANTIZERS`` / ``SUPPORT_WT_QUANTIZERS`` had no
    counterpart: a drop-in import of them failed."""
    import paddle.quantization as paddle_quantization

    import imperative_ptq as ip

    for ours, paddles, role in (
        (ip.SUPPORT_ACT_QUANTIZERS, paddle_quantization.SUPPORT_ACT_QUANTIZERS, "for_activations"),
        (ip.SUPPORT_WT_QUANTIZERS, paddle_quantization.SUPPORT_WT_QUANTIZERS, "for_weights"),
    ):
        assert {cls.__name__ for cls in paddles} <= {cls.__name__ for cls in ours}
        assert all(getattr(cls, role) for cls in ours)
    for cls in ip.SUPPORT_ACT_QUANTIZERS:
        PTQConfig(cls(), ip.PerChannelAbsmaxQuantizer())  # each is accepted in its role
    for cls in ip.SUPPORT_WT_QUANTIZERS:
        PTQConfig(ip.KLQuantizer(), cls())
