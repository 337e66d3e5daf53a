"""Calibration state save/resume/merge, distributed sync, and clean-up after faults."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import paddle
import pytest

from imperative_ptq import (
    AbsmaxQuantizer,
    CalibrationError,
    HistQuantizer,
    ImperativePTQ,
    KLQuantizer,
    MovingAverageAbsmaxQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
)
from imperative_ptq.session import hooked_states

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker  # noqa: E402
from checkout import checkout_env  # noqa: E402


def _model() -> paddle.nn.Layer:
    paddle.seed(1)
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 6, 3), paddle.nn.ReLU(), paddle.nn.Flatten(), paddle.nn.Linear(6 * 36, 5)
    )


def _batches(count: int, seed: int = 0) -> list[paddle.Tensor]:
    rng = np.random.default_rng(seed)
    return [
        paddle.to_tensor(rng.standard_normal((4, 3, 8, 8)).astype("float32") * (1 + i % 3))
        for i in range(count)
    ]


def _all_hooks(model: paddle.nn.Layer) -> int:
    return sum(
        len(layer._forward_post_hooks) + len(layer._forward_pre_hooks)
        for layer in model.sublayers(include_self=True)
    )


CONFIGS = {
    "abs_max": PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()),
    "kl": PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer()),
    "hist": PTQConfig(HistQuantizer(), AbsmaxQuantizer()),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resume_from_saved_state_equals_uninterrupted_run(name: str, tmp_path) -> None:
    batches = _batches(6)
    ptq = ImperativePTQ(CONFIGS[name])
    full = ptq.quantize(_model())
    for x in batches:
        full(x)
    expected = ptq.calibration_table(full)

    first = ptq.quantize(_model())
    for x in batches[:3]:
        first(x)
    ptq.save_state(first, tmp_path / "state.npz")
    resumed = ptq.quantize(_model())
    ptq.load_state(resumed, tmp_path / "state.npz")
    for x in batches[3:]:
        resumed(x)
    assert ptq.calibration_table(resumed) == expected


class _TwoHeads(paddle.nn.Layer):
    """A conv stem, a pool and two Linear heads the model returns."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = paddle.nn.Conv2D(3, 16, 3, padding=1)
        self.a, self.b = paddle.nn.Linear(16, 4), paddle.nn.Linear(16, 3)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        features = paddle.nn.functional.relu(self.stem(x)).mean([2, 3])
        return self.a(features), self.b(features)


def test_model_loading_a_state_converts_as_the_calibrated_one(tmp_path) -> None:
    """The state file records what calibration saw of the graph (the structure section of the
    calibration table), so convert decides as for the calibrated model. Before, a model loading
    the state lost it: head ``a``, which the model returns and whose weights Paddle's fc would
    round again, ran as that fc in the loaded model and on its own per-channel weights in the
    calibrated one (0.6% of the largest logit apart)."""
    rng = np.random.default_rng(0)
    batches = [rng.random((2, 3, 32, 32)).astype("float32") for _ in range(3)]
    paddle.seed(2)
    model = _TwoHeads()
    model.eval()
    ptq = ImperativePTQ()
    calibrated = ptq.quantize(model)
    ptq.calibrate(calibrated, batches, progress=False)
    ptq.save_state(calibrated, tmp_path / "state.npz")
    ptq.convert(calibrated)
    loaded = ImperativePTQ()
    resumed = loaded.quantize(model)
    loaded.load_state(resumed, tmp_path / "state.npz")
    loaded.convert(resumed)
    assert resumed.a.runs_as_conv == calibrated.a.runs_as_conv
    x = paddle.to_tensor(rng.random((8, 3, 32, 32)).astype("float32"))
    for expected, got in zip(calibrated(x), resumed(x)):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_shards_match_one_pass(name: str, tmp_path) -> None:
    batches = _batches(6)
    ptq = ImperativePTQ(CONFIGS[name])
    single = ptq.quantize(_model())
    for x in batches:
        single(x)
    expected = ptq.calibration_table(single)

    shard_a, shard_b = ptq.quantize(_model()), ptq.quantize(_model())
    for x in batches[:3]:
        shard_a(x)
    for x in batches[3:]:
        shard_b(x)
    ptq.save_state(shard_b, tmp_path / "b.npz")
    ptq.load_state(shard_a, tmp_path / "b.npz", merge=True)
    merged = ptq.calibration_table(shard_a)
    for layer, roles in expected.items():
        for role, values in roles.items():
            if name == "abs_max" or role == "weight":
                assert merged[layer][role] == values  # exact
            else:
                # Histograms are re-binned when merged: within a few bins of one pass.
                np.testing.assert_allclose(merged[layer][role], values, rtol=0.05)


