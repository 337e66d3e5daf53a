"""fp32 vs int8 latency in Paddle Inference (oneDNN) and ONNX Runtime, one process.

Engines are interleaved round by round and medians reported, so a noisy neighbour on the shared
machine hits every engine alike. Models: ResNet-18, MobileNetV2 and MobileNetV3-small (paddle.vision, random
weights, calibrated on random data), a 784-256-128-10 MLP, a LeNet, the demo's MnistConvNet and
a BERT-shaped encoder (6 layers, hidden 384, 12 heads, sequence 128, like MiniLM-L6; random
weights, random token ids; its output is the pooled embedding) and ConvNeXt-T's layout (its
pointwise Linear layers read channels-last rank-4 tensors, which the export runs as 1x1 convs)
and a YOLOv5-style SiLU backbone (``yolo_csp``, 320x320). ``--models`` also takes SqueezeNet 1.1, GoogLeNet,
DenseNet-121 and Inception-v3 (299x299), which the default run leaves out (``EXTRA_MODELS``). ONNX Runtime columns are left
empty for a model the ONNX export does not translate. Logit cosine is against
the dygraph fp32 model; sizes are of the exported files. Quantization is KL activations and
per-channel absmax weights for the deployment ``--target`` (default ``x86``); the header line
names the CPU and its int8 flags (``imperative_ptq.cpu_info().describe()``), including any
``ONEDNN_MAX_CPU_ISA`` cap.

Usage: python benchmarks/inference.py [--rounds 5] [--iters 10] [--models resnet18,...]
                                      [--target x86|x86-avx2|x86-vnni|arm] [--float-branches] [--verbose]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import statistics
import sys
import tempfile

import numpy as np
import paddle

from imperative_ptq import (
    DEFAULT_TARGET, TARGETS, ImperativePTQ, KLQuantizer, PerChannelAbsmaxQuantizer, PTQConfig,
    QuantizedLayer, cpu_info,
)
from imperative_ptq.analysis import keep_fp32
from imperative_ptq.quant_layers import QuantizedMatmul
from imperative_ptq.quant_rnn import QuantizedLSTM
from imperative_ptq.export import create_predictor, export_onnx, predict, save_fp32_model
from imperative_ptq.models import MnistConvNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import milliseconds_per_call  # noqa: E402

logger = logging.getLogger("benchmarks.inference")


def _lenet() -> paddle.nn.Layer:
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(1, 6, 5, padding=2), paddle.nn.BatchNorm2D(6), paddle.nn.ReLU(),
        paddle.nn.MaxPool2D(2, 2), paddle.nn.Conv2D(6, 16, 5), paddle.nn.ReLU(),
        paddle.nn.MaxPool2D(2, 2), paddle.nn.Flatten(), paddle.nn.Linear(400, 120),
        paddle.nn.ReLU(), paddle.nn.Linear(120, 84), paddle.nn.ReLU(), paddle.nn.Linear(84, 10),
    )


def _mlp() -> paddle.nn.Layer:
    return paddle.nn.Sequential(
        paddle.nn.Linear(784, 256), paddle.nn.ReLU(), paddle.nn.Linear(256, 128),
        paddle.nn.ReLU(), paddle.nn.Linear(128, 10),
    )


class BertEncoder(paddle.nn.Layer):
    """A BERT-shaped sentence encoder: token + position embeddings, LayerNorm, post-norm
    TransformerEncoder layers with GELU, and BERT's pooler (tanh of a Linear of the first
    token), which is the output."""

    def __init__(
        self, vocabulary: int = 8192, hidden: int = 384, layers: int = 6, heads: int = 12,
        length: int = 128,
    ) -> None:
        super().__init__()
        self.tokens = paddle.nn.Embedding(vocabulary, hidden)
        self.positions = paddle.nn.Embedding(length, hidden)
        self.norm = paddle.nn.LayerNorm(hidden)
        layer = paddle.nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout=0.0, activation="gelu"
        )
        self.encoder = paddle.nn.TransformerEncoder(layer, layers)
        self.pooler = paddle.nn.Linear(hidden, hidden)
        self.register_buffer("position_ids", paddle.arange(length, dtype="int64").unsqueeze(0))

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        hidden = self.norm(self.tokens(ids) + self.positions(self.position_ids))
        hidden = self.encoder(hidden)
        return paddle.tanh(self.pooler(hidden[:, 0]))


class _ChannelsLastNorm(paddle.nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's stem and downsampling norm)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])


class ConvNeXtBlock(paddle.nn.Layer):
    """7x7 depthwise conv, then LayerNorm, Linear, GELU, Linear on the channels-last tensor,
    layer scale (0.5 here: a trained model's, not ConvNeXt's 1e-6 initial one, which would make
    random-weight blocks identities) and the residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = paddle.nn.Conv2D(dim, dim, 7, padding=3, groups=dim)
        self.norm = paddle.nn.LayerNorm(dim, epsilon=1e-6)
        self.pwconv1 = paddle.nn.Linear(dim, 4 * dim)
        self.act = paddle.nn.GELU()
        self.pwconv2 = paddle.nn.Linear(4 * dim, dim)
        self.gamma = self.create_parameter([dim], default_initializer=paddle.nn.initializer.Constant(0.5))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).transpose([0, 2, 3, 1])))))
        return x + (self.gamma * y).transpose([0, 3, 1, 2])


