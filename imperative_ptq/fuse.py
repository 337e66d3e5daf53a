"""Folding BatchNorm into the preceding Conv2D or Linear before calibration.

With ``sigma = sqrt(var + eps)`` and per-output-channel ``gamma, beta, mean``, a conv followed by
batch norm equals one conv with ``w' = w * gamma / sigma`` (on the output-channel axis) and
``b' = (b - mean) * gamma / sigma + beta``. Calibrating the folded layer quantizes the weights
that inference engines actually run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle

__all__ = ["batch_norm_factor_and_bias", "fuse_layers", "norm_activation", "norm_channels"]

_FOLDABLE = {
    # (layer type, norm type): weight output-channel axis
    (paddle.nn.Conv2D, paddle.nn.BatchNorm2D): 0,
    (paddle.nn.Conv2D, paddle.nn.BatchNorm): 0,
    (paddle.nn.Linear, paddle.nn.BatchNorm1D): 1,
}


#: The layers computing what ``paddle.nn.BatchNorm(..., act=name)`` applies after normalizing
#: (Paddle's legacy activation op ``name`` with its default attributes), by ``name``.
_NORM_ACTIVATIONS: dict[str, type[paddle.nn.Layer]] = {
    "relu": paddle.nn.ReLU, "relu6": paddle.nn.ReLU6, "sigmoid": paddle.nn.Sigmoid, "tanh": paddle.nn.Tanh,
    "hard_swish": paddle.nn.Hardswish, "swish": paddle.nn.Swish, "silu": paddle.nn.Silu, "elu": paddle.nn.ELU,
    "gelu": paddle.nn.GELU, "mish": paddle.nn.Mish, "selu": paddle.nn.SELU, "softsign": paddle.nn.Softsign,
    "tanh_shrink": paddle.nn.Tanhshrink, "logsigmoid": paddle.nn.LogSigmoid,
}


def norm_channels(norm: paddle.nn.Layer) -> int:
    """The number of channels a BatchNorm normalizes."""
    return int(norm._mean.shape[0])


def norm_activation(norm: paddle.nn.Layer) -> str | None:
    """The activation a legacy ``paddle.nn.BatchNorm(..., act=...)`` applies after normalizing
    (the name of Paddle's legacy op), ``None`` for a norm without one."""
    act = getattr(norm, "_act", None) if isinstance(norm, paddle.nn.BatchNorm) else None
    return act or None


def _folded_norm_replacement(norm: paddle.nn.Layer, name: str) -> paddle.nn.Layer:
    """What takes a folded norm's place: ``Identity``, or the layer of the activation a legacy
    ``BatchNorm(act=...)`` applies (folding moves only the normalization into the weights).

    Raises:
        ValueError: The norm applies an activation no layer computes the same way.
    """
    act = norm_activation(norm)
    if act is None:
        return paddle.nn.Identity()
    if act not in _NORM_ACTIVATIONS:
        raise ValueError(
            f"cannot fold BatchNorm {name!r}: it applies act={act!r} after normalizing, which no "
            f"paddle.nn layer computes the same way (foldable: {sorted(_NORM_ACTIVATIONS)}); write it "
            f"as a BatchNorm without act followed by the activation"
        )
    return _NORM_ACTIVATIONS[act]()


def _find(model: paddle.nn.Layer, name: str) -> tuple[paddle.nn.Layer, str, paddle.nn.Layer]:
    parent = model
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part, None)
        if not isinstance(parent, paddle.nn.Layer):
            raise ValueError(f"fuse_list names {name!r}, which is not a sublayer of the model")
    layer = getattr(parent, leaf, None)
    if not isinstance(layer, paddle.nn.Layer):
        raise ValueError(f"fuse_list names {name!r}, which is not a sublayer of the model")
    return parent, leaf, layer


