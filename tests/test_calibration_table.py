"""The table and statistics files: build, apply, write, read; malformed files refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imperative_ptq.calibration_table import read_table


def test_read_table_rejects_bool_threshold(tmp_path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({
        "format": "imperative_ptq.calibration_table", "format_version": 1,
        "layers": {"0": {"output": [True]}},
    }))
    with pytest.raises(ValueError, match="finite positive"):
        read_table(path)


def test_read_state_rejects_header_without_quantizers(tmp_path) -> None:
    from imperative_ptq.calibration_state import read_state

    path = tmp_path / "state.npz"
    header = {"format": "imperative_ptq.calibration_state", "format_version": 1}
    np.savez(path, __header__=np.asarray(json.dumps(header)))
    with pytest.raises(ValueError, match="no quantizers"):
        read_state(path)
