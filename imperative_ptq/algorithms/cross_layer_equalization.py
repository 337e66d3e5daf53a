"""Cross-layer equalization (data-free, before calibration) with bias absorption.

For two weighted layers in a row, ``y = W2 f(W1 x + b1) + b2`` with ``f`` positively homogeneous
(ReLU, or nothing), scaling output channel ``i`` of the first layer by ``1 / s_i`` and input
channel ``i`` of the second by ``s_i`` leaves ``y`` unchanged. With ``r1_i`` the range
(``max |w|``) of output channel ``i`` of ``W1`` and ``r2_i`` that of input channel ``i`` of
``W2``, ``s_i = sqrt(r1_i / r2_i)`` makes both ``sqrt(r1_i * r2_i)`` (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019): channels whose weights
were far narrower than the widest of their tensor get a larger share of the per-tensor (or
per-channel) grid. Depthwise -> pointwise pairs gain most: a depthwise conv's channels often
differ by orders of magnitude after BatchNorm folding.

Chains of more than two layers (conv -> depthwise -> pointwise) are equalized pair by pair,
repeatedly, until the scales settle.

**Bias absorption**: equalization can leave large biases in ``b1``. Where a BatchNorm was
folded into the first layer, its pre-activation in channel ``i`` is about ``N(beta_i,
gamma_i)``; ``c_i = max(0, beta_i - 3 |gamma_i|)`` is almost always below it, so ``ReLU(z - c)
+ c = ReLU(z)`` almost everywhere, and ``c`` moves into the next layer's bias:
``b1 -= c``, ``b2 += W2 c``. Done only where ``W2 c`` is exact: a Linear, or a 1x1 conv
without padding.

Works on ``Conv2D`` (any groups, depthwise included) and ``Linear`` pairs, with a BatchNorm
(folded here) and a ReLU (or Identity) between them. A legacy ``paddle.nn.BatchNorm(act=...)``
is a BatchNorm and its activation: with ``act="relu"`` (or ``"relu6"``, see below) it links two
layers, and folding leaves that activation in its place; any other ``act`` ends a chain.

**ReLU6** does not commute with scaling: ``ReLU6(z / s) != ReLU6(z) / s``. Three choices
(``relu6=``): ``"skip"`` the pair (with a warning); ``"clip"`` replaces the ReLU6 by a
:class:`ChannelClip` whose upper bound follows each channel's scale, ``clip(z / s, 0, 6 / s) =
ReLU6(z) / s``, so the fp32 function is unchanged (the exported graph then has ``relu`` +
``elementwise_min`` where ``relu6`` was); ``"relu"`` replaces it by a ReLU, as AIMET does,
which changes the function wherever an activation exceeds 6. Bias absorption through a
:class:`ChannelClip` lowers its bound by the absorbed ``c`` as well: ``clip(z - c, 0, u - c)
+ c = clip(z, 0, u)`` for ``z >= c``, with ``c <= u``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Sequence

import numpy as np
import paddle

from ..fuse import fuse_layers, norm_activation, norm_channels

__all__ = ["ChannelClip", "EqualizedPair", "RELU6_MODES", "equalize", "find_chains", "input_channel_index"]

logger = logging.getLogger(__name__)

#: What :func:`equalize` does with a ReLU6 between two layers (see the module docstring).
RELU6_MODES = ("skip", "clip", "relu")


class ChannelClip(paddle.nn.Layer):
    """``min(max(x, 0), upper[c])`` per channel: a ReLU6 whose bound 6 became ``6 / s_c``.

    Traces as ``relu`` + ``elementwise_min`` with a constant, which every exporter runs.

    Args:
        upper: One non-negative bound per channel.
        spatial_dims: Axes after the channel axis (2 after a Conv2D's NCHW output, 0 after a
            Linear): the bound is stored as ``[C, 1, ...]`` to broadcast over them.
    """

    def __init__(self, upper: np.ndarray, spatial_dims: int = 2) -> None:
        super().__init__()
        upper = np.asarray(upper, np.float32).reshape([-1] + [1] * int(spatial_dims))
        self.register_buffer("upper", paddle.to_tensor(upper))

    @property
    def bounds(self) -> np.ndarray:
        """The bound of each channel."""
        return self.upper.numpy().reshape(-1)

    def set_bounds(self, bounds: np.ndarray) -> None:
        """Sets the bound of each channel."""
        self.upper.set_value(np.asarray(bounds, np.float32).reshape(self.upper.shape))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.minimum(paddle.nn.functional.relu(x), self.upper)

    def extra_repr(self) -> str:
        return f"channels={self.upper.shape[0]}"


_WEIGHTED = (paddle.nn.Conv2D, paddle.nn.Linear)
_NORMS = (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm, paddle.nn.BatchNorm1D)
_ACTIVATIONS = (paddle.nn.ReLU, paddle.nn.ReLU6, ChannelClip)
#: The ``act`` of a legacy ``paddle.nn.BatchNorm`` that a chain may pass through (as a ReLU or
#: a ReLU6 after the norm).
_LINKING_NORM_ACTIVATIONS = ("relu", "relu6")
#: Number of standard deviations below the mean kept under a channel's absorbed bias.
_ABSORB_SIGMAS = 3.0


@dataclasses.dataclass
class EqualizedPair:
    """One pair of layers :func:`equalize` equalized.

    Attributes:
        first: Name of the first layer (its output channels were divided by ``scales``).
        second: Name of the second layer (its input channels were multiplied by ``scales``).
        scales: The product of every round's ``s`` per channel.
        absorbed: The bias moved from ``first`` into ``second`` per channel (zeros if none).
    """

    first: str
    second: str
    scales: np.ndarray
    absorbed: np.ndarray


@dataclasses.dataclass
class _Link:
    """A pair inside a chain: two weighted layers and what lies between them."""

    first: str
    second: str
    norm: str | None
    activation: str | None


def find_chains(model: paddle.nn.Layer) -> list[list[str]]:
    """The chains of ``model`` that :func:`equalize` can work on, found in ``nn.Sequential``
    containers (nested ones flattened, since they run strictly in order).

    A chain is a list of sublayer names: weighted layers (Conv2D, Linear), each optionally
    followed by a BatchNorm and a ReLU/ReLU6/Identity. Other models: pass chains yourself.
    """
    chains: list[list[str]] = []
    covered: set[int] = set()
    for name, layer in model.named_sublayers(include_self=True):
        if not isinstance(layer, paddle.nn.Sequential) or id(layer) in covered:
            continue
        flat: list[tuple[str, paddle.nn.Layer]] = []
        _flatten(layer, name, flat, covered)
        chains.extend(_split_chains(flat))
    return chains


def _flatten(
    sequential: paddle.nn.Sequential, prefix: str, out: list, covered: set[int]
) -> None:
    covered.add(id(sequential))
    for child_name, child in sequential.named_children():
        full = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, paddle.nn.Sequential):
            _flatten(child, full, out, covered)
        else:
            out.append((full, child))


def _split_chains(flat: Sequence[tuple[str, paddle.nn.Layer]]) -> list[list[str]]:
    """Maximal runs of ``weighted [norm] [activation]`` groups of one weighted type in an
    ordered layer list, with at least two weighted layers."""
    chains: list[list[str]] = []
    current: list[tuple[str, paddle.nn.Layer]] = []

    def close() -> None:
        if sum(isinstance(layer, _WEIGHTED) for _, layer in current) >= 2:
            chains.append([name for name, _ in current])
        current.clear()

    for name, layer in flat:
        if isinstance(layer, paddle.nn.Identity):
            continue  # e.g. a BatchNorm already folded by fuse_layers
        last = current[-1][1] if current else None
        weighted = [lay for _, lay in current if isinstance(lay, _WEIGHTED)]
        if isinstance(layer, _WEIGHTED):
            if weighted and not _fits(weighted[-1], layer):
                close()
            current.append((name, layer))
        elif isinstance(layer, _NORMS) and isinstance(last, _WEIGHTED):
            linking = norm_activation(layer) in (None, *_LINKING_NORM_ACTIVATIONS)
            if linking and norm_channels(layer) == _out_channels(last):
                current.append((name, layer))
            else:
                close()  # an activation equalization cannot scale through
        elif (
            isinstance(layer, _ACTIVATIONS) and isinstance(last, (*_WEIGHTED, *_NORMS))
            and norm_activation(last) is None
        ):
            current.append((name, layer))
        else:
            close()
    close()
    return chains


def equalize(
    model: paddle.nn.Layer,
    chains: Sequence[Sequence[str]] | None = None,
    *,
    inplace: bool = False,
    absorb_bias: bool = True,
    relu6: str = "skip",
    max_rounds: int = 50,
    tolerance: float = 1e-6,
) -> tuple[paddle.nn.Layer, list[EqualizedPair]]:
    """Cross-layer equalization of ``model`` (BatchNorms in the chains are folded first).

    Args:
        model: The fp32 model, in eval mode (its BatchNorm statistics are folded).
        chains: Lists of sublayer names in execution order, e.g.
            ``[["conv1", "bn1", "relu1", "dw", "bn2", "relu2", "pw"]]``; ``None``: every chain
            :func:`find_chains` finds in ``nn.Sequential`` containers.
        inplace: Change ``model`` itself; otherwise a deep copy (``model`` is untouched).
        absorb_bias: Move the part of each ReLU's input that is almost always positive into
            the next layer's bias (see the module docstring).
        relu6: A ReLU6 between two layers: ``"skip"`` the pair with a warning, ``"clip"``
            replace it by a :class:`ChannelClip` following the scales (the function is
            unchanged), or ``"relu"`` replace it by a ReLU (changes the function wherever an
            activation exceeds 6).
        max_rounds: Passes over a chain of three or more layers.
        tolerance: Stop once no scale of a pass differs from 1 by more than this.

    Returns:
        ``(model, pairs)``: the equalized model (a copy unless ``inplace``) and the pairs
        equalized.

    Raises:
        TypeError: ``model`` is not a Layer or ``chains`` is not a list of name lists.
        ValueError: ``relu6`` is not one of :data:`RELU6_MODES`, a chain names no sublayer,
            holds a layer that is neither weighted, BatchNorm nor ReLU/ReLU6/Identity (or a
            BatchNorm whose ``act`` is neither), or pairs layers whose channels differ.
    """
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not isinstance(relu6, str) or relu6 not in RELU6_MODES:
        raise ValueError(f"relu6 must be one of {RELU6_MODES}, got {relu6!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if chains is None:
        chains = find_chains(model)
    elif isinstance(chains, str) or not isinstance(chains, (list, tuple)) or any(
        isinstance(chain, str) or not isinstance(chain, (list, tuple)) for chain in chains
    ):
        raise TypeError("chains must be a list of lists of sublayer names")
    layers = dict(model.named_sublayers())
    parsed = [_parse_chain(chain, layers) for chain in chains]
    for links in parsed:  # check every pair before changing anything
        for link in links:
            _check_pair(link, layers)
    # Every BatchNorm of a chain is folded, the one after its last layer too, so an
    # equalized model has no BatchNorm left where its chains run.
    norms = {norm: first for chain in chains for first, norm in _chain_norms(chain, layers)}
    folded_norms = _norm_statistics(layers, norms)
    fuse_layers(model, [[first, norm] for norm, first in norms.items()])
    # (A folded BatchNorm(act=...) left its activation layer in its place.)
    layers.update((name, layer) for name, layer in model.named_sublayers() if name in norms)
    pairs: list[EqualizedPair] = []
    for links in parsed:
        links = [link for link in links if _usable(link, model, layers, relu6)]
        pairs.extend(_equalize_links(links, layers, max_rounds, tolerance))
    if absorb_bias:
        by_first = {pair.first: pair for pair in pairs}
        for links in parsed:
            for link in links:
                pair = by_first.get(link.first)
                if pair is not None and link.first in folded_norms:
                    pair.absorbed = _absorb(link, layers, folded_norms[link.first], pair.scales)
    logger.info("cross-layer equalization: %d pairs in %d chains", len(pairs), len(parsed))
    return model, pairs


def _parse_chain(chain: Sequence[str], layers: dict[str, paddle.nn.Layer]) -> list[_Link]:
    """The pairs of one chain: weighted layers, each with the norm and activation after it."""
    links: list[_Link] = []
    previous: str | None = None
    norm: str | None = None
    activation: str | None = None
    for name in chain:
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"chain names {name!r}, which is not a sublayer of the model")
        if isinstance(layer, _WEIGHTED):
            if previous is not None:
                links.append(_Link(previous, name, norm, activation))
            previous, norm, activation = name, None, None
        elif isinstance(layer, _NORMS):
            if previous is None or norm is not None or activation is not None:
                raise ValueError(
                    f"chain {list(chain)}: BatchNorm {name!r} must follow a Conv2D or Linear "
                    f"directly"
                )
            norm = name
            act = norm_activation(layer)
            if act is not None and act not in _LINKING_NORM_ACTIVATIONS:
                raise ValueError(
                    f"chain {list(chain)}: BatchNorm {name!r} applies act={act!r}, which does not "
                    f"commute with scaling: a chain may link layers through act='relu' or 'relu6' only"
                )
            if act is not None:
                activation = name  # after folding, the norm's place holds its activation
        elif isinstance(layer, paddle.nn.Identity):
            continue  # e.g. a BatchNorm already folded by fuse_layers
        elif isinstance(layer, _ACTIVATIONS):
            if previous is None or activation is not None:
                raise ValueError(
                    f"chain {list(chain)}: activation {name!r} must follow a weighted layer"
                )
            activation = name
        else:
            raise ValueError(
                f"chain {list(chain)}: {name!r} is a {type(layer).__name__}; a chain holds "
                f"Conv2D/Linear layers, BatchNorms, ReLU/ReLU6 and Identity only"
            )
    return links


def _chain_norms(chain: Sequence[str], layers: dict[str, paddle.nn.Layer]) -> list[tuple[str, str]]:
    """``(weighted layer, BatchNorm after it)`` pairs of a (parsed, valid) chain."""
    found, previous = [], None
    for name in chain:
        layer = layers[name]
        if isinstance(layer, _WEIGHTED):
            previous = name
        elif isinstance(layer, _NORMS):
            found.append((previous, name))
    return found


def _fits(first: paddle.nn.Layer, second: paddle.nn.Layer) -> bool:
    """Whether ``second`` is of ``first``'s type and reads its output channels."""
    if type(first) is not type(second):
        return False
    channels = _out_channels(first)
    if isinstance(second, paddle.nn.Linear):
        return second.weight.shape[0] == channels
    per_group = second.weight.shape[1]
    return channels % per_group == 0 and second.weight.shape[0] % (channels // per_group) == 0


def _check_pair(link: _Link, layers: dict[str, paddle.nn.Layer]) -> None:
    first, second = layers[link.first], layers[link.second]
    if type(first) is not type(second):
        raise ValueError(
            f"cannot equalize {type(first).__name__} {link.first!r} with "
            f"{type(second).__name__} {link.second!r}: both must be Conv2D or both Linear"
        )
    if not _fits(first, second):
        channels = _out_channels(first)
        raise ValueError(
            f"cannot equalize {link.first!r} with {link.second!r}: {link.first!r} has "
            f"{channels} output channels, {link.second!r} weight {list(second.weight.shape)} "
            f"does not read them"
        )


def _out_channels(layer: paddle.nn.Layer) -> int:
    return int(layer.weight.shape[1] if isinstance(layer, paddle.nn.Linear) else layer.weight.shape[0])


def _usable(
    link: _Link, model: paddle.nn.Layer, layers: dict[str, paddle.nn.Layer], relu6: str
) -> bool:
    """Whether the pair can be equalized: its activation commutes with scaling, or is a
    ReLU6 that ``relu6`` replaces (by a :class:`ChannelClip` or a ReLU)."""
    if link.activation is None or not isinstance(layers[link.activation], paddle.nn.ReLU6):
        return True
    if relu6 == "skip":
        logger.warning(
            "cross-layer equalization skips %s -> %s: the ReLU6 %r between them does not "
            "commute with scaling (equalize(..., relu6='clip') equalizes it and keeps the "
            "function; relu6='relu' replaces it by a ReLU)",
            link.first, link.second, link.activation,
        )
        return False
    if relu6 == "clip":
        first = layers[link.first]
        replacement: paddle.nn.Layer = ChannelClip(
            np.full([_out_channels(first)], 6.0, np.float32),
            # (Channels last: a Linear's, a channels-last conv's output.)
            spatial_dims=0 if isinstance(first, paddle.nn.Linear) or first._data_format == "NHWC" else 2,
        )
    else:
        replacement = paddle.nn.ReLU()
        logger.warning(
            "cross-layer equalization replaced the ReLU6 %r by a ReLU (activations above 6 "
            "are no longer clipped: the fp32 function changes)", link.activation,
        )
    *path, leaf = link.activation.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, replacement)
    layers[link.activation] = replacement
    return True


