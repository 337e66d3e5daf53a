"""PIR-only Paddle APIs trace into legacy programs (``export/legacy_ops.py``): Paddle
Inference runs the exported fp32 program and computes what dygraph does."""

from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import pytest
from paddle.incubate.nn.functional import swiglu  # bound by name, as PaddleNLP's Llama does

from imperative_ptq.export import create_predictor, predict
from imperative_ptq.export.legacy_ops import legacy_op_type
from imperative_ptq.export.paddle_export import save_fp32_model

F = paddle.nn.functional

#: APIs that in Paddle 3.3.1 call ``paddle._C_ops`` functions accepting PIR values only,
#: with the argument shapes a model uses (attributes renamed between PIR and legacy ops,
#: constant shapes/axes, lists of tensors, several outputs).
APIS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
    "matmul_transpose_y": lambda x: paddle.matmul(x, x, transpose_y=True),
    "matmul_operator": lambda x: x @ x.transpose([0, 2, 1]),
    "softmax": lambda x: F.softmax(x, axis=-1),
    "softplus": F.softplus,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "logsumexp": lambda x: paddle.logsumexp(x, axis=-1),
    "cumsum": lambda x: paddle.cumsum(x, axis=1),
    "topk": lambda x: paddle.topk(x, 3)[0],
    "concat": lambda x: paddle.concat([x, F.sigmoid(x)], axis=-1),
    "split": lambda x: paddle.split(x, 2, axis=-1)[1],
    "bmm": lambda x: paddle.bmm(x, x.transpose([0, 2, 1])),
    "tril": lambda x: paddle.tril(x, diagonal=1),
    "triu": paddle.triu,
    # Its legacy-IR branch fails in Paddle itself (UnboundLocalError): traced as its dygraph one.
    "normalize": lambda x: F.normalize(x, axis=-1),
    "normalize_p1_axis1": lambda x: F.normalize(x, p=1, axis=1),
    # Its legacy-IR branch drops keepdim in Paddle itself (a squeezed result): traced as the
    # dygraph one.
    "kthvalue_keepdim": lambda x: paddle.kthvalue(x, 2, axis=1, keepdim=True)[0] * x,
    "kthvalue": lambda x: paddle.kthvalue(x, 3, axis=-1)[0],
    "method_kthvalue_keepdim": lambda x: x.kthvalue(2, axis=1, keepdim=True)[0] * x,
    # Tensor methods Paddle binds straight to PIR-only C ops (with positional Python args).
    "method_sum": lambda x: x.sum(-1),
    "method_sum_keepdim": lambda x: x.sum(axis=1, keepdim=True) * x,
    "method_exp_sigmoid": lambda x: x.exp().sigmoid(),
    "method_argmax": lambda x: x.argmax(-1).astype("float32"),
    "method_maximum": lambda x: x.maximum(x * 0.5),
    "method_logsumexp": lambda x: x.logsumexp(axis=-1),
    "method_any": lambda x: (x > 1).any(axis=-1).astype("float32"),
    "method_diagonal": lambda x: x[:, :, :4].diagonal(axis1=1, axis2=2),
    # The PyTorch-style Tensor.softmax(dim) (YOLOv8's distribution focal loss head) has no
    # legacy branch (None in a legacy trace); Tensor.gt raises NotImplementedError there.
    "method_softmax": lambda x: x.softmax(1),
    "method_softmax_default_dim": lambda x: x.softmax(),
    "method_gt": lambda x: x.gt(x * 0.5).astype("float32") * x,
    "method_greater": lambda x: x.greater(x.mean()).astype("float32"),
    # Computed in dygraph and PIR only (None in a legacy trace), imported by name or not.
    "swiglu": lambda x: swiglu(x, x * 0.5),
    "swiglu_halves": lambda x: F.swiglu(x),
    # Its legacy branch reads Tensor.is_cuda, which the legacy Variable lacks.
    "lerp": lambda x: paddle.lerp(x, x * 2, 0.3),
    # It calls query.shape.numel(), which the legacy Variable's tuple shape lacks.
    "scaled_dot_product_attention": lambda x: F.scaled_dot_product_attention(
        *[x.reshape([0, 0, 2, 4])] * 3).reshape([0, 0, 8]),
    "scaled_dot_product_attention_causal": lambda x: F.scaled_dot_product_attention(
        *[x.reshape([0, 0, 2, 4])] * 3, is_causal=True).reshape([0, 0, 8]),
    # PIR's y is legacy isclose's Other; its rtol/atol, PIR doubles, are legacy strings.
    "isclose": lambda x: paddle.isclose(x, x.round(), rtol=0.1, atol=0.05).astype("float32") * x,
    # Its legacy-IR branch fails in Paddle itself (UnboundLocalError): traced as its dygraph one.
    "solve": lambda x: paddle.linalg.solve(x[:, :, :4] + paddle.eye(4) * 8, x[:, :, 4:]),
    "solve_right": lambda x: paddle.linalg.solve(x[:, :, :4] + paddle.eye(4) * 8, x[:, :, 4:].transpose([0, 2, 1]), left=False),
    # The transforms behind paddle.fft return a name their legacy branch never set
    # (UnboundLocalError), and a legacy cast refuses complex types: traced as the dygraph ones
    # (FNet's token mixing, a spectral filter, an explicit cast to complex).
    "fft2_real": lambda x: paddle.real(paddle.fft.fft2(x)),
    "fft_cast_complex": lambda x: paddle.imag(paddle.fft.fft(paddle.cast(x, "complex64"), axis=1)),
    "rfft_irfft": lambda x: paddle.fft.irfft(paddle.fft.rfft(x, axis=-1) * 0.5, n=8, axis=-1),
    # PIR's out is legacy grid_sampler's Output (two channels of the features as the flow).
    "grid_sample": lambda x: F.grid_sample(
        x.reshape([0, 8, 2, 2]), paddle.tanh(x.reshape([0, 8, 2, 2])[:, :2].transpose([0, 2, 3, 1]))).reshape([0, 4, 8]),
}


