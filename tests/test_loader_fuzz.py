"""Random valid and corrupted tables and state files fed to the loaders: each ends in a loaded,
usable model or a ValueError naming the file, never another exception and never a partial
load."""

from __future__ import annotations

import io
import json
import math
import pathlib
import zipfile

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imperative_ptq import CalibrationError, ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig

_PTQ = ImperativePTQ(PTQConfig(KLQuantizer(bins=256), PerChannelAbsmaxQuantizer()), asynchronous=False)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=4,
)


def _model() -> paddle.nn.Layer:
    paddle.seed(5)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.Flatten(), paddle.nn.Linear(4 * 4 * 4, 3),
    )
    model.eval()
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[paddle.nn.Layer, bytes, bytes]:
    """The model and a valid table and state file of it."""
    model = _model()
    qmodel = _PTQ.quantize(model)
    qmodel(paddle.rand([2, 3, 4, 4]) - 0.2)
    directory = tmp_path_factory.mktemp("valid")
    _PTQ.save_calibration_table(qmodel, directory / "table.json")
    _PTQ.save_state(qmodel, directory / "state.npz")
    return model, (directory / "table.json").read_bytes(), (directory / "state.npz").read_bytes()


def _nodes(value, path=()):
    """Every (path, node) of a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _nodes(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _nodes(child, path + (index,))


def _mutate_json(data: st.DataObject, document):
    """``document`` with 0-3 random replacements, deletions or insertions."""
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        nodes = list(_nodes(document))
        path, node = data.draw(st.sampled_from(nodes), label="node")
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]), label="action")
        if not path:  # the whole document
            document = data.draw(json_values, label="document")
            continue
        if action == "insert" and not isinstance(node, (dict, list)):
            action = "replace"
        if action == "insert":
            if isinstance(node, dict):
                node[data.draw(st.text(max_size=6), label="key")] = data.draw(json_values)
            else:
                node.append(data.draw(json_values))
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values, label="value")
    return document


def _corrupt_bytes(data: st.DataObject, content: bytes) -> bytes:
    """Sometimes truncates ``content`` or flips one of its bytes."""
    kind = data.draw(st.sampled_from(["none", "none", "truncate", "flip"]), label="bytes")
    if kind == "truncate":
        return content[: data.draw(st.integers(0, len(content) - 1), label="length")]
    if kind == "flip":
        index = data.draw(st.integers(0, len(content) - 1), label="index")
        return content[:index] + bytes([content[index] ^ data.draw(st.integers(1, 255))]) + content[index + 1:]
    return content


def _check_outcome(load, model: paddle.nn.Layer, path: pathlib.Path, calibrated: bool = False) -> None:
    """Loads ``path`` into a fresh quantized model (``calibrated``: one that saw a batch)."""
    fresh = _PTQ.quantize(model)
    if calibrated:
        fresh(paddle.rand([2, 3, 4, 4]))
        before = _PTQ.calibration_table(fresh)
    try:
        load(fresh, path)
    except ValueError as error:
        assert str(path) in str(error), f"the error does not name the file: {error}"
        if calibrated:  # nothing was loaded or merged
            assert _PTQ.calibration_table(fresh) == before
        else:
            with pytest.raises(CalibrationError):
                _PTQ.calibration_table(fresh)
        return
    table = _PTQ.calibration_table(fresh)
    for name, entry in table.items():
        for role in ("input", "output", "weight"):
            values = np.asarray(entry.get(role, [1.0]), dtype=np.float64)
            assert np.isfinite(values).all() and (values > 0).all(), (name, role, values)
    _PTQ.convert(fresh)
    assert np.isfinite(fresh(paddle.rand([1, 3, 4, 4])).numpy()).all()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_tables_load_whole_or_raise_a_value_error_naming_the_file(saved, tmp_path, data) -> None:
    model, table, _ = saved
    document = _mutate_json(data, json.loads(table))
    content = _corrupt_bytes(data, json.dumps(document).encode())
    path = tmp_path / "fuzzed.json"
    path.write_bytes(content)
    _check_outcome(_PTQ.load_calibration_table, model, path)


def _random_array(data: st.DataObject) -> np.ndarray:
    dtype = data.draw(st.sampled_from(["float32", "float64", "int64", "bool", "<U3"]), label="dtype")
    shape = data.draw(st.lists(st.integers(0, 4), max_size=2), label="shape")
    values = data.draw(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                 min_size=int(np.prod(shape)), max_size=int(np.prod(shape))),
        label="values",
    )
    array = np.asarray(values, dtype=np.float64).reshape(shape)
    if dtype == "<U3":
        return array.astype(str).astype(dtype)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(array).astype(dtype) if dtype in ("int64", "bool") else array.astype(dtype)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_state_files_load_whole_or_raise_a_value_error_naming_the_file(saved, tmp_path, data) -> None:
    model, _, state = saved
    with np.load(io.BytesIO(state)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = _mutate_json(data, json.loads(str(arrays.pop("__header__"))))
    for _ in range(data.draw(st.integers(0, 2), label="array mutations")):
        name = data.draw(st.sampled_from(sorted(arrays) + ["conv/new"]), label="array")
        if name in arrays and data.draw(st.booleans(), label="delete"):
            del arrays[name]
        else:
            arrays[name] = _random_array(data)
    buffer = io.BytesIO()
    np.savez(buffer, __header__=np.asarray(json.dumps(header)), **arrays)
    path = tmp_path / "fuzzed.npz"
    path.write_bytes(_corrupt_bytes(data, buffer.getvalue()))
    if data.draw(st.booleans(), label="merge into a calibrated model"):
        _check_outcome(
            lambda qmodel, file: _PTQ.load_state(qmodel, file, merge=True), model, path, True
        )
    else:
        _check_outcome(_PTQ.load_state, model, path)


def test_fuzzing_reaches_both_outcomes(saved, tmp_path) -> None:
    """The unmutated files load (so the fuzz tests above do reach the loaded branch)."""
    model, table, state = saved
    (tmp_path / "t.json").write_bytes(table)
    (tmp_path / "s.npz").write_bytes(state)
    for load, name in ((_PTQ.load_calibration_table, "t.json"), (_PTQ.load_state, "s.npz")):
        fresh = _PTQ.quantize(model)
        load(fresh, tmp_path / name)
        assert all(math.isfinite(t) for t in _PTQ.calibration_table(fresh)["3"]["output"])
    assert zipfile.is_zipfile(io.BytesIO(state))
