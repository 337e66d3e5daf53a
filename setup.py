"""Packaging for imperative_ptq."""

from setuptools import find_packages, setup

setup(
    name="imperative_ptq",
    version="0.1.0",
    description=(
        "Post-training quantization for PaddlePaddle dygraph models: fast calibration and "
        "int8 export that runs on Paddle 3.x"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["imperative_ptq", "imperative_ptq.*"]),
    python_requires=">=3.9",
    install_requires=[
        "paddlepaddle>=3.0",
        "numpy",
        "tqdm>=4.54",  # tqdm(delay=...)
    ],
    extras_require={
        # torch is only a reference implementation for the primitives' tests. x2paddle
        # converts an ONNX model for the model-zoo test; 1.6.0 (the newest) imports
        # onnx.mapping, which onnx removed in 1.19, and imports requests without declaring it.
        # pytest-xdist runs the suite on both cores of a CI machine, a file per worker so that
        # module fixtures are built once (14.5 -> 8.1 minutes on a 2-core AVX2 EPYC).
        # onnxscript is what torch.onnx.export's default (dynamo) exporter runs on: the test of
        # loading the opset-20 files it writes exports one.
        "test": [
            "pytest", "pytest-xdist", "hypothesis", "torch==2.13.0", "onnx==1.18.0", "onnxruntime",
            "matplotlib", "x2paddle==1.6.0", "requests", "onnxscript",
        ],
        # QDQ ONNX export (imperative_ptq.export.export_onnx) and running it.
        "export": ["onnx", "onnxruntime"],
        # PNG plots of SensitivityReport.save (imperative_ptq.analysis).
        "report": ["matplotlib"],
        # benchmarks/accuracy.py --tables ocr: PaddleOCR's PP-OCRv4 recognizer as the ONNX
        # file and dictionary rapidocr_onnxruntime ships, converted with x2paddle (onnx and
        # requests pinned/added as in "test"); Pillow renders the text lines.
        "bench": [
            "rapidocr_onnxruntime==1.4.4", "x2paddle==1.6.0", "onnx==1.18.0", "onnxruntime",
            "requests", "Pillow",
        ],
    },
    entry_points={"console_scripts": ["imperative-ptq=imperative_ptq.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering"],
)
