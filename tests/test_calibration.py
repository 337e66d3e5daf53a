"""Calibration: the session's hooks and worker, batches of every shape, copies and sharing."""

from __future__ import annotations

import copy
import gc

import numpy as np
import paddle
import pytest

from imperative_ptq import ImperativePTQ, PTQConfig
from imperative_ptq.collector import CalibrationError
from imperative_ptq.quantizers import AbsmaxQuantizer, PerChannelAbsmaxQuantizer
from imperative_ptq.session import calibrating_session
from models import mlp


def _ptq() -> ImperativePTQ:
    return ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))


class _KeywordInput(paddle.nn.Layer):
    """Calls its first Linear with a keyword input: ``fc1(input=x)``."""

    def __init__(self, keyword: bool = True) -> None:
        super().__init__()
        self.keyword = keyword
        # Not smaller: Paddle's oneDNN int8 is 10-30% off on Linear layers of <= 16 features.
        self.fc1 = paddle.nn.Linear(32, 48)
        self.fc2 = paddle.nn.Linear(48, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(self.fc1(input=x) if self.keyword else self.fc1(x))


def test_worker_thread_stops_when_quantized_model_is_dropped() -> None:
    ptq = _ptq()
    qmodel = ptq.quantize(mlp(4, 8, 2))
    qmodel(paddle.randn([3, 4]))
    ptq.calibration_table(qmodel)  # flushes, but neither converts nor removes the hooks
    worker = calibrating_session(qmodel).collector.worker
    assert worker is not None and worker.is_alive()
    del qmodel
    gc.collect()
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_keyword_input_layer_is_calibrated_converted_and_exported(tmp_path) -> None:
    """``fc1(input=x)``: the hook sees the keyword input, and the converted layer takes it,
    computing what the same model calling ``fc1(x)`` computes."""
    from imperative_ptq.export import create_predictor, predict

    x = paddle.rand([64, 32])  # non-negative: int8 on the default x86 target
    tables, outputs = [], []
    for keyword in (True, False):
        paddle.seed(9)
        ptq = _ptq()
        qmodel = ptq.quantize(_KeywordInput(keyword))
        qmodel(x)
        tables.append(ptq.calibration_table(qmodel))
        path = tmp_path / f"table-{keyword}.json"
        ptq.save_calibration_table(qmodel, path)
        fresh = ptq.quantize(_KeywordInput(keyword))
        ptq.load_calibration_table(fresh, path)
        assert ptq.calibration_table(fresh) == tables[-1]
        ptq.convert(qmodel)
        assert type(qmodel.fc1).__name__ == "QuantizedLayer"
        outputs.append(qmodel(x).numpy())
        if keyword:
            prefix = str(tmp_path / "keyword")
            ptq.save_quantized_model(qmodel, prefix, [paddle.static.InputSpec([None, 32], "float32")])
            deployed = predict(create_predictor(prefix), x.numpy())[0]
            np.testing.assert_allclose(deployed, outputs[-1], atol=0.05 * np.abs(outputs[-1]).max())
    assert tables[0] == tables[1]
    assert tables[0]["fc1"]["input"][0] == pytest.approx(float(paddle.abs(x).max()))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    with pytest.raises(TypeError, match="missing its input 'input'"):
        qmodel.fc1(x=x)  # Linear.forward names its input ``input``


def test_deepcopy_of_calibrating_model() -> None:
    ptq = _ptq()
    qmodel = ptq.quantize(mlp(4, 8, 2))
    with pytest.raises(TypeError, match="remove_hooks"):
        copy.deepcopy(qmodel)
    qmodel(paddle.randn([3, 4]))
    ptq.remove_hooks(qmodel)
    clone = copy.deepcopy(qmodel)
    # The copy calibrates on its own; the original's statistics are untouched.
    before = ptq.calibration_table(qmodel)
    with ptq.calibrating(clone):
        clone(paddle.randn([3, 4]) * 100)
    assert ptq.calibration_table(qmodel) == before
    assert ptq.calibration_table(clone)["0"]["input"][0] > before["0"]["input"][0]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_batches": 2.0}, TypeError),
        ({"max_batches": True}, TypeError),
        ({"max_batches": 0}, ValueError),
        ({"time_budget": "1"}, TypeError),
        ({"time_budget": 0}, ValueError),
    ],
)
def test_calibrate_validates_arguments(kwargs, error) -> None:
    ptq = _ptq()
    qmodel = ptq.quantize(mlp(4, 8, 2))
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        ptq.calibrate(qmodel, [np.ones((2, 4), np.float32)], progress=False, **kwargs)


class _FailingQuantizer(AbsmaxQuantizer):
    def observe(self, index, sample) -> None:
        raise RuntimeError("boom")


