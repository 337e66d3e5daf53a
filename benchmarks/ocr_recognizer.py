"""A real OCR recognizer for the accuracy benchmark: PaddleOCR's PP-OCRv4 text recognizer
(``ch_PP-OCRv4_rec``, as the ONNX file and character dictionary that the
``rapidocr_onnxruntime`` package ships), converted to a dygraph model with x2paddle, read on
text lines rendered here with known labels.

* :func:`converted_recognizer` converts the ONNX file once and caches x2paddle's code and
  weights under ``<cache_dir>/<ONNX file stem>``, e.g. ``demos/.cache/ch_PP-OCRv4_rec_infer``
  for the benchmark (converted again when the file changes).
* :func:`rendered_lines` draws random alphanumeric lines (one to three words) with Pillow's
  own FreeType font, preprocessed as PaddleOCR's recognizer expects them.
* :func:`score` decodes the recognizer's per-step probabilities greedily (CTC) and measures
  exact match and character error rate (spaces ignored, as PaddleOCR's ``RecMetric`` does).

``benchmarks/accuracy.py --tables ocr`` runs it (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import string
from typing import Callable, Sequence

import numpy as np
import paddle

from imperative_ptq.onnx_import import load_onnx_model

logger = logging.getLogger(__name__)

#: The recognizer's input: 3 x 48 x 320 (PaddleOCR's ``rec_image_shape``).
HEIGHT, WIDTH = 48, 320
#: Characters of the rendered lines: letters and digits without the pairs Pillow's font draws
#: alike (I/l, O/0), which no recognizer can tell apart out of context.
ALPHABET = "".join(c for c in string.ascii_letters + string.digits if c not in "IlO0")
#: Seeds of the rendered calibration, test and validation lines (different lines).
CALIBRATION_SEED, TEST_SEED, VALIDATION_SEED = 1, 2, 3
#: The recognizer inside the rapidocr_onnxruntime package.
ONNX_FILE = os.path.join("models", "ch_PP-OCRv4_rec_infer.onnx")


@dataclasses.dataclass
class Score:
    """Recognition quality on labelled lines.

    Attributes:
        exact_match: Fraction of lines read exactly (spaces ignored).
        cer: Character error rate: edit distance summed over the lines / label characters.
    """

    exact_match: float
    cer: float


def recognizer_onnx() -> str:
    """The path of the PP-OCRv4 recognizer shipped in ``rapidocr_onnxruntime``.

    Raises:
        ImportError: The package is not installed (extra ``bench``).
    """
    try:
        import rapidocr_onnxruntime
    except ImportError as error:
        raise ImportError(
            "the OCR benchmark reads the PP-OCRv4 recognizer from rapidocr_onnxruntime: "
            'pip install -e ".[bench]"'
        ) from error
    return os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), ONNX_FILE)


def characters(onnx_path: str) -> list[str]:
    """The CTC classes of the recognizer: blank, its dictionary (the ONNX file's ``character``
    metadata, one per line) and the space PaddleOCR appends (``use_space_char``)."""
    import onnx

    metadata = {entry.key: entry.value for entry in onnx.load(onnx_path).metadata_props}
    if "character" not in metadata:
        raise ValueError(f"{onnx_path} has no 'character' metadata (the CTC dictionary)")
    return ["<blank>", *metadata["character"].splitlines(), " "]


def converted_recognizer(onnx_path: str, cache_dir: str) -> paddle.nn.Layer:
    """The recognizer ``onnx_path`` (input ``x``: ``[batch, 3, 48, 320]``) as x2paddle's
    dygraph model, converted on first use and cached in ``cache_dir/<file stem>``
    (:func:`~imperative_ptq.onnx_import.load_onnx_model`, converted at batch 1 with the batch
    of its reshapes made dynamic, so that any batch runs)."""
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    return load_onnx_model(
        onnx_path, os.path.join(cache_dir, stem), {"x": [1, 3, HEIGHT, WIDTH]}, dynamic_batch=True
    )


def random_lines(count: int, seed: int) -> list[str]:
    """``count`` lines of one to three words of 3-8 characters from :data:`ALPHABET`."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(ALPHABET))
    return [
        " ".join("".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(rng.integers(1, 4)))
        for _ in range(count)
    ]


def render_line(text: str, font_size: int = 32) -> np.ndarray:
    """``text`` in black on white, preprocessed as PaddleOCR's recognizer reads a line
    (``resize_norm_img``): height 48 keeping the aspect ratio (width at most 320), scaled to
    [-1, 1], zero-padded on the right to 320. Returns ``[3, 48, 320]`` float32."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)  # Pillow's own FreeType font
    left, top, right, bottom = font.getbbox(text)
    margin = font_size // 4
    image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), "white")
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill="black", font=font)
    width = min(WIDTH, int(np.ceil(HEIGHT * image.width / image.height)))
    pixels = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR), np.float32)
    line = np.zeros([3, HEIGHT, WIDTH], np.float32)
    line[:, :, :width] = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return line


def rendered_lines(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered lines ``[count, 3, 48, 320]`` and their labels."""
    labels = random_lines(count, seed)
    return np.stack([render_line(text) for text in labels]), labels


def ctc_greedy_decode(probabilities: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Best path decoding of ``[batch, steps, classes]`` scores: the most likely class per
    step, repeats merged, blanks (class 0) dropped."""
    best = probabilities.argmax(axis=-1)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return ["".join(classes[index] for index in row[mask]) for row, mask in zip(best, keep)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions): the Wagner-Fischer table
    one row per character of ``a``, each row computed for all of ``b`` at once."""
    previous = np.arange(len(b) + 1)
    target = np.array(list(b))
    for i, char in enumerate(a, start=1):
        substitution = previous[:-1] + (target != char)
        current = np.empty_like(previous)
        current[0] = i
        current[1:] = np.minimum(previous[1:] + 1, substitution)
        # Insertions chain along the row: current[j] = min over k <= j of current[k] + j - k.
        current = np.minimum.accumulate(current - np.arange(len(b) + 1)) + np.arange(len(b) + 1)
        previous = current
    return int(previous[-1])


def score(predictions: Sequence[str], labels: Sequence[str]) -> Score:
    """Exact match and CER of ``predictions`` against ``labels``, spaces ignored."""
    predictions = [p.replace(" ", "") for p in predictions]
    labels = [label.replace(" ", "") for label in labels]
    exact = np.mean([p == label for p, label in zip(predictions, labels)])
    edits = sum(edit_distance(p, label) for p, label in zip(predictions, labels))
    return Score(float(exact), edits / max(1, sum(len(label) for label in labels)))


def recognize(
    run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, classes: Sequence[str],
    batch_size: int = 16,
) -> list[str]:
    """The text ``run`` (images -> per-step probabilities) reads on each image."""
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        texts += ctc_greedy_decode(run(images[start : start + batch_size]), classes)
    return texts


def dygraph_runner(model: paddle.nn.Layer) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> probabilities`` of a dygraph model, without gradients."""

    def run(images: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy()

    return run