def _norm_statistics(
    layers: dict[str, paddle.nn.Layer], norms: dict[str, str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{weighted layer: (beta, |gamma|)}`` of each BatchNorm about to be folded into it: the
    mean and standard deviation of its output channels."""
    statistics = {}
    for norm_name, first in norms.items():
        norm = layers[norm_name]
        channels = norm._mean.shape[0]
        gamma = norm.weight.numpy() if norm.weight is not None else np.ones(channels, np.float32)
        beta = norm.bias.numpy() if norm.bias is not None else np.zeros(channels, np.float32)
        statistics[first] = (beta.astype(np.float64), np.abs(gamma).astype(np.float64))
    return statistics


def _output_axis(layer: paddle.nn.Layer) -> int:
    return 1 if isinstance(layer, paddle.nn.Linear) else 0


def output_channel_ranges(layer: paddle.nn.Layer) -> np.ndarray:
    """``max |w|`` of each output channel of a Conv2D or Linear."""
    weight = np.abs(layer.weight.numpy().astype(np.float64))
    axis = _output_axis(layer)
    return weight.max(axis=tuple(a for a in range(weight.ndim) if a != axis))


def input_channel_index(layer: paddle.nn.Layer, channels: int) -> np.ndarray:
    """For a Conv2D weight ``[out, in/groups, ...]``: the input channel each ``[out, in/groups]``
    entry reads (grouped and depthwise convs included)."""
    out, per_group = layer.weight.shape[0], layer.weight.shape[1]
    groups = channels // per_group
    group_of_output = np.arange(out) // (out // groups)
    return group_of_output[:, None] * per_group + np.arange(per_group)[None, :]


def input_channel_ranges(layer: paddle.nn.Layer, channels: int) -> np.ndarray:
    """``max |w|`` over the weights that read each of the ``channels`` input channels."""
    weight = np.abs(layer.weight.numpy().astype(np.float64))
    if isinstance(layer, paddle.nn.Linear):
        return weight.max(axis=1)
    per_entry = weight.reshape(weight.shape[0], weight.shape[1], -1).max(axis=2)
    ranges = np.zeros(channels)
    np.maximum.at(ranges, input_channel_index(layer, channels), per_entry)
    return ranges


def _scale_output_channels(layer: paddle.nn.Layer, factors: np.ndarray) -> None:
    """Multiplies output channel ``i`` of the weight and bias by ``factors[i]``."""
    weight = layer.weight.numpy()
    shape = [1] * weight.ndim
    shape[_output_axis(layer)] = -1
    layer.weight.set_value((weight * factors.reshape(shape)).astype(weight.dtype))
    if layer.bias is not None:
        bias = layer.bias.numpy()
        layer.bias.set_value((bias * factors).astype(bias.dtype))


def _scale_input_channels(layer: paddle.nn.Layer, factors: np.ndarray) -> None:
    """Multiplies every weight that reads input channel ``i`` by ``factors[i]``."""
    weight = layer.weight.numpy()
    if isinstance(layer, paddle.nn.Linear):
        scaled = weight * factors[:, None]
    else:
        index = input_channel_index(layer, factors.size)
        scaled = weight * factors[index].reshape(*index.shape, *([1] * (weight.ndim - 2)))
    layer.weight.set_value(scaled.astype(weight.dtype))


def _equalize_links(
    links: list[_Link], layers: dict[str, paddle.nn.Layer], max_rounds: int, tolerance: float
) -> list[EqualizedPair]:
    pairs = [
        EqualizedPair(
            link.first, link.second, np.ones(_out_channels(layers[link.first])),
            np.zeros(_out_channels(layers[link.first])),
        )
        for link in links
    ]
    if not pairs:
        return pairs
    with paddle.no_grad():
        for _ in range(max(1, max_rounds)):
            largest_change = 0.0
            for link, pair in zip(links, pairs):
                first, second = layers[pair.first], layers[pair.second]
                r1 = output_channel_ranges(first)
                r2 = input_channel_ranges(second, r1.size)
                usable = (r1 > 0) & (r2 > 0)
                scales = np.where(usable, np.sqrt(r1 / np.where(usable, r2, 1.0)), 1.0)
                _scale_output_channels(first, 1.0 / scales)
                _scale_input_channels(second, scales)
                clip = layers[link.activation] if link.activation else None
                if isinstance(clip, ChannelClip):  # clip(z / s, 0, u / s) = clip(z, 0, u) / s
                    clip.set_bounds(clip.bounds / scales)
                pair.scales = pair.scales * scales
                largest_change = max(largest_change, float(np.max(np.abs(scales - 1.0))))
            if len(pairs) == 1 or largest_change <= tolerance:
                break
    return pairs


def _absorb(
    link: _Link,
    layers: dict[str, paddle.nn.Layer],
    statistics: tuple[np.ndarray, np.ndarray],
    scales: np.ndarray,
) -> np.ndarray:
    """Moves ``c = max(0, beta - 3 |gamma|)`` (after equalization) from the first layer's bias
    into the second's; returns ``c`` (zeros where nothing was absorbed)."""
    first, second = layers[link.first], layers[link.second]
    none = np.zeros(scales.size)
    activation = layers[link.activation] if link.activation else None
    if not isinstance(activation, (paddle.nn.ReLU, ChannelClip)):
        return none
    if isinstance(second, paddle.nn.Conv2D) and (
        list(second.weight.shape[2:]) != [1, 1]
        or any(int(p) != 0 for p in np.atleast_1d(second._updated_padding))
    ):
        return none  # W2 c is exact only where every output reads no padding
    beta, spread = statistics
    absorbed = np.maximum(0.0, (beta - _ABSORB_SIGMAS * spread) / scales)
    if isinstance(activation, ChannelClip):
        # clip(z - c, 0, u - c) + c = clip(z, 0, u) for z >= c, if c <= u.
        upper = activation.bounds.astype(np.float64)
        absorbed = np.minimum(absorbed, upper)
    if not np.any(absorbed > 0):
        return none
    with paddle.no_grad():
        if isinstance(activation, ChannelClip):
            activation.set_bounds(upper - absorbed)
        bias = first.bias.numpy()
        first.bias.set_value((bias - absorbed).astype(bias.dtype))
        weight = second.weight.numpy().astype(np.float64)
        if isinstance(second, paddle.nn.Linear):
            shift = absorbed @ weight
        else:
            index = input_channel_index(second, absorbed.size)
            shift = (weight.reshape(*index.shape) * absorbed[index]).sum(axis=1)
        if second.bias is None:
            second.bias = second.create_parameter(
                shape=[shift.size], dtype=second.weight.dtype, is_bias=True
            )
            second.bias.set_value(np.zeros(shift.size, dtype=np.float32))
        bias2 = second.bias.numpy()
        second.bias.set_value((bias2 + shift).astype(bias2.dtype))
    return absorbed