def fuse_layers(model: paddle.nn.Layer, fuse_list: Sequence[Sequence[str]]) -> paddle.nn.Layer:
    """Folds each ``[conv_name, bn_name]`` pair of ``fuse_list`` in place; the BN becomes Identity
    (a legacy ``BatchNorm(act=...)`` becomes the layer of its activation).

    Args:
        model: Model in eval mode (its batch-norm statistics are used).
        fuse_list: Pairs of sublayer names, e.g. ``[["conv1", "bn1"]]``.

    Returns:
        ``model``.

    Raises:
        TypeError: ``fuse_list`` is not a list of name pairs.
        ValueError: A name is not a sublayer, or the pair cannot be folded (a legacy
            ``BatchNorm`` whose ``act`` no layer computes included).
    """
    if fuse_list is None or isinstance(fuse_list, str) or not isinstance(fuse_list, (list, tuple)):
        raise TypeError("fuse_list must be a list of [layer_name, norm_name] pairs when fuse=True")
    # Check every pair before folding any, so a bad entry never leaves the model half-fused.
    folds = []
    seen: set[str] = set()
    for pair in fuse_list:
        if isinstance(pair, str) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"fuse_list entries must be [layer_name, norm_name] pairs, got {pair!r}")
        for name in pair:
            if name in seen:  # folding a norm twice would scale the weights twice
                raise ValueError(f"fuse_list names {name!r} more than once")
            seen.add(name)
        _, _, layer = _find(model, pair[0])
        norm_parent, norm_leaf, norm = _find(model, pair[1])
        axis = next(
            (a for (lt, nt), a in _FOLDABLE.items() if isinstance(layer, lt) and isinstance(norm, nt)),
            None,
        )
        if axis is None:
            raise ValueError(
                f"cannot fold {type(norm).__name__} {pair[1]!r} into "
                f"{type(layer).__name__} {pair[0]!r}"
            )
        outputs = int(layer.weight.shape[axis])
        if norm_channels(norm) != outputs:
            # (A BatchNorm1D after a Linear on a [N, C, L] input normalizes C, not the features.)
            raise ValueError(
                f"cannot fold {type(norm).__name__} {pair[1]!r} ({norm_channels(norm)} channels) into "
                f"{type(layer).__name__} {pair[0]!r} ({outputs} output channels): the norm normalizes "
                f"another axis than the layer's outputs"
            )
        folds.append((layer, norm, axis, norm_parent, norm_leaf, _folded_norm_replacement(norm, pair[1])))
    for layer, norm, axis, norm_parent, norm_leaf, replacement in folds:
        _fold(layer, norm, axis)
        setattr(norm_parent, norm_leaf, replacement)
    return model


def batch_norm_factor_and_bias(
    bias: np.ndarray, mean: np.ndarray, variance: np.ndarray, gamma: np.ndarray,
    beta: np.ndarray, epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Folding a BatchNorm into the layer before it: the per-channel factor its weight is
    multiplied by, and its new bias (``(bias - mean) * factor + beta``)."""
    factor = gamma / np.sqrt(variance + epsilon)
    return factor, (bias - mean) * factor + beta


def _fold(layer: paddle.nn.Layer, norm: paddle.nn.Layer, axis: int) -> None:
    with paddle.no_grad():
        mean = norm._mean.numpy()
        gamma = norm.weight.numpy() if norm.weight is not None else np.ones_like(mean)
        beta = norm.bias.numpy() if norm.bias is not None else np.zeros_like(mean)
        bias = layer.bias.numpy() if layer.bias is not None else np.zeros_like(mean)
        factor, new_bias = batch_norm_factor_and_bias(
            bias, mean, norm._variance.numpy(), gamma, beta, norm._epsilon
        )
        shape = [1] * layer.weight.ndim
        shape[axis] = -1
        layer.weight.set_value(
            (layer.weight.numpy() * factor.reshape(shape)).astype(layer.weight.numpy().dtype)
        )
        new_bias = paddle.to_tensor(new_bias.astype(mean.dtype))
        if layer.bias is None:
            layer.bias = layer.create_parameter(
                shape=new_bias.shape, dtype=new_bias.dtype, is_bias=True
            )
        layer.bias.set_value(new_bias)
