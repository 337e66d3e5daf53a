"""The quantizer interface shared by every calibration algorithm.

A quantizer is attached to one role of one layer (its input, its output or its weight) and sees
the tensors of that role, batch after batch. Following Paddle's ``ptq_quantizer`` it keeps one
set of statistics per tensor position (``paddle.nn.quant.add`` has two inputs) and exposes
``sample_data`` / ``cal_thresholds`` / ``thresholds`` under Paddle's names. Underneath, the work is
split the way AIMET and NNCF split it:

* **sampling** reduces one batch into bounded statistics (``observe``), never keeping the batch;
* **computing** turns statistics into thresholds (``cal_thresholds``), as often as you like;
* statistics can be ``reset``, exported with ``state_dict`` and combined with ``merge`` (the basis of
  resumed and distributed calibration).

Thresholds follow Paddle's symmetric convention: ``q = round(x / threshold * (2**(bits-1) - 1))``.
:meth:`BaseQuantizer.quant_params` gives the same result as ``(scale, zero_point, dtype)``;
affine quantizers (``symmetric=False``) also compute a clip range ``[lo, hi]`` per tensor, whose
parameters are uint8 with a zero point, while their threshold stays ``max(-lo, hi)`` for Paddle.
"""

from __future__ import annotations

import abc
import inspect
import math
from typing import Any, ClassVar, Sequence

import numpy as np
import paddle

from .qparams import QuantParams, affine_qparams, symmetric_qparams
from .sample import TensorSample

__all__ = ["BaseQuantizer", "MIN_THRESHOLD", "Threshold", "validate_bool", "validate_quant_bits"]

#: The threshold of one tensor position: one float per tensor, or one per channel.
Threshold = float | list[float]

#: Smallest threshold ever returned. Paddle returns 0.0 for an all-zero tensor, which makes
#: ``x / threshold`` divide by zero downstream; any positive value represents zeros exactly.
#: It is the smallest float32 normal times 2**23, so that ``threshold / 127`` stays a normal
#: float (kernels that flush subnormals to zero would turn it into 0) while a legitimately tiny
#: tensor (values ~1e-30) keeps its own range.
MIN_THRESHOLD = float(np.finfo(np.float32).tiny) * 2.0**23

#: State-dict key of :attr:`BaseQuantizer.minimum`.
_MINIMUM = "minimum"


def validate_quant_bits(quant_bits: Any) -> int:
    """Returns ``quant_bits`` if it is an int in 1..16, else raises.

    Raises:
        TypeError: ``quant_bits`` is not an int.
        ValueError: ``quant_bits`` is outside 1..16.
    """
    if isinstance(quant_bits, bool) or not isinstance(quant_bits, (int, np.integer)):
        raise TypeError(f"quant_bits must be an int, got {type(quant_bits).__name__}")
    if not 1 <= quant_bits <= 16:
        raise ValueError(f"quant_bits must be in 1..16, got {quant_bits}")
    return int(quant_bits)


