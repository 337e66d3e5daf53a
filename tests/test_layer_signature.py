"""Tables and state files record what each layer was measured on; a model with the same layer
names but another architecture refuses them, naming the first layer that differs."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from imperative_ptq import (
    AbsmaxQuantizer,
    ImperativePTQ,
    KLQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
)


class _Net(paddle.nn.Layer):
    """conv -> relu -> pool(pooled x pooled) -> fc: ``channels`` changes the conv's weight,
    ``pooled`` only the fc's input size."""

    def __init__(self, channels: int = 8, pooled: int = 2) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, channels, 3, padding=1)
        self.relu = paddle.nn.ReLU()
        self.pool = paddle.nn.AdaptiveAvgPool2D(pooled)
        self.flatten = paddle.nn.Flatten()
        self.fc = paddle.nn.Linear(channels * pooled * pooled, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def _ptq(weight_quantizer=None) -> ImperativePTQ:
    return ImperativePTQ(
        PTQConfig(AbsmaxQuantizer(), weight_quantizer or PerChannelAbsmaxQuantizer()),
        asynchronous=False,
    )


def _saved(tmp_path, ptq: ImperativePTQ) -> tuple:
    paddle.seed(3)
    qmodel = ptq.quantize(_Net())
    qmodel(paddle.rand([2, 3, 8, 8]))
    table, state = tmp_path / "table.json", tmp_path / "state.npz"
    ptq.save_calibration_table(qmodel, table)
    ptq.save_state(qmodel, state)
    return table, state


@pytest.mark.parametrize(
    "other, match",
    [
        # 16 instead of 8 output channels: the conv differs first.
        (dict(channels=16), r"layer 'conv' .*channel count 8 in the file, 16 in the model"),
        # Same channels, the fc reads 72 features instead of 32.
        (dict(pooled=3), r"layer 'fc' .*weight shape \[32, 5\] in the file, \[72, 5\]"),
    ],
)
def test_table_and_state_of_another_architecture_are_refused(tmp_path, other, match) -> None:
    ptq = _ptq(AbsmaxQuantizer())  # per-tensor weights: no channel count to trip over
    table, state = _saved(tmp_path, ptq)
    for load, path in ((ptq.load_calibration_table, table), (ptq.load_state, state)):
        qmodel = ptq.quantize(_Net(**other))
        with pytest.raises(ValueError, match=match):
            load(qmodel, path)
        # Nothing was loaded: the model still has no statistics.
        with pytest.raises(Exception, match="no calibration data"):
            ptq.calibration_table(qmodel)


def test_table_of_other_quantizer_arguments_is_refused(tmp_path) -> None:
    table, _ = _saved(tmp_path, _ptq())
    other = _ptq(PerChannelAbsmaxQuantizer(quant_bits=4))
    with pytest.raises(ValueError, match=r"layer 'conv' weight .*PerChannelAbsmaxQuantizer.*quant_bits"):
        other.load_calibration_table(other.quantize(_Net()), table)
    kl = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()))
    with pytest.raises(ValueError, match=r"layer 'conv' input was measured with 'AbsmaxQuantizer'"):
        kl.load_calibration_table(kl.quantize(_Net()), table)


def test_files_record_what_each_layer_was_measured_on(tmp_path) -> None:
    table, state = _saved(tmp_path, _ptq())
    from imperative_ptq.calibration_state import read_state

    for recorded in (json.loads(table.read_text())["measured_on"], read_state(state)[0]["measured_on"]):
        assert recorded["conv"]["layer"] == "Conv2D"
        assert recorded["conv"]["weight_shape"] == [8, 3, 3, 3] and recorded["conv"]["channels"] == 8
        assert recorded["fc"]["weight_shape"] == [32, 5] and recorded["fc"]["channels"] == 5
        assert recorded["relu"] == {
            "layer": "ReLU", "weight_shape": None, "channels": None,
            "quantizers": {"output": {"type": "AbsmaxQuantizer", "config": AbsmaxQuantizer().config()}},
        }
        assert set(recorded["fc"]["quantizers"]) == {"input", "output", "weight"}


def test_files_without_the_record_still_load(tmp_path) -> None:
    """Tables and states written before the record existed load as before (unchecked)."""
    ptq = _ptq()
    table, state = _saved(tmp_path, ptq)
    document = json.loads(table.read_text())
    del document["measured_on"]
    table.write_text(json.dumps(document))
    with np.load(state) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(str(arrays["__header__"]))
    del header["measured_on"]
    arrays["__header__"] = np.asarray(json.dumps(header))
    np.savez(state, **arrays)

    paddle.seed(3)
    model = _Net()
    reference = ptq.quantize(model)
    ptq.load_state(reference, state)
    expected = ptq.calibration_table(reference)
    fresh = ptq.quantize(model)
    ptq.load_calibration_table(fresh, table)
    assert ptq.calibration_table(fresh) == expected
    # Unchecked: an old table lands on a model with another fc input size, as it always did.
    ptq.load_calibration_table(ptq.quantize(_Net(pooled=3)), table)


def test_malformed_record_is_a_value_error_naming_the_file(tmp_path) -> None:
    ptq = _ptq()
    table, _ = _saved(tmp_path, ptq)
    document = json.loads(table.read_text())
    for bad in ([1, 2], {"conv": "Conv2D"}, {"conv": {"layer": "Conv2D"}}):
        document["measured_on"] = bad
        table.write_text(json.dumps(document))
        with pytest.raises(ValueError, match="table.json"):
            ptq.load_calibration_table(ptq.quantize(_Net()), table)


def test_exported_table_records_the_layers_too(tmp_path) -> None:
    """PREFIX.calibration.json is the table save_calibration_table writes: it refuses another
    architecture as well."""
    ptq = _ptq()
    paddle.seed(3)
    qmodel = ptq.quantize(_Net())
    qmodel(paddle.rand([2, 3, 8, 8]))
    ptq.save_quantized_model(
        qmodel, tmp_path / "model", [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    )
    exported = tmp_path / "model.calibration.json"
    assert json.loads(exported.read_text())["measured_on"]["conv"]["channels"] == 8
    with pytest.raises(ValueError, match=r"layer 'conv' .*channel count 8 in the file, 16"):
        ptq.load_calibration_table(ptq.quantize(_Net(channels=16)), exported)
