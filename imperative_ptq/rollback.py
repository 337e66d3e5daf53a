"""Loading a file into a model's quantizers all or nothing.

``load_calibration_table`` and ``load_state`` check each layer's entry as they apply it, so a
file whose tenth layer is wrong would otherwise leave nine layers loaded: the model would then
compute thresholds from a mix of the file and its own statistics.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

from .session import LayerState

__all__ = ["restored_on_failure"]


@contextlib.contextmanager
def restored_on_failure(states: Sequence[LayerState]) -> Iterator[None]:
    """Restores every quantizer of ``states`` as it was if the block raises."""
    quantizers = [
        quantizer
        for state in states
        for quantizer in (
            state.input_quantizer, state.second_input_quantizer, state.output_quantizer,
            state.weight_quantizer,
        )
        if quantizer is not None
    ]
    saved = [copy.deepcopy(vars(quantizer)) for quantizer in quantizers]
    try:
        yield
    except BaseException:
        for quantizer, attributes in zip(quantizers, saved):
            vars(quantizer).clear()
            vars(quantizer).update(attributes)
        raise
