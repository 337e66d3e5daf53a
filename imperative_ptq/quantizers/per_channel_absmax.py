"""Per-channel abs-max, for weights: one threshold per output channel.

One reduction serves every layer type: ``amax(|w|)`` over every axis but the channel axis, which
comes from the layer's :class:`~imperative_ptq.registry.LayerInfo` (Conv2D ``[out, in, kh, kw]``:
axis 0; Linear ``[in, out]`` and Conv2DTranspose ``[in, out, kh, kw]``: axis 1). Paddle's version
loops over channels with a device sync per channel.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle

from .base import BaseQuantizer
from .sample import TensorSample

__all__ = [
    "PerChannelAbsmaxQuantizer",
    "PerChannelWeightQuantizer",
    "check_channel_arrays",
    "fold_channel_array",
    "layer_channel_axis",
    "merge_channel_arrays",
    "per_channel_abs_max",
    "per_channel_min_max",
]


def _reduce_axes(tensor: paddle.Tensor, axis: int) -> list[int]:
    """Every axis of ``tensor`` but the channel ``axis`` (validated)."""
    ndim = tensor.ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a tensor of rank {ndim}")
    axis %= ndim
    return [a for a in range(ndim) if a != axis]


def per_channel_abs_max(tensor: paddle.Tensor, axis: int) -> np.ndarray:
    """``max |tensor|`` over every axis but ``axis``, as float64 numpy (NaN/Inf ignored).

    Raises:
        ValueError: ``axis`` is out of range for ``tensor``.
    """
    reduce_axes = _reduce_axes(tensor, axis)
    with paddle.no_grad():
        values = paddle.abs(tensor.detach().astype("float32"))
        values = paddle.where(paddle.isfinite(values), values, paddle.zeros_like(values))
        maxima = paddle.amax(values, axis=reduce_axes) if reduce_axes else values
    return maxima.numpy().astype(np.float64)


def per_channel_min_max(tensor: paddle.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` of ``tensor`` over every axis but ``axis``, float64 numpy.

    NaN and Inf are ignored; a channel with no finite value gets ``(+inf, -inf)``, the identity
    of the running reduction.

    Raises:
        ValueError: ``axis`` is out of range for ``tensor``.
    """
    reduce_axes = _reduce_axes(tensor, axis)
    with paddle.no_grad():
        values = tensor.detach().astype("float32")
        finite = paddle.isfinite(values)
        inf = paddle.full_like(values, np.inf)
        low, high = paddle.where(finite, values, inf), paddle.where(finite, values, -inf)
        if reduce_axes:
            low, high = paddle.amin(low, axis=reduce_axes), paddle.amax(high, axis=reduce_axes)
    return low.numpy().astype(np.float64), high.numpy().astype(np.float64)


def layer_channel_axis(layer: paddle.nn.Layer | None, quantizer_name: str) -> int:
    """The weight channel axis of ``layer`` from its :class:`PTQRegistry` entry.

    Raises:
        TypeError: ``layer`` is not a registered layer with a weight channel axis.
    """
    from ..registry import PTQRegistry  # the registry imports the quantizers

    info = PTQRegistry.layer_info(layer) if layer is not None else None
    if info is None or info.weight_channel_axis is None:
        raise TypeError(
            f"{quantizer_name} needs a layer with a weight channel axis in "
            f"PTQRegistry, got {type(layer).__name__}"
        )
    return info.weight_channel_axis


def check_channel_arrays(running: Sequence[np.ndarray], arrays: Sequence[np.ndarray]) -> None:
    """Checks that ``arrays`` (one per tensor position) can fold into ``running``.

    Raises:
        ValueError: The number of tensors or of channels differs from ``running``.
    """
    if not running:
        return
    if len(arrays) != len(running):
        raise ValueError(f"expected {len(running)} tensors per batch, got {len(arrays)}")
    for index, (mine, theirs) in enumerate(zip(running, arrays)):
        if np.size(theirs) != mine.shape[0]:
            raise ValueError(
                f"tensor {index} has {np.size(theirs)} channels, earlier statistics have "
                f"{mine.shape[0]}"
            )


def merge_channel_arrays(
    running: list[np.ndarray], arrays: Sequence[np.ndarray], reduce: np.ufunc
) -> list[np.ndarray]:
    """Folds per-channel arrays (one per tensor position) into ``running`` with ``reduce``
    (``np.maximum``/``np.minimum``), in place; the first call copies ``arrays``. A mismatch
    raises before anything changes.

    Raises:
        ValueError: The number of tensors or of channels differs from ``running``.
    """
    check_channel_arrays(running, arrays)
    arrays = [np.asarray(array, dtype=np.float64).reshape(-1) for array in arrays]
    if not running:
        return [array.copy() for array in arrays]
    for mine, theirs in zip(running, arrays):
        reduce(mine, theirs, out=mine)
    return running