class _Net(paddle.nn.Layer):
    def __init__(self, api: Callable[[paddle.Tensor], paddle.Tensor]) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(8, 8)
        self.api = api

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.api(self.fc(x))


@pytest.mark.parametrize("name", sorted(APIS))
def test_pir_only_api_exports_what_dygraph_computes(name, tmp_path) -> None:
    paddle.seed(0)
    model = _Net(APIS[name])
    model.eval()
    prefix = str(tmp_path / "m")
    save_fp32_model(model, prefix, [paddle.static.InputSpec([None, 4, 8], "float32", "x")])
    x = np.random.default_rng(0).standard_normal((2, 4, 8)).astype("float32")
    ran = predict(create_predictor(prefix, num_threads=1), x)[0]
    np.testing.assert_allclose(ran, model(paddle.to_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_legacy_op_type_is_the_newest_op_of_the_kernel() -> None:
    assert legacy_op_type("pd_op.matmul") == "matmul_v2"
    assert legacy_op_type("pd_op.transpose") == "transpose2"
    assert legacy_op_type("pd_op.softmax") == "softmax"
    assert legacy_op_type("pd_op.no_such_op") is None


def test_a_captured_dygraph_tensor_is_traced_as_a_constant(tmp_path) -> None:
    """It failed both exports: "multiply(): argument (position 2) must be Value, but got
    Tensor" (plain paddle.jit.save saves the model)."""
    from models import KeywordSpotter, converted, largest_error_in_paddle_inference

    paddle.seed(0)
    model = KeywordSpotter()
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4000)).astype(np.float32)
    spec = [paddle.static.InputSpec([None, 4000], "float32", "x")]
    save_fp32_model(model, str(tmp_path / "fp32"), spec)
    np.testing.assert_allclose(
        predict(create_predictor(str(tmp_path / "fp32")), x)[0], model(paddle.to_tensor(x)).numpy(), rtol=1e-4, atol=1e-4
    )
    qmodel = converted(model, [paddle.to_tensor(rng.standard_normal((2, 4000)).astype(np.float32)) for _ in range(2)])
    assert largest_error_in_paddle_inference(qmodel, x, tmp_path) < 2e-6


def test_bindings_made_after_an_earlier_trace_are_wrapped_and_all_restored(monkeypatch) -> None:
    """The trace remembers which names of each module are bound to a ``_C_ops`` function or a
    shimmed API (scanning every module on each export cost 20-40 ms of it): a module that
    gains such a name after a trace (code importing into it), a new Paddle module, and a
    name rebound by the user since (one of a Paddle module bound to its ``_C_ops`` function)
    are each seen as they are now; every binding is restored after."""
    import sys
    import types

    from imperative_ptq.export.legacy_ops import legacy_ir_fallback

    normalize = F.normalize
    module, name, c_op = next(
        (module, name, value) for module_name, module in list(sys.modules.items())
        if module_name.startswith("paddle.") and isinstance(module, types.ModuleType) and module is not paddle._C_ops
        for name, value in list(vars(module).items()) if getattr(paddle._C_ops, name, None) is value
    )
    users = types.ModuleType("user_module")
    monkeypatch.setitem(sys.modules, "user_module", users)
    with legacy_ir_fallback():  # scans the modules as they are now
        assert getattr(getattr(module, name), "__wrapped_pir_only__", None) is c_op
    users.normalize = normalize
    late = types.ModuleType("paddle.late_module")
    sigmoid = late.sigmoid = paddle._C_ops.sigmoid
    monkeypatch.setitem(sys.modules, "paddle.late_module", late)
    users_function = lambda *args, **kwargs: None  # noqa: E731 - the user's own function
    monkeypatch.setattr(module, name, users_function)
    with legacy_ir_fallback():
        assert users.normalize is not normalize and users.normalize.__wrapped__ is normalize
        assert getattr(late.sigmoid, "__wrapped_pir_only__", None) is sigmoid
        assert getattr(module, name) is users_function
    assert users.normalize is normalize and late.sigmoid is sigmoid is paddle._C_ops.sigmoid
    assert getattr(module, name) is users_function and F.normalize is normalize
