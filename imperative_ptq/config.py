"""PTQ configuration: which algorithm calibrates activations and which calibrates weights."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .algorithms import AdaRound
from .algorithms.smooth_quant import SmoothQuant
from . import quantizers
from .quantizers import BaseQuantizer, KLQuantizer, PerChannelAbsmaxQuantizer
from .targets import DEFAULT_TARGET, resolve_target

__all__ = ["PTQConfig", "default_ptq_config", "from_paddle_config"]

logger = logging.getLogger(__name__)


class PTQConfig:
    """How to quantize activations and weights (Paddle's ``PTQConfig``).

    The quantizers given here are prototypes: every hooked layer gets fresh clones, so one
    config can be shared by many models and layers.

    Args:
        activation_quantizer: Algorithm for layer inputs and outputs, e.g. ``KLQuantizer()``.
        weight_quantizer: Algorithm for weights (one with ``for_weights``), e.g.
            ``PerChannelAbsmaxQuantizer()`` or ``AbsmaxQuantizer()``.
        target: The deployment whose int8 arithmetic ``convert`` simulates and the export
            writes for (:data:`imperative_ptq.targets.TARGETS`): ``"x86"`` (default, right on
            every x86 CPU with AVX2), ``"x86-vnni"`` or ``"arm"``; ``"native"`` picks
            ``"x86-vnni"`` if this CPU has VNNI/AMX, else ``"x86"`` (for deployment on the
            kind of CPU the model is converted on).
        equalization: Cross-layer equalization with bias absorption before calibration, on
            the Conv2D/Linear chains of ``nn.Sequential`` containers
            (:func:`imperative_ptq.algorithms.equalize`; data-free). ``True`` skips pairs
            with a ReLU6 between them; ``"clip"`` equalizes those too, through a per-channel
            clip that keeps the fp32 function (``equalize(..., relu6="clip")``).
        bias_correction: In ``convert``, put each quantized layer's mean output back where
            the fp32 model has it on the calibration batches: ``True`` (or ``"empirical"``)
            measures it layer by layer (:func:`imperative_ptq.algorithms.correct_bias`),
            ``"analytical"`` computes ``(W - W_q) E[x]`` from one pass
            (:func:`~imperative_ptq.algorithms.correct_bias_analytically`).
        adaround: In ``convert``, learn each Conv2D/Linear weight's rounding on the
            calibration batches (:class:`imperative_ptq.algorithms.AdaRound` settings;
            ``None``: nearest rounding). Runs before bias correction.
        smooth_quant: Before the first batch ``calibrate`` observes, move activation
            outliers of Linear inputs into their weights, folded into the producing
            LayerNorm/Linear (:class:`imperative_ptq.algorithms.SmoothQuant` settings).

    Raises:
        TypeError: A quantizer is not a ``BaseQuantizer`` or does not fit its role,
            ``target`` is not a string, or a flag is not a bool.
        ValueError: ``target`` is not a known target.
    """

    def __init__(
        self,
        activation_quantizer: BaseQuantizer,
        weight_quantizer: BaseQuantizer,
        target: str = DEFAULT_TARGET,
        *,
        equalization: bool | str = False,
        bias_correction: bool | str = False,
        adaround: AdaRound | None = None,
        smooth_quant: SmoothQuant | None = None,
    ) -> None:
        _check_quantizer("activation_quantizer", activation_quantizer, "for_activations")
        _check_quantizer("weight_quantizer", weight_quantizer, "for_weights")
        self.activation_quantizer = activation_quantizer.clone()
        self.weight_quantizer = weight_quantizer.clone()
        self.target = resolve_target(target)
        if not isinstance(equalization, bool) and equalization != "clip":
            raise TypeError(
                f"equalization must be a bool or 'clip' (ReLU6 pairs equalized through a "
                f"per-channel clip), got {equalization!r}"
            )
        #: ``False``, ``True`` (ReLU6 pairs skipped) or ``"clip"``.
        self.equalization: bool | str = equalization
        if bias_correction not in (True, False, "empirical", "analytical") or isinstance(
            bias_correction, (int, float)
        ) and not isinstance(bias_correction, bool):
            raise TypeError(
                f"bias_correction must be a bool, 'empirical' or 'analytical', got "
                f"{bias_correction!r}"
            )
        #: ``False``, ``True`` (empirical) or ``"analytical"``.
        self.bias_correction: bool | str = (
            True if bias_correction == "empirical" else bias_correction
        )
        if adaround is not None and not isinstance(adaround, AdaRound):
            raise TypeError(
                f"adaround must be an imperative_ptq.algorithms.AdaRound or None, got "
                f"{type(adaround).__name__}"
            )
        self.adaround = adaround
        if smooth_quant is not None and not isinstance(smooth_quant, SmoothQuant):
            raise TypeError(
                f"smooth_quant must be an imperative_ptq.algorithms.SmoothQuant or None, got "
                f"{type(smooth_quant).__name__}"
            )
        # The search simulates the weight arithmetic of the config's target.
        self.smooth_quant = (
            None if smooth_quant is None else dataclasses.replace(smooth_quant, target=self.target)
        )

    @property
    def relu6_equalization(self) -> str:
        """What equalization does with a ReLU6 between two layers (``equalize``'s ``relu6``)."""
        return "clip" if self.equalization == "clip" else "skip"

    @property
    def needs_data(self) -> bool:
        """Whether ``convert`` runs an algorithm on the calibration batches."""
        return self.bias_correction or self.adaround is not None

    def new_activation_quantizer(self) -> BaseQuantizer:
        """A fresh activation quantizer for one role of one layer."""
        return self.activation_quantizer.clone()

    def new_weight_quantizer(self) -> BaseQuantizer:
        """A fresh weight quantizer for one layer."""
        return self.weight_quantizer.clone()

    def to_dict(self) -> dict[str, object]:
        """The algorithms, their arguments and the target, for calibration tables and logs."""
        algorithms: dict[str, object] = {}
        if self.equalization:
            algorithms["equalization"] = self.equalization
        if self.bias_correction:
            algorithms["bias_correction"] = self.bias_correction
        if self.adaround is not None:
            algorithms["adaround"] = dataclasses.asdict(self.adaround)
        if self.smooth_quant is not None:
            algorithms["smooth_quant"] = dataclasses.asdict(self.smooth_quant)
        return {
            "target": self.target,
            **algorithms,
            "activation_quantizer": {
                "type": type(self.activation_quantizer).__name__,
                **self.activation_quantizer.config(),
            },
            "weight_quantizer": {
                "type": type(self.weight_quantizer).__name__,
                **self.weight_quantizer.config(),
            },
        }

    def __repr__(self) -> str:
        return (
            f"PTQConfig({self.activation_quantizer!r}, {self.weight_quantizer!r}, "
            f"target={self.target!r}"
            f"{f', equalization={self.equalization!r}' if self.equalization else ''}"
            f"{f', bias_correction={self.bias_correction!r}' if self.bias_correction else ''}"
            f"{f', adaround={self.adaround!r}' if self.adaround is not None else ''}"
            f"{f', smooth_quant={self.smooth_quant!r}' if self.smooth_quant is not None else ''})"
        )


def _check_quantizer(name: str, quantizer: object, role_flag: str) -> None:
    if isinstance(quantizer, type) and issubclass(quantizer, BaseQuantizer):
        raise TypeError(f"{name} must be a quantizer instance, got the class {quantizer.__name__}")
    if not isinstance(quantizer, BaseQuantizer):
        raise TypeError(
            f"{name} must be an imperative_ptq quantizer (BaseQuantizer), "
            f"got {type(quantizer).__module__}.{type(quantizer).__name__}"
        )
    if not getattr(quantizer, role_flag):
        role = "activations" if role_flag == "for_activations" else "weights"
        raise TypeError(f"{name}: {type(quantizer).__name__} cannot quantize {role}")


default_ptq_config = PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer())


#: Paddle's ``paddle.quantization`` quantizers this package has under the same name, and the
#: constructor arguments both take.
_PADDLE_QUANTIZERS = {
    "AbsmaxQuantizer": ("quant_bits",),
    "PerChannelAbsmaxQuantizer": ("quant_bits",),
    "KLQuantizer": ("quant_bits", "bins", "upsample_bins"),
    "HistQuantizer": ("quant_bits", "bins", "upsample_bins", "hist_percent"),
}


def from_paddle_config(config: Any) -> PTQConfig | None:
    """The :class:`PTQConfig` of Paddle's own ``paddle.quantization.PTQConfig`` (the same
    quantizers with the same arguments), or ``None`` if ``config`` is not one.

    Raises:
        TypeError: It holds a quantizer this package has no counterpart of.
    """
    if type(config).__name__ != "PTQConfig" or not type(config).__module__.startswith("paddle.quantization"):
        return None
    translated = []
    for role, quantizer in (("activation", config.in_act_quantizer), ("weight", config.wt_quantizer)):
        name = type(quantizer).__name__
        if name not in _PADDLE_QUANTIZERS or not type(quantizer).__module__.startswith("paddle."):
            raise TypeError(
                f"Paddle's PTQConfig holds a {role} quantizer {type(quantizer).__module__}.{name}, "
                f"which imperative_ptq has no counterpart of; known: {', '.join(_PADDLE_QUANTIZERS)}"
            )
        arguments = {key: getattr(quantizer, key) for key in _PADDLE_QUANTIZERS[name]}
        translated.append(getattr(quantizers, name)(**arguments))
    result = PTQConfig(*translated)
    logger.info("Paddle's paddle.quantization.PTQConfig taken as %r", result)
    return result