class ConvNeXt(paddle.nn.Layer):
    """ConvNeXt-T's layout (depths 3-3-9-3, widths 96-768): a 4x4 patch stem, stages of
    ConvNeXt blocks joined by LayerNorm + 2x2 stride-2 convs, a pooled LayerNorm and the head."""

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), classes: int = 1000) -> None:
        super().__init__()
        layers: list[paddle.nn.Layer] = [paddle.nn.Conv2D(3, dims[0], 4, stride=4), _ChannelsLastNorm(dims[0], epsilon=1e-6)]
        for stage, (depth, dim) in enumerate(zip(depths, dims)):
            if stage:
                layers += [_ChannelsLastNorm(dims[stage - 1], epsilon=1e-6), paddle.nn.Conv2D(dims[stage - 1], dim, 2, stride=2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = paddle.nn.Sequential(*layers)
        self.pool = paddle.nn.AdaptiveAvgPool2D(1)
        self.norm = paddle.nn.LayerNorm(dims[-1], epsilon=1e-6)
        self.head = paddle.nn.Linear(dims[-1], classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.norm(self.pool(self.features(x)).flatten(1)))


class WaveNet(paddle.nn.Layer):
    """A WaveNet-style stack on ``[N, 1, T]``: per layer a causal pad, dilated Conv1D filter and
    gate multiplied as tanh x sigmoid, 1x1 Conv1D residual and skip outputs; every conv after
    the first reads a signed input."""

    def __init__(self, channels: int = 64, layers: int = 8) -> None:
        super().__init__()
        nn = paddle.nn
        self.inp = nn.Conv1D(1, channels, 1)
        self.filters = nn.LayerList([nn.Conv1D(channels, channels, 2, dilation=2 ** i) for i in range(layers)])
        self.gates = nn.LayerList([nn.Conv1D(channels, channels, 2, dilation=2 ** i) for i in range(layers)])
        self.residuals = nn.LayerList([nn.Conv1D(channels, channels, 1) for _ in range(layers)])
        self.skips = nn.LayerList([nn.Conv1D(channels, channels, 1) for _ in range(layers)])
        self.post, self.out = nn.Conv1D(channels, channels, 1), nn.Conv1D(channels, 16, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x, skips = self.inp(x), 0
        for index, (filter_conv, gate_conv) in enumerate(zip(self.filters, self.gates)):
            padded = paddle.nn.functional.pad(x, [2 ** index, 0], data_format="NCL")
            z = paddle.tanh(filter_conv(padded)) * paddle.nn.functional.sigmoid(gate_conv(padded))
            skips = skips + self.skips[index](z)
            x = x + self.residuals[index](z)
        return self.out(paddle.nn.functional.relu(self.post(paddle.nn.functional.relu(skips))))


class CspNet(paddle.nn.Layer):
    """A YOLOv5-style backbone at width 32 (``yolo_csp``): conv -> BatchNorm -> SiLU blocks,
    strided 3x3 downsampling, C3 stages of 1x1/3x3 bottlenecks with residual adds and a
    concat, and an 85-channel 1x1 head. Every conv after the first reads a signed input
    (SiLU outputs), the first a normalized image."""

    class _Block(paddle.nn.Layer):
        def __init__(self, ci: int, co: int, k: int = 1, stride: int = 1) -> None:
            super().__init__()
            self.conv = paddle.nn.Conv2D(ci, co, k, stride, k // 2, bias_attr=False)
            self.norm = paddle.nn.BatchNorm2D(co)

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            return paddle.nn.functional.silu(self.norm(self.conv(x)))

    class _C3(paddle.nn.Layer):
        def __init__(self, ci: int, co: int, depth: int) -> None:
            super().__init__()
            block, half = CspNet._Block, co // 2
            self.a, self.b, self.out = block(ci, half), block(ci, half), block(2 * half, co)
            self.bottlenecks = paddle.nn.LayerList(
                [paddle.nn.Sequential(block(half, half), block(half, half, 3)) for _ in range(depth)]
            )

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            y = self.a(x)
            for bottleneck in self.bottlenecks:
                y = y + bottleneck(y)
            return self.out(paddle.concat([y, self.b(x)], axis=1))

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        block, c3, w = CspNet._Block, CspNet._C3, width
        self.body = paddle.nn.Sequential(
            block(3, w, 3, 2), block(w, 2 * w, 3, 2), c3(2 * w, 2 * w, 1), block(2 * w, 4 * w, 3, 2),
            c3(4 * w, 4 * w, 2), block(4 * w, 8 * w, 3, 2), c3(8 * w, 8 * w, 3), block(8 * w, 16 * w, 3, 2),
            c3(16 * w, 16 * w, 1),
        )
        self.head = paddle.nn.Conv2D(16 * w, 85, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.body(x))


#: name -> (factory, input shape without batch, batch sizes, input dtype)
MODELS = {
    "resnet18": (lambda: paddle.vision.models.resnet18(), [3, 224, 224], (1, 8), "float32"),
    "mobilenet_v2": (lambda: paddle.vision.models.mobilenet_v2(), [3, 224, 224], (1, 8), "float32"),
    "mobilenet_v3_small": (lambda: paddle.vision.models.mobilenet_v3_small(), [3, 224, 224], (1, 8), "float32"),
    "mlp": (_mlp, [784], (1, 64), "float32"),
    "lenet": (_lenet, [1, 28, 28], (1, 64), "float32"),
    "convnet": (MnistConvNet, [1, 28, 28], (1, 64), "float32"),
    "bert_encoder": (BertEncoder, [128], (1, 8), "int64"),
    "convnext_tiny": (ConvNeXt, [3, 224, 224], (1, 8), "float32"),
    "wavenet": (WaveNet, [1, 1600], (1, 8), "float32"),
    "yolo_csp": (CspNet, [3, 320, 320], (1, 4), "float32"),
}
#: Larger ``paddle.vision`` classifiers, timed only when named in ``--models`` (a few minutes
#: each): the concat-, pool- and BatchNorm-heavy layouts whose int8 exports had slow paths.
EXTRA_MODELS = {
    "squeezenet1_1": (lambda: paddle.vision.models.squeezenet1_1(), [3, 224, 224], (1, 8), "float32"),
    "googlenet": (lambda: paddle.vision.models.googlenet(), [3, 224, 224], (1, 8), "float32"),
    "densenet121": (lambda: paddle.vision.models.densenet121(), [3, 224, 224], (1, 8), "float32"),
    "inception_v3": (lambda: paddle.vision.models.inception_v3(), [3, 299, 299], (1, 8), "float32"),
}


def model_input(shape: list[int], dtype: str, batch: int, seed: int) -> np.ndarray:
    """A random batch: uniform [0, 1) floats, or token ids below the BERT encoder's vocabulary."""
    rng = np.random.default_rng(seed)
    if dtype == "int64":
        return rng.integers(0, 8192, [batch, *shape]).astype(np.int64)
    return rng.random([batch, *shape], dtype=np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _size(path: str) -> int:
    return os.path.getsize(path)


def export_model(name: str, workdir: str, target: str = DEFAULT_TARGET):
    """``name`` calibrated (KL activations, per-channel absmax weights, 8 random batches of 4)
    for ``target`` and exported to ``workdir/int8`` and ``workdir/fp32``.

    Returns:
        ``(model, converted model, input spec, fp32 prefix, int8 prefix)``.
    """
    factory, shape, _, dtype = {**MODELS, **EXTRA_MODELS}[name]
    paddle.seed(0)
    model = factory()
    model.eval()
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(), PerChannelAbsmaxQuantizer(), target=target))
    qmodel = ptq.quantize(model)
    for step in range(8):
        qmodel(paddle.to_tensor(model_input(shape, dtype, 4, seed=100 + step)))
    spec = [paddle.static.InputSpec([None, *shape], dtype, "x")]
    int8_prefix, fp32_prefix = os.path.join(workdir, "int8"), os.path.join(workdir, "fp32")
    ptq.save_quantized_model(qmodel, int8_prefix, spec)
    # Same format and bias folding as the int8 export, so fp32 is not handicapped.
    save_fp32_model(model, fp32_prefix, spec)
    return model, qmodel, spec, fp32_prefix, int8_prefix


def bench_model(
    name: str, rounds: int, iters: int, workdir: str, target: str = DEFAULT_TARGET,
    float_branches: bool = False,
) -> list[dict]:
    """Export ``name`` in fp32 and int8 (for ``target``) and time every engine on it
    (``float_branches``: also ONNX Runtime on the export with
    ``int8_residual_branches=False``)."""
    _, shape, batches, dtype = {**MODELS, **EXTRA_MODELS}[name]
    model, qmodel, spec, fp32_prefix, int8_prefix = export_model(
        name, os.path.join(workdir, name), target
    )
    engines = {
        "paddle fp32": create_predictor(fp32_prefix, int8=False),
        "paddle int8": create_predictor(int8_prefix, int8=True),
    }
    sizes = {
        "pdiparams fp32 MB": _size(fp32_prefix + ".pdiparams") / 2**20,
        "pdiparams int8 MB": _size(int8_prefix + ".pdiparams") / 2**20,
    }
    try:
        onnx_int8 = export_onnx(qmodel, os.path.join(workdir, name, "int8.onnx"), spec)
        sizes["onnx int8 MB"] = _size(onnx_int8) / 2**20
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        # ORT's idle workers spin after each run and steal the cores from whichever engine is
        # timed next (inflating Paddle fp32 on small models by up to 5x): no spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        engines["ort int8"] = ort.InferenceSession(onnx_int8, options, providers=["CPUExecutionProvider"])
        if float_branches:
            exact = export_onnx(qmodel, os.path.join(workdir, name, "int8_float_branches.onnx"), spec,
                                int8_residual_branches=False)
            engines["ort int8 float branches"] = ort.InferenceSession(
                exact, options, providers=["CPUExecutionProvider"]
            )
        fp32_path = fp32_onnx(qmodel, model, os.path.join(workdir, name, "fp32.onnx"), spec)
        engines["ort fp32"] = ort.InferenceSession(fp32_path, options, providers=["CPUExecutionProvider"])
    except ImportError:
        logger.warning("onnxruntime missing: ONNX Runtime columns skipped")
    except NotImplementedError as error:
        logger.warning("%s: no ONNX export (%s): ONNX Runtime columns skipped", name, error)

    rows = []
    for batch in batches:
        x = model_input(shape, dtype, batch, seed=batch)
        with paddle.no_grad():
            reference = model(paddle.to_tensor(x))
        # (GoogLeNet returns its two auxiliary heads too: the first output is the logits.)
        reference = (reference[0] if isinstance(reference, (list, tuple)) else reference).numpy()
        runs = {}
        for engine_name, engine in engines.items():
            if engine_name.startswith("ort"):
                runs[engine_name] = (lambda e=engine: e.run(None, {"x": x})[0])
            else:
                runs[engine_name] = (lambda e=engine: predict(e, x)[0])
        cosines = {k: _cosine(run(), reference) for k, run in runs.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for engine_name, run in runs.items():
                times[engine_name].append(milliseconds_per_call(run, iters))
        medians = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "batch": batch, **{f"{k} ms": v for k, v in medians.items()}}
        row["paddle speed-up"] = medians["paddle fp32"] / medians["paddle int8"]
        if "ort int8" in medians:
            row["ort speed-up"] = medians["ort fp32"] / medians["ort int8"]
        if "ort int8 float branches" in medians:
            row["ort float branches speed-up"] = medians["ort fp32"] / medians["ort int8 float branches"]
        row.update({f"cos {k}": v for k, v in cosines.items()})
        row.update(sizes)
        rows.append(row)
        logger.info("%s", row)
    return rows


def fp32_onnx(qmodel: paddle.nn.Layer, model: paddle.nn.Layer, path: str, spec) -> str:
    """The fp32 ONNX of the same graph: a copy of the converted ``qmodel`` with every layer put
    back in fp32 (``analysis.keep_fp32``), written by the same converter (BatchNorms folded into
    the convs, activations as in the int8 graph), without the Q/DQ pairs left on the residual
    sums the simulation holds on codes (each pair replaced by the float tensor it reads).

    (Stripping every Q/DQ pair of the int8 graph instead left out whatever they stood for: a
    ReLU6 whose codes the int8 graph takes from its input, MobileNetV2's fp32 logits at a
    cosine of 0.67 to the dygraph model; a shifted input's float arithmetic, which it kept.)"""
    import onnx

    fp32 = copy.deepcopy(qmodel)
    names = [
        name for name, layer in fp32.named_sublayers()
        if isinstance(layer, (QuantizedLayer, QuantizedLSTM, QuantizedMatmul))
    ]
    keep_fp32(fp32, names, model)
    graph_model = onnx.load(export_onnx(fp32, path, spec))
    graph = graph_model.graph
    constants = {t.name for t in graph.initializer}
    codes = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            raise ValueError(f"{path}: an integer weight is left in the fp32 graph")
        inputs = [rename.get(name, name) for name in node.input]
        # QuantizeLinear, the Clip of its uint8 codes and the DequantizeLinear: the float input.
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or (
            node.op_type == "Clip" and set(node.input[1:]) & codes
        ):
            rename[node.output[0]] = inputs[0]
            continue
        del node.input[:]
        node.input.extend(inputs)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(graph_model, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--target", default=DEFAULT_TARGET, choices=sorted(TARGETS),
                        help="deployment target of the int8 export (default %(default)s)")
    parser.add_argument("--float-branches", action="store_true",
                        help="also time ONNX Runtime on the export with the residual branches the "
                             "simulation adds in float left float (int8_residual_branches=False)")
    parser.add_argument("--verbose", action="store_true",
                        help="log the export's INFO lines, among them how many conv/fc ops "
                             "Paddle Inference runs int8")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.verbose:
        logging.getLogger("imperative_ptq.export").setLevel(logging.INFO)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            rows.extend(bench_model(name, args.rounds, args.iters, workdir, args.target, args.float_branches))
    print(f"# {datetime.date.today()} {cpu_info().describe()} "
          f"cpus={len(os.sched_getaffinity(0))} paddle={paddle.__version__} target={args.target}")
    header = ["model", "batch", "paddle fp32 ms", "paddle int8 ms", "paddle speed-up",
              "ort fp32 ms", "ort int8 ms", "ort speed-up", "cos paddle fp32", "cos paddle int8",
              "cos ort int8", "cos ort fp32", "pdiparams fp32 MB", "pdiparams int8 MB", "onnx int8 MB"]
    if args.float_branches:
        after = header.index("ort speed-up") + 1
        header[after:after] = ["ort int8 float branches ms", "ort float branches speed-up"]
        header.append("cos ort int8 float branches")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = []
        for key in header:
            value = row.get(key, "")
            cells.append(f"{value:.4f}" if key.startswith("cos") and value != "" else
                         f"{value:.2f}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
