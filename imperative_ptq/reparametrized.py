"""Folding weight reparametrizations into plain weights before calibration.

``paddle.nn.utils.weight_norm`` and ``spectral_norm`` replace a layer's ``weight`` parameter by
a tensor that a forward-pre-hook recomputes on every call (``g * v / ||v||``, or the weight over
its largest singular value). Quantizing that tensor quantizes nothing: the next call overwrites
it with the float weight, so the simulation would run float weights on quantized inputs, and the
export traces the recomputation as float ops whose conv or fc Paddle runs fp32. In eval mode the
recomputed weight is a constant, so it becomes the layer's parameter again, as
``paddle.nn.utils.remove_weight_norm`` does, and is calibrated, simulated and exported like any
other weight.
"""

from __future__ import annotations

import logging

import paddle
from paddle.nn.utils.spectral_norm_hook import SpectralNorm
from paddle.nn.utils.weight_norm_hook import WeightNorm

__all__ = ["computed_weight_layers", "fold_weight_reparametrizations"]

logger = logging.getLogger(__name__)

#: Hook type -> the parameters and buffers it keeps beside the weight (suffixes of its name).
_REPARAMETRIZATIONS: dict[type, tuple[str, ...]] = {
    WeightNorm: ("_g", "_v"),
    SpectralNorm: ("_orig", "_u", "_v"),
}


def _folded_weight(layer: paddle.nn.Layer, hook: WeightNorm | SpectralNorm) -> paddle.Tensor:
    """The weight ``hook`` gives ``layer`` in eval mode (no power iteration)."""
    with paddle.no_grad():
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(layer, do_power_iteration=False)
        return hook.compute_weight(layer)


def fold_weight_reparametrizations(model: paddle.nn.Layer) -> list[str]:
    """Replaces every weight-norm and spectral-norm hook of ``model`` by the weight it computes
    in eval mode, held as the layer's parameter again (in place).

    Returns:
        The names of the sublayers folded (``""`` for ``model`` itself).
    """
    folded = []
    for name, layer in model.named_sublayers(include_self=True):
        for key, hook in list(layer._forward_pre_hooks.items()):
            suffixes = _REPARAMETRIZATIONS.get(type(hook))
            if suffixes is None:
                continue
            weight = _folded_weight(layer, hook)
            del layer._forward_pre_hooks[key]
            for suffix in suffixes:
                for store in (layer._parameters, layer._buffers):
                    store.pop(hook.name + suffix, None)
            layer._buffers.pop(hook.name, None)
            vars(layer).pop(hook.name, None)
            parameter = layer.create_parameter(weight.shape, dtype=weight.dtype)
            with paddle.no_grad():
                parameter.set_value(weight)
            layer.add_parameter(hook.name, parameter)
            folded.append(name)
    if folded:
        logger.info(
            "folded the weight/spectral norm of %s into plain weights (the eval-mode weight they "
            "compute), which are calibrated and quantized", ", ".join(folded),
        )
    return folded


def computed_weight_layers(model: paddle.nn.Layer) -> list[str]:
    """Names of the sublayers with a ``weight`` that is not a parameter (a tensor some other
    forward-pre-hook recomputes), which cannot be quantized."""
    return [
        name for name, layer in model.named_sublayers()
        if isinstance(getattr(layer, "weight", None), paddle.Tensor) and "weight" not in layer._parameters
    ]
