"""Property-based tests of quantizer statistics: state round-trips and merging."""

from __future__ import annotations

import numpy as np
import paddle
from hypothesis import given, settings
from hypothesis import strategies as st

from imperative_ptq import (
    AbsmaxQuantizer,
    HistQuantizer,
    KLQuantizer,
    MovingAverageAbsmaxQuantizer,
    MSEQuantizer,
    TensorRTKLQuantizer,
)

ALGORITHMS = [
    AbsmaxQuantizer,
    MovingAverageAbsmaxQuantizer,
    HistQuantizer,
    KLQuantizer,
    TensorRTKLQuantizer,
    MSEQuantizer,
]

batches = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=300),  # elements
        st.floats(min_value=1e-3, max_value=1e3),  # scale
        st.integers(min_value=0, max_value=2**31 - 1),  # seed
    ),
    min_size=1,
    max_size=6,
)


def _tensor(size: int, scale: float, seed: int) -> paddle.Tensor:
    values = np.random.default_rng(seed).standard_normal(size).astype(np.float32) * scale
    return paddle.to_tensor(values)


def _observe(quantizer, specs) -> None:
    for size, scale, seed in specs:
        quantizer.sample_data(None, (_tensor(size, scale, seed),))


@settings(max_examples=25, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), specs=batches)
def test_state_dict_round_trip_preserves_thresholds(algorithm, specs) -> None:
    original = algorithm()
    _observe(original, specs)
    restored = algorithm()
    restored.load_state_dict(original.state_dict())
    original.cal_thresholds()
    restored.cal_thresholds()
    assert restored.thresholds == original.thresholds
    assert restored.num_batches == original.num_batches
    for key, value in original.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[key], value)


@settings(max_examples=25, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), first=batches, second=batches)
def test_merge_conserves_mass_and_range(algorithm, first, second) -> None:
    a, b, union = algorithm(), algorithm(), algorithm()
    _observe(a, first)
    _observe(b, second)
    _observe(union, first + second)
    a.merge(b)
    assert a.num_batches == union.num_batches
    a.cal_thresholds()
    union.cal_thresholds()
    threshold, expected = a.thresholds[0], union.thresholds[0]
    assert np.isfinite(threshold) and threshold > 0
    if algorithm is AbsmaxQuantizer:
        assert threshold == expected
    if hasattr(a, "states"):
        merged, single = a.states[0], union.states[0]
        # No count is lost or invented, and the range covers everything seen.
        np.testing.assert_allclose(merged.counts.sum(), single.counts.sum(), rtol=1e-5)
        largest = max(float(np.abs(_tensor(*spec).numpy()).max()) for spec in first + second)
        assert merged.upper >= largest * (1 - 1e-6)


@settings(max_examples=20, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), specs=batches)
def test_merging_into_empty_equals_loading(algorithm, specs) -> None:
    source, empty = algorithm(), algorithm()
    _observe(source, specs)
    empty.merge(source)
    source.cal_thresholds()
    empty.cal_thresholds()
    assert empty.thresholds == source.thresholds


def test_range_growth_by_a_huge_factor_stays_bounded() -> None:
    # Paddle's merge would allocate bins * 6e6 floats (24 GB) for this second batch.
    quantizer = HistQuantizer()
    quantizer.sample_data(None, (paddle.to_tensor([0.001, -0.0005]),))
    quantizer.sample_data(None, (paddle.to_tensor([5.0, 1.0]),))
    state = quantizer.states[0]
    assert state.counts.shape == (1024,) and state.counts.sum() == 4
    assert state.upper >= 5.0
