"""Which layers of LeNet suffer most from quantization, and which to keep in fp32.

Calibrates the cached LeNet of ``mnist_ptq.py`` (trained there on first use) at a low bit width,
measures each layer's sensitivity on real MNIST, searches a skip set for an accuracy budget and
writes a report with plots (needs ``pip install imperative_ptq[report]``).

    python demos/mnist_sensitivity.py --bits 4 --budget 0.5
"""

from __future__ import annotations

import argparse
import os
import sys

import paddle

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_ptq import trained_model  # noqa: E402  (the sibling demo caches the weights)

from imperative_ptq import (  # noqa: E402
    ImperativePTQ,
    KLQuantizer,
    PerChannelAbsmaxQuantizer,
    PTQConfig,
    search_skip_set,
)
from imperative_ptq.datasets import load_mnist  # noqa: E402
from imperative_ptq.report import calibration_histograms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4, help="bit width (default: 4)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="allowed accuracy drop in points (default: 0.5)")
    parser.add_argument("--output-dir", default=os.path.join("out", "mnist_sensitivity"))
    parser.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), ".cache"))
    args = parser.parse_args(argv)

    data = load_mnist()
    model = trained_model("lenet", args.cache_dir)
    ptq = ImperativePTQ(PTQConfig(KLQuantizer(args.bits), PerChannelAbsmaxQuantizer(args.bits)))
    calibration = [data.train_images[i : i + 100] for i in range(0, 1000, 100)]
    qmodel = ptq.quantize(model)
    ptq.calibrate(qmodel, calibration, progress=False)
    histograms = calibration_histograms(qmodel)  # before convert drops the statistics
    ptq.convert(qmodel)

    images, labels = data.test_images[:2000], data.test_labels[:2000]

    def metric(m: paddle.nn.Layer) -> float:  # top-1 accuracy in percent
        with paddle.no_grad():
            logits = m(paddle.to_tensor(images)).numpy()
        return float((logits.argmax(axis=1) == labels).mean() * 100)

    report = ptq.analyze(model, qmodel, calibration[:4], metric=metric)
    print(f"LeNet, {args.bits}-bit, accuracy on 2000 test images\n")
    print(report.to_markdown())
    result = search_skip_set(model, qmodel, metric, args.budget, report)
    print(f"keep in fp32: {result.skip or 'nothing'} -> accuracy {result.metric:.2f} "
          f"(fp32 {result.fp32_metric:.2f}, budget {args.budget}, "
          f"{len(result.history)} evaluations, within budget: {result.within_budget})")
    try:
        path = report.save(args.output_dir, histograms=histograms)
    except ImportError as error:
        path = report.save(args.output_dir, plots=False)
        print(f"(no plots: {error})")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