def test_worker_error_names_the_layer() -> None:
    ptq = ImperativePTQ(PTQConfig(_FailingQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(mlp(4, 8, 2))
    # The worker may report during the forward or at the next flush, whichever comes first.
    with pytest.raises(CalibrationError, match=r"sampling 0: boom"):
        qmodel(paddle.randn([3, 4]))
        ptq.calibration_table(qmodel)


def test_calibrate_passes_two_inputs_to_a_two_input_model() -> None:
    class TwoInputs(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.embed = paddle.nn.Embedding(10, 4)
            self.fc = paddle.nn.Linear(4, 2)

        def forward(self, ids, segments):
            return self.fc(self.embed(ids) + self.embed(segments))

    ptq = ImperativePTQ()
    qmodel = ptq.quantize(TwoInputs())
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    # Both items are integer arrays: neither is a label, both must reach forward.
    assert ptq.calibrate(qmodel, [(ids, ids % 2)], progress=False) == 1
    labelled = [(np.random.rand(2, 4).astype("float32"), np.array([0, 1]))]
    mlp = ptq.quantize(paddle.nn.Sequential(paddle.nn.Linear(4, 3)))
    assert ptq.calibrate(mlp, labelled, progress=False) == 1  # the labels are dropped


def test_dict_batches_become_keyword_inputs() -> None:
    """A dict batch calls forward with keywords; keys forward does not take (labels) are
    dropped, non-array values are passed as they are."""

    class Gated(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.fc = paddle.nn.Linear(4, 3)

        def forward(self, image, mask=None, scale: float = 1.0):
            out = self.fc(image * scale)
            return out if mask is None else out * mask

    rng = np.random.default_rng(0)
    images = [rng.standard_normal((2, 4)).astype("float32") for _ in range(3)]
    masks = [np.ones((2, 3), np.float32) * 0.5 for _ in range(3)]
    dicts = [
        {"label": np.array([0, 1]), "mask": m, "image": x, "scale": 2.0}
        for x, m in zip(images, masks)
    ]
    tables = []
    for batches in (dicts, [(x, m) for x, m in zip(images, masks)]):
        paddle.seed(1)
        ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
        qmodel = ptq.quantize(Gated())
        assert ptq.calibrate(qmodel, batches, progress=False) == 3
        tables.append(ptq.calibration_table(qmodel))
    # The tuples leave scale at 1.0; the dicts pass scale=2.0 (a plain float, kept as is).
    assert tables[1]["fc"]["input"][0] == pytest.approx(max(np.abs(x).max() for x in images))
    assert tables[0]["fc"]["input"][0] == pytest.approx(2 * tables[1]["fc"]["input"][0])


def test_bad_fuse_list_leaves_the_model_untouched() -> None:
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Conv2D(4, 4, 3),
        paddle.nn.ReLU(),
    )
    model.eval()
    before = model[0].weight.numpy().copy()
    ptq = ImperativePTQ()
    with pytest.raises(ValueError, match="cannot fold"):  # the second pair is bad
        ptq.quantize(model, inplace=True, fuse=True, fuse_list=[["0", "1"], ["2", "3"]])
    np.testing.assert_array_equal(model[0].weight.numpy(), before)
    assert isinstance(model[1], paddle.nn.BatchNorm2D)
    with pytest.raises(ValueError, match="more than once"):
        ptq.quantize(model, fuse=True, fuse_list=[["0", "1"], ["0", "1"]])


def test_interrupted_submit_gives_back_its_buffer_holds(monkeypatch) -> None:
    from imperative_ptq.collector import CalibrationCollector

    collector = CalibrationCollector()
    tensor = paddle.randn([4, 8])
    sample = collector.sample(tensor)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(collector._jobs, "put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collector.submit(AbsmaxQuantizer(), [sample], "layer")
    collector.end_forward()  # the cache's hold is the last one: the buffer goes back
    assert sample.abs_values is None
    monkeypatch.undo()
    collector.close()


def test_a_layer_shared_under_two_names_is_quantized_under_both(tmp_path) -> None:
    from imperative_ptq.export import create_predictor, predict
    from imperative_ptq.quant_layers import QuantizedLayer

    class Shared(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv = paddle.nn.Conv2D(4, 4, 3, padding=1)
            self.again = self.conv  # the same layer under a second name
            self.head = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(4 * 6 * 6, 3))

        def forward(self, x):
            return self.head(self.again(paddle.nn.functional.relu(self.conv(x))))

    paddle.seed(2)
    model = Shared()
    model.eval()
    ptq = ImperativePTQ()
    qmodel = ptq.quantize(model)
    x = paddle.rand([16, 4, 6, 6])
    qmodel(x)
    ptq.convert(qmodel)
    assert isinstance(qmodel.conv, QuantizedLayer) and qmodel.again is qmodel.conv
    assert not isinstance(model.conv, QuantizedLayer)  # inplace=False: the user's model is intact

    simulated = qmodel(x).numpy()
    prefix = str(tmp_path / "shared")
    spec = [paddle.static.InputSpec([None, 4, 6, 6], "float32", "x")]
    ptq.save_quantized_model(qmodel, prefix, spec)
    deployed = predict(create_predictor(prefix), x.numpy())[0]
    cosine = np.sum(deployed * simulated) / np.linalg.norm(deployed) / np.linalg.norm(simulated)
    assert cosine > 0.99, cosine