def fold_channel_array(
    running: list[np.ndarray], index: int, array: np.ndarray, reduce: np.ufunc
) -> None:
    """Folds the per-channel ``array`` of tensor position ``index`` into ``running[index]``
    with ``reduce``, in place (a copy starts a new position). A mismatch raises before
    anything changes.

    Raises:
        ValueError: ``index`` skips a position, or the number of channels differs.
    """
    array = np.asarray(array, dtype=np.float64).reshape(-1)
    if index == len(running):
        running.append(array.copy())
        return
    if index > len(running):
        raise ValueError(f"tensor {index} observed before tensor {len(running)}")
    mine = running[index]
    if array.size != mine.size:
        raise ValueError(
            f"tensor {index} has {array.size} channels, earlier statistics have {mine.size}"
        )
    reduce(mine, array, out=mine)


class PerChannelWeightQuantizer(BaseQuantizer):
    """Base of the weight quantizers that keep statistics per output channel.

    ``sample_data(layer, (weight,))`` takes the channel axis from the layer's registry entry
    and goes through the common path (:meth:`BaseQuantizer.observe_samples`, which counts the
    batch); :meth:`observe` reduces each sample with :meth:`reduce_channels` along that axis
    and folds the result in with :meth:`observe_channel`.

    Attributes:
        channel_axis: The weight's channel axis, from the last :meth:`sample_data` (``None``
            until then; set it to feed :meth:`observe` samples directly).
    """

    for_activations = False
    for_weights = True

    def __init__(self, quant_bits: int = 8) -> None:
        super().__init__(quant_bits)
        self.channel_axis: int | None = None

    def reduce_channels(self, tensor: paddle.Tensor, axis: int) -> object:
        """The per-channel statistics of one weight tensor."""
        raise NotImplementedError

    def observe_channel(self, index: int, reduced: object) -> None:
        """Folds one :meth:`reduce_channels` result into the statistics of position ``index``."""
        raise NotImplementedError

    def sample_data(self, layer: paddle.nn.Layer | None, tensors: Sequence[paddle.Tensor]) -> None:
        """Reduces weights per channel; the channel axis comes from ``layer``'s registry entry.

        Raises:
            TypeError: ``layer`` is not a registered layer with a weight channel axis.
            ValueError: The number of tensors or channels differs from earlier batches.
        """
        tensors = self._check_tensors(tensors)
        self.channel_axis = layer_channel_axis(layer, type(self).__name__)
        signed = self.uses_signed_values
        self.observe_samples([TensorSample.from_tensor(t, signed) for t in tensors], layer)

    def observe(self, index: int, sample: TensorSample) -> None:
        """Reduces one weight sample along :attr:`channel_axis` and folds it in.

        Raises:
            ValueError: The channel axis is unknown, or the channel count differs.
        """
        if self.channel_axis is None:
            raise ValueError(
                f"{type(self).__name__} needs the weight's channel axis: call "
                "sample_data(layer, (weight,)) or set channel_axis first"
            )
        values = sample.signed_values if self.uses_signed_values else sample.abs_values
        self.observe_channel(index, self.reduce_channels(values, self.channel_axis))


class PerChannelAbsmaxQuantizer(PerChannelWeightQuantizer):
    """Per-channel abs-max quantizer (Paddle's ``PerChannelAbsmaxQuantizer``).

    ``sample_data(layer, (weight,))`` finds the channel axis from the layer's registry entry.

    Args:
        quant_bits: Bit width, 1..16.
    """

    def __init__(self, quant_bits: int = 8) -> None:
        super().__init__(quant_bits)
        self.abs_max_vals: list[np.ndarray] = []

    @property
    def num_tensors(self) -> int:
        return len(self.abs_max_vals)

    def reduce_channels(self, tensor: paddle.Tensor, axis: int) -> np.ndarray:
        return per_channel_abs_max(tensor, axis)

    def observe_channel(self, index: int, channel_maxima: np.ndarray) -> None:
        fold_channel_array(self.abs_max_vals, index, channel_maxima, np.maximum)

    def compute_threshold(self, index: int) -> np.ndarray:
        return self.abs_max_vals[index]

    def _statistics(self) -> dict[str, np.ndarray]:
        return {f"abs_max_vals.{i}": values.copy() for i, values in enumerate(self.abs_max_vals)}

    def _load_statistics(self, state: dict[str, np.ndarray]) -> None:
        count = sum(1 for key in state if key.startswith("abs_max_vals."))
        self.abs_max_vals = [
            np.asarray(state[f"abs_max_vals.{i}"], dtype=np.float64).reshape(-1).copy()
            for i in range(count)
        ]

    def _merge_statistics(self, other: "PerChannelAbsmaxQuantizer") -> None:
        self.abs_max_vals = merge_channel_arrays(self.abs_max_vals, other.abs_max_vals, np.maximum)

    def _reset_statistics(self) -> None:
        self.abs_max_vals = []