def validate_bool(name: str, value: Any) -> bool:
    """Returns ``value`` if it is a bool, else raises ``TypeError`` naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


class BaseQuantizer(abc.ABC):
    """Collects statistics of a layer's tensors and turns them into thresholds.

    Args:
        quant_bits: Bit width of the quantized integers, 1..16.

    Attributes:
        thresholds: Set by :meth:`cal_thresholds`: one entry per tensor position, a float for
            per-tensor quantizers and a list of floats (one per channel) for per-channel ones.
    """

    #: Whether the algorithm makes sense for activations / for weights.
    for_activations: ClassVar[bool] = True
    for_weights: ClassVar[bool] = False
    #: Whether ``observe`` needs the signed tensor, not only ``|x|`` (affine statistics). The
    #: collector copies ``x`` only for such quantizers, so the symmetric path pays nothing.
    uses_signed_values: bool = False
    #: Symmetric (Paddle's thresholds) or affine (clip ranges, uint8 with zero points).
    symmetric: bool = True

    def __init__(self, quant_bits: int = 8) -> None:
        self.quant_bits = validate_quant_bits(quant_bits)
        self.thresholds: list[Threshold] = []
        #: Affine quantizers: ``(lo, hi)`` per tensor position, set with ``thresholds``.
        self.ranges: list[tuple[Any, Any]] = []
        self.num_batches = 0
        #: Smallest value of the tensor seen (``None``: not observed). Non-negative tensors run
        #: as u8 on x86 (:mod:`imperative_ptq.targets`); kept apart from the algorithm's
        #: statistics because symmetric samples hold only ``|x|``.
        self.minimum: float | None = None
        self._frozen: list[Threshold] | None = None
        self._frozen_params: list[QuantParams] | None = None

    # ----------------------------------------------------------------------------- configuration
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild an equivalent, empty quantizer."""
        names = [
            name
            for name in inspect.signature(type(self).__init__).parameters
            if name != "self"
        ]
        return {name: getattr(self, name) for name in names}

    def clone(self) -> "BaseQuantizer":
        """A fresh quantizer with the same arguments and no statistics."""
        return type(self)(**self.config())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------------------------- sampling
    def sample_data(self, layer: paddle.nn.Layer | None, tensors: Sequence[paddle.Tensor]) -> None:
        """Reduces one batch of tensors into the statistics (Paddle's name and signature).

        Args:
            layer: The layer the tensors belong to (used by per-channel quantizers).
            tensors: One tensor per position, e.g. ``(x,)`` or ``(x, y)``.
        """
        tensors = self._check_tensors(tensors)
        signed = self.uses_signed_values
        self.observe_samples([TensorSample.from_tensor(t, signed) for t in tensors], layer)

    def observe_samples(
        self, samples: Sequence[TensorSample], layer: paddle.nn.Layer | None = None
    ) -> None:
        """Reduces one batch, given as prepared samples (one per tensor position)."""
        if self.num_batches and len(samples) != self.num_tensors:
            raise ValueError(
                f"{type(self).__name__} was sampled with {self.num_tensors} tensors per batch, "
                f"got {len(samples)}"
            )
        for index, sample in enumerate(samples):
            self.observe(index, sample)
        self.num_batches += 1

    def observe_minimum(self, value: float) -> None:
        """Folds one batch's smallest value into :attr:`minimum` (NaN is ignored)."""
        if math.isnan(value):
            return
        self.minimum = value if self.minimum is None else min(self.minimum, value)

    @abc.abstractmethod
    def observe(self, index: int, sample: TensorSample) -> None:
        """Merges one batch of the tensor at position ``index`` into the statistics."""

    @property
    @abc.abstractmethod
    def num_tensors(self) -> int:
        """Number of tensor positions seen so far."""

    # --------------------------------------------------------------------------------- computing
    @abc.abstractmethod
    def compute_threshold(self, index: int) -> float | np.ndarray:
        """Threshold of the tensor at ``index`` from the current statistics."""

    def observed_maximum(self, index: int) -> float | None:
        """The largest ``|x|`` seen of the tensor at ``index`` (``None``: not kept by this
        algorithm's statistics)."""
        return None

    def compute_range(self, index: int) -> tuple[Any, Any]:
        """Affine quantizers: the clip range ``(lo, hi)`` of the tensor at ``index``."""
        raise NotImplementedError(f"{type(self).__name__} has no affine statistics")

    def cal_thresholds(self) -> None:
        """Computes :attr:`thresholds` (and, if affine, :attr:`ranges`) from the statistics.

        Raises:
            RuntimeError: No batch was sampled and no thresholds were loaded.
        """
        if self._frozen is not None:
            self.thresholds = list(self._frozen)
            return
        if not self.num_batches:
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: run calibration batches first"
            )
        thresholds: list[Threshold] = []
        self.ranges = []
        for index in range(self.num_tensors):
            if self.symmetric:
                value = self.compute_threshold(index)
            else:
                # One search serves both: Paddle's threshold is the wider side of the range.
                low, high = self.compute_range(index)
                self.ranges.append((low, high))
                value = np.maximum(-np.asarray(low), np.asarray(high))
                value = value if value.ndim else float(value)
            if isinstance(value, np.ndarray):
                thresholds.append(np.maximum(value, MIN_THRESHOLD).astype(np.float64).tolist())
            else:
                value = float(value)
                thresholds.append(value if value >= MIN_THRESHOLD else MIN_THRESHOLD)
        self.thresholds = thresholds

    def set_thresholds(self, thresholds: Sequence[Threshold]) -> None:
        """Freezes ``thresholds`` (e.g. loaded from a calibration table) over any statistics.

        Raises:
            ValueError: A threshold is not finite and positive.
        """
        checked: list[Threshold] = []
        for value in thresholds:
            array = np.asarray(value, dtype=np.float64)
            if array.size == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
                raise ValueError(
                    f"thresholds must be finite and positive, got {value!r} "
                    f"for {type(self).__name__}"
                )
            checked.append(array.tolist() if array.ndim else float(array))
        self._frozen = checked
        self.thresholds = list(checked)

    def quant_params(self) -> list[QuantParams]:
        """``(scale, zero_point, dtype)`` per tensor position, from the last
        :meth:`cal_thresholds` (run first if it has not been).

        Symmetric quantizers give ``scale = threshold / (2**(bits-1) - 1)``, zero point 0,
        int8; affine ones the uint8 parameters of their clip range. Parameters loaded with
        :meth:`set_quant_params` win; an affine quantizer given only thresholds (a symmetric
        table) falls back to the symmetric parameters of those thresholds.
        """
        if self._frozen_params is not None:
            return list(self._frozen_params)
        if not self.thresholds:
            self.cal_thresholds()
        if self.symmetric or self._frozen is not None or len(self.ranges) != len(self.thresholds):
            return [symmetric_qparams(t, self.quant_bits) for t in self.thresholds]
        # A range that saw only zeros is widened: any positive range represents them exactly.
        return [
            affine_qparams(low, np.maximum(high, np.asarray(low) + MIN_THRESHOLD), self.quant_bits)
            for low, high in self.ranges
        ]

    def set_quant_params(self, params: Sequence[QuantParams]) -> None:
        """Freezes quantization parameters (e.g. loaded from a calibration table).

        Raises:
            TypeError: An entry is not a :class:`QuantParams`.
        """
        for value in params:
            if not isinstance(value, QuantParams):
                raise TypeError(f"params must hold QuantParams, got {type(value).__name__}")
        self._frozen_params = list(params)

    @property
    def is_calibrated(self) -> bool:
        """Whether thresholds can be computed (data was seen or thresholds were loaded)."""
        return self._frozen is not None or self.num_batches > 0

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """The statistics as numpy arrays (for saving, resuming and merging)."""
        state = self._statistics()
        state["num_batches"] = np.asarray(self.num_batches, dtype=np.int64)
        if self.minimum is not None:
            state[_MINIMUM] = np.asarray(self.minimum, dtype=np.float64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replaces the statistics by ``state`` (from :meth:`state_dict`).

        Raises:
            ValueError: ``state`` lacks a key, holds arrays of the wrong shape or type, or
                values that are not finite (the quantizer is left reset).
        """
        name = type(self).__name__
        if "num_batches" not in state:
            raise ValueError(f"{name} state has no 'num_batches'")
        for key, value in state.items():
            array = np.asarray(value)
            if array.dtype.kind not in "biuf" or not np.isfinite(array).all():
                raise ValueError(f"{name} state {key!r} must hold finite numbers, got {value!r}")
        num_batches, minimum = np.asarray(state["num_batches"]), state.get(_MINIMUM)
        if num_batches.size != 1 or num_batches.dtype.kind not in "iu" or num_batches.item() < 0:
            raise ValueError(f"{name} state 'num_batches' must be one count, got {num_batches!r}")
        if minimum is not None and np.asarray(minimum).size != 1:
            raise ValueError(f"{name} state {_MINIMUM!r} must be one number, got {minimum!r}")
        self.reset()
        if minimum is not None:
            self.minimum = float(np.asarray(minimum).item())
            state = {key: value for key, value in state.items() if key != _MINIMUM}
        try:
            self._load_statistics(state)
        except (KeyError, ValueError, IndexError, TypeError) as error:
            self.reset()
            raise ValueError(f"{name} state does not fit: {error}") from None
        self.num_batches = int(num_batches.item())

    def merge(self, other: "BaseQuantizer") -> None:
        """Adds the statistics of ``other`` (the same algorithm, arguments and tensors), as if
        its batches had been observed here: exact for abs-max, re-binned for histograms.

        Raises:
            TypeError: ``other`` is another algorithm.
            ValueError: ``other`` has other arguments or tensor shapes.
        """
        if type(other) is not type(self):
            raise TypeError(
                f"cannot merge {type(other).__name__} statistics into {type(self).__name__}"
            )
        if other.config() != self.config():
            raise ValueError(
                f"cannot merge {type(self).__name__} statistics with different arguments: "
                f"{other.config()} vs {self.config()}"
            )
        minima = [value for value in (self.minimum, other.minimum) if value is not None]
        if other.num_batches and not self.num_batches:
            self.load_state_dict(other.state_dict())
        elif other.num_batches:
            if other.num_tensors != self.num_tensors:
                raise ValueError(
                    f"cannot merge statistics of {other.num_tensors} tensors into "
                    f"{self.num_tensors}"
                )
            self._merge_statistics(other)
            self.num_batches += other.num_batches
        self.minimum = min(minima) if minima else None

    @abc.abstractmethod
    def _statistics(self) -> dict[str, np.ndarray]:
        """The algorithm's statistics as named arrays."""

    @abc.abstractmethod
    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        """Sets the algorithm's statistics from :meth:`_statistics` output."""

    @abc.abstractmethod
    def _merge_statistics(self, other: "BaseQuantizer") -> None:
        """Adds ``other``'s statistics (same type, config and number of tensors)."""

    def reset(self) -> None:
        """Forgets all statistics and thresholds."""
        self.thresholds = []
        self.ranges = []
        self.num_batches = 0
        self.minimum = None
        self._frozen = None
        self._frozen_params = None
        self._reset_statistics()

    @abc.abstractmethod
    def _reset_statistics(self) -> None:
        """Clears the algorithm's own statistics."""

    @staticmethod
    def _check_tensors(tensors: Any) -> tuple[paddle.Tensor, ...]:
        if isinstance(tensors, paddle.Tensor):
            tensors = (tensors,)
        if not isinstance(tensors, (tuple, list)) or not tensors:
            raise TypeError(
                f"tensors must be a non-empty tuple of paddle.Tensor, got {type(tensors).__name__}"
            )
        for position, tensor in enumerate(tensors):
            if not isinstance(tensor, paddle.Tensor):
                raise TypeError(
                    f"tensors[{position}] must be a paddle.Tensor, got {type(tensor).__name__}"
                )
            if not paddle.is_floating_point(tensor):
                raise TypeError(f"tensors[{position}] must be floating point, got {tensor.dtype}")
        return tuple(tensors)