def test_state_mismatch_names_the_first_difference(tmp_path) -> None:
    ptq = ImperativePTQ(CONFIGS["kl"])
    qmodel = ptq.quantize(_model())
    qmodel(_batches(1)[0])
    ptq.save_state(qmodel, tmp_path / "state.npz")

    other_model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.ReLU())
    other = ptq.quantize(other_model)
    with pytest.raises(ValueError, match="'3/input' in the file is not a quantizer"):
        ptq.load_state(other, tmp_path / "state.npz")

    other_algorithm = ImperativePTQ(CONFIGS["abs_max"])
    with pytest.raises(ValueError, match="KLQuantizer"):
        other_algorithm.load_state(other_algorithm.quantize(_model()), tmp_path / "state.npz")

    other_bins = ImperativePTQ(PTQConfig(KLQuantizer(bins=2048), PerChannelAbsmaxQuantizer()))
    with pytest.raises(ValueError, match="arguments"):
        other_bins.load_state(other_bins.quantize(_model()), tmp_path / "state.npz")


def test_state_file_errors(tmp_path) -> None:
    ptq = ImperativePTQ(CONFIGS["kl"])
    qmodel = ptq.quantize(_model())
    with pytest.raises(FileNotFoundError):
        ptq.load_state(qmodel, tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a calibration state"):
        ptq.load_state(qmodel, tmp_path / "junk.npz")
    header = {"format": "imperative_ptq.calibration_state", "format_version": 99, "quantizers": {}}
    np.savez(tmp_path / "future.npz", __header__=np.asarray(json.dumps(header)))
    with pytest.raises(ValueError, match="version 99"):
        ptq.load_state(qmodel, tmp_path / "future.npz")


def test_state_write_is_atomic(tmp_path, monkeypatch) -> None:
    ptq = ImperativePTQ(CONFIGS["kl"])
    qmodel = ptq.quantize(_model())
    qmodel(_batches(1)[0])
    target = tmp_path / "state.npz"
    ptq.save_state(qmodel, target)
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        ptq.save_state(qmodel, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def test_moving_average_merge_is_weighted_mean() -> None:
    a, b = MovingAverageAbsmaxQuantizer(0.5), MovingAverageAbsmaxQuantizer(0.5)
    a.sample_data(None, (paddle.to_tensor([2.0]),))
    b.sample_data(None, (paddle.to_tensor([4.0]),))
    a.merge(b)
    a.cal_thresholds()
    assert a.thresholds == [3.0]


@pytest.mark.parametrize("interrupt", [RuntimeError("data loader failed"), KeyboardInterrupt()])
def test_calibrating_context_always_removes_hooks(interrupt: BaseException) -> None:
    model = _model()
    ptq = ImperativePTQ(CONFIGS["kl"])
    qmodel = ptq.quantize(model)
    baseline = _all_hooks(model)
    batches = _batches(3)
    with pytest.raises(type(interrupt)):
        with ptq.calibrating(qmodel):
            qmodel(batches[0])
            raise interrupt
    assert _all_hooks(qmodel) == baseline
    # The model is usable as fp32, statistics survived, calibration can resume.
    np.testing.assert_allclose(qmodel(batches[1]).numpy(), model(batches[1]).numpy(), rtol=1e-6)
    assert ptq.calibration_table(qmodel)
    with ptq.calibrating(qmodel):
        qmodel(batches[2])
    ptq.convert(qmodel)
    assert _all_hooks(qmodel) == baseline


def test_calibrate_leaves_the_hooks_as_it_found_them() -> None:
    """A model fresh from quantize keeps calibrating on its own forwards after calibrate (its
    forwards were silently left out: a batch of 100s after calibrate on ones kept the input
    threshold at 1); after remove_hooks, calibrate removes them again."""
    ptq = ImperativePTQ(PTQConfig(AbsmaxQuantizer(), PerChannelAbsmaxQuantizer()))
    qmodel = ptq.quantize(_model())
    ptq.calibrate(qmodel, [paddle.ones([2, 3, 8, 8])], progress=False)
    qmodel(paddle.full([2, 3, 8, 8], 100.0))
    first = next(iter(ptq.calibration_table(qmodel).values()))
    assert first["input"] == [100.0]
    ptq.remove_hooks(qmodel)
    ptq.calibrate(qmodel, [paddle.ones([2, 3, 8, 8])], progress=False)
    assert _all_hooks(qmodel) == _all_hooks(_model())


def test_remove_hooks_keeps_statistics() -> None:
    ptq = ImperativePTQ(CONFIGS["abs_max"])
    qmodel = ptq.quantize(_model())
    qmodel(_batches(1)[0])
    table = ptq.calibration_table(qmodel)
    ptq.remove_hooks(qmodel)
    assert _all_hooks(qmodel) == 0
    qmodel(_batches(1, seed=5)[0] * 100)  # not observed any more
    assert ptq.calibration_table(qmodel) == table


def test_calibrate_drives_the_loop_with_limits() -> None:
    ptq = ImperativePTQ(CONFIGS["abs_max"])
    qmodel = ptq.quantize(_model())
    hooked = _all_hooks(qmodel)
    batches = [(x.numpy(), np.zeros(4, dtype=np.int64)) for x in _batches(5)]
    assert ptq.calibrate(qmodel, batches, max_batches=2, progress=False) == 2
    assert _all_hooks(qmodel) == hooked  # as quantize left them
    assert ptq.calibrate(qmodel, iter(batches), progress=False) == 5
    assert ptq.calibrate(qmodel, batches, time_budget=1e-9, progress=False) == 1
    with pytest.raises(ValueError, match="max_batches"):
        ptq.calibrate(qmodel, batches, max_batches=0)
    with pytest.raises(ValueError, match="no calibration batch"):
        ptq.calibrate(qmodel, [], progress=False)


def test_worker_error_surfaces_and_hooks_are_removable() -> None:
    ptq = ImperativePTQ(CONFIGS["abs_max"])
    qmodel = ptq.quantize(_model())
    qmodel(_batches(1)[0])
    # A batch with another number of tensors per call makes the quantizer raise on the worker.
    state = hooked_states(qmodel)[0]
    state.input_quantizer.observe_samples = lambda samples, layer=None: (_ for _ in ()).throw(
        ValueError("boom")
    )
    with pytest.raises(CalibrationError, match="boom"):
        with ptq.calibrating(qmodel):
            qmodel(_batches(1)[0])
    assert _all_hooks(qmodel) == 0


def _cdf_distance(a: dict, b: dict) -> float:
    """Largest difference between the normalized cumulative histograms of two states."""
    grid = np.linspace(0.0, min(a["upper"][0], b["upper"][0]), 4000)

    def cdf(state: dict) -> np.ndarray:
        counts = state["counts"][0].astype(np.float64)
        edges = np.linspace(0.0, state["upper"][0], counts.shape[0] + 1)
        return np.interp(grid, edges, np.concatenate(([0.0], np.cumsum(counts) / counts.sum())))

    return float(np.abs(cdf(a) - cdf(b)).max())


# 4: more processes than the machine's 2 cores (~11 s).
@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_sync_matches_union(tmp_path, processes) -> None:
    import paddle.distributed as dist

    import imperative_ptq
    from imperative_ptq.calibration_state import read_state

    dist.spawn(distributed_worker.run, args=(str(tmp_path),), nprocs=processes, backend="gloo")
    for algorithm in distributed_worker.ALGORITHMS:
        rank0 = json.loads((tmp_path / f"rank0_{algorithm}.json").read_text())
        for rank in range(1, processes):
            other = json.loads((tmp_path / f"rank{rank}_{algorithm}.json").read_text())
            assert other == rank0, algorithm  # every rank ends with the same thresholds

        config = PTQConfig(getattr(imperative_ptq, algorithm)(), PerChannelAbsmaxQuantizer())
        ptq = ImperativePTQ(config)
        single = ptq.quantize(distributed_worker.build_model())
        for rank in range(processes):
            for batch in distributed_worker.shard_batches(rank):
                single(paddle.to_tensor(batch))
        expected = ptq.calibration_table(single)
        assert expected.keys() == rank0.keys()
        if algorithm == "AbsmaxQuantizer":
            assert rank0 == expected  # exact
            continue
        # Histogram statistics equal one pass up to re-binning: the normalized cumulative
        # histograms differ by < 0.1% of the mass everywhere with 2 ranks. Each further rank
        # is one more re-binning merge: 4 ranks measured 0.124% (KL and hist alike).
        ptq.save_state(single, tmp_path / "single.npz")
        _, merged_states = read_state(tmp_path / f"rank0_{algorithm}.npz")
        _, single_states = read_state(tmp_path / "single.npz")
        bound = 1e-3 if processes == 2 else 2e-3
        for key, state in single_states.items():
            assert _cdf_distance(state, merged_states[key]) < bound, (algorithm, key)
        for layer, roles in expected.items():
            if "weight" in roles:
                assert rank0[layer]["weight"] == roles["weight"]  # same weights: exact
            for role in ("input", "output"):
                if role not in roles:
                    continue
                # The percentile moves with the histogram (within 3%). KL does not: on these
                # 12k-value tails its argmin jumps by up to 13% when the histogram range moves
                # by 0.3% (measured: 6.40 at range 8.601 vs 7.25 at 8.574 on one fixed
                # histogram of the same values), so it is held to a looser bound.
                tolerance = 0.03 if algorithm == "HistQuantizer" else 0.15
                np.testing.assert_allclose(
                    rank0[layer][role], roles[role], rtol=tolerance,
                    err_msg=f"{algorithm} {layer} {role}",
                )


def test_a_script_failing_mid_calibration_exits_cleanly(tmp_path) -> None:
    """An exception escaping a script while the worker still reduces (no convert, hooks on)
    must end the process with Python's status 1, not abort it from C++ at finalization."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import paddle
        from imperative_ptq import ImperativePTQ
        layers = []
        for _ in range(24):
            layers += [paddle.nn.Linear(512, 512), paddle.nn.ReLU()]
        model = paddle.nn.Sequential(*layers)
        ptq = ImperativePTQ()
        qmodel = ptq.quantize(model)
        for _ in range(3):
            qmodel(paddle.randn([256, 512]))
        raise RuntimeError("the user's script fails here")
        """
    )
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
            env=checkout_env(),
        )
        assert result.returncode == 1, result.stderr[-3000:]
        assert "the user's script fails here" in result.stderr
        assert "FATAL" not in result.stderr
