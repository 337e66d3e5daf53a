"""Paddle Inference int8 latency of an ONNX net whose convs read explicit zero ``Pad`` nodes
(PyTorch's ``nn.ZeroPad2d`` before each conv, TensorFlow's asymmetric "same" padding ported),
as x2paddle wrote them (a pad op, which ``create_predictor`` keeps out of oneDNN) and folded
into the convs by ``load_onnx_model``, against the same net with the padding in its convs.

Nine 3x3 convs with ReLUs (stride 2 every other one: pads ``(0, 1, 0, 1)``, else 1 on each
side), a global average pool and a Linear head, random weights, one float input; each variant
converted with x2paddle, calibrated on random ``[0, 1)`` batches (abs-max, per-channel weights),
exported for ``--target`` and timed on one thread, the variants interleaved, medians of
``--rounds`` rounds of ``--iters`` calls. The last column is each variant's largest difference
to the Paddle Inference output of the net with the padding in its convs, relative to its
largest output (the folded net runs the same program: 0; the pad ops can move a code across a
rounding tie, which nine layers of 160 x 160 maps amplify).

    python benchmarks/onnx_pads.py [--size 160] [--batch 8] [--rounds 5] [--iters 10] [--target x86]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile

import numpy as np
import paddle

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import milliseconds_per_call, replaced  # noqa: E402

#: (input channels, output channels, stride) of each conv.
CONVS = [(3, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1),
         (128, 256, 2), (256, 256, 1)]


def padded_net(path: str, size: int, pads_in_convs: bool) -> str:
    """The benchmark's net as an ONNX file (opset 13): a ``Pad`` node before each conv, or the
    same padding in the convs' ``pads``."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    nodes, initializers, tensor = [], [], "x"
    for index, (inputs, outputs, stride) in enumerate(CONVS):
        begin, end = (0, 1) if stride == 2 else (1, 1)
        weight = (rng.standard_normal([outputs, inputs, 3, 3]) * np.sqrt(2 / (9 * inputs))).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{index}"),
                         numpy_helper.from_array(np.full(outputs, 0.01, np.float32), f"b{index}")]
        if pads_in_convs:
            conv_pads = [begin, begin, end, end]
        else:
            initializers.append(numpy_helper.from_array(np.array([0, 0, begin, begin, 0, 0, end, end], np.int64), f"p{index}"))
            nodes.append(helper.make_node("Pad", [tensor, f"p{index}"], [f"padded{index}"], mode="constant"))
            tensor, conv_pads = f"padded{index}", [0, 0, 0, 0]
        nodes += [
            helper.make_node("Conv", [tensor, f"w{index}", f"b{index}"], [f"conv{index}"], kernel_shape=[3, 3],
                             strides=[stride, stride], pads=conv_pads),
            helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]),
        ]
        tensor = f"relu{index}"
    head = (rng.standard_normal([CONVS[-1][1], 10]) / np.sqrt(CONVS[-1][1])).astype(np.float32)
    initializers += [numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    nodes += [
        helper.make_node("GlobalAveragePool", [tensor], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat"], ["features"]),
        helper.make_node("MatMul", ["features", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "padded_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160, help="input height and width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--target", default="x86")
    args = parser.parse_args(argv)

    import imperative_ptq as ip
    from imperative_ptq import onnx_import
    from imperative_ptq.export import create_predictor, predict

    logging.disable(logging.WARNING)
    rng = np.random.default_rng(1)
    x = rng.random((args.batch, 3, args.size, args.size), np.float32)
    calibration = [rng.random((2, 3, args.size, args.size), np.float32) for _ in range(4)]
    variants = {
        "pad ops, as x2paddle writes them": (False, replaced(onnx_import, "_zero_pads_folded_into_convs", lambda model: None)),
        "pads folded into the convs (load_onnx_model)": (False, None),
        "padding in the convs in the file": (True, None),
    }
    predictors, outputs = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for number, (name, (pads_in_convs, switch)) in enumerate(variants.items()):
            path = padded_net(f"{directory}/net{number}.onnx", args.size, pads_in_convs)
            with switch or contextlib.nullcontext():
                model = onnx_import.load_onnx_model(path, f"{directory}/converted{number}", {"x": [1, 3, args.size, args.size]},
                                                    dynamic_batch=True)
            ptq = ip.ImperativePTQ(ip.PTQConfig(ip.AbsmaxQuantizer(), ip.PerChannelAbsmaxQuantizer(), target=args.target))
            quantized = ptq.quantize(model)
            for batch in calibration:
                quantized(paddle.to_tensor(batch))
            ptq.convert(quantized)
            spec = [paddle.static.InputSpec([None, 3, args.size, args.size], "float32", "x")]
            ptq.save_quantized_model(quantized, f"{directory}/int8_{number}", input_spec=spec)
            predictors[name] = create_predictor(f"{directory}/int8_{number}", num_threads=1)
            outputs[name] = predict(predictors[name], x)[0]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, predictor in predictors.items():
                times[name].append(milliseconds_per_call(lambda: predict(predictor, x), args.iters))
    reference = "padding in the convs in the file"
    baseline = statistics.median(times[reference])
    print(f"# {ip.cpu_info().describe()}; Paddle {paddle.__version__}; target {args.target}; batch {args.batch} "
          f"x 3 x {args.size} x {args.size}; one thread; medians of {args.rounds} rounds of {args.iters} calls")
    print("| net | Paddle Inference int8 ms | vs padding in the convs | output vs padding in the convs |")
    print("|---|---:|---:|---:|")
    for name in variants:
        median = statistics.median(times[name])
        difference = float(np.abs(outputs[name] - outputs[reference]).max() / np.abs(outputs[reference]).max())
        print(f"| {name} | {median:.2f} | {median / baseline:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
