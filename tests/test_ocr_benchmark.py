"""The OCR section of the accuracy benchmark (benchmarks/ocr_recognizer.py): CTC decoding and
edit distance against slow references, the rendered lines, and the whole row on a tiny
recognizer built here as ONNX and converted with x2paddle (the real one is a benchmark)."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import paddle
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need their module
    spec.loader.exec_module(module)
    return module


ocr = _load("ocr_recognizer")


def _slow_edit_distance(a: str, b: str) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    return table[-1][-1]


def test_edit_distance_equals_the_textbook_table() -> None:
    rng = np.random.default_rng(0)
    assert ocr.edit_distance("kitten", "sitting") == 3
    pairs = [("", ""), ("", "ab"), ("abc", "")]
    pairs += [
        ("".join(rng.choice(list("abc"), rng.integers(0, 9))),
         "".join(rng.choice(list("abc"), rng.integers(0, 9))))
        for _ in range(300)
    ]
    for a, b in pairs:
        assert ocr.edit_distance(a, b) == _slow_edit_distance(a, b), (a, b)


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    classes = ["<blank>", "a", "b", " "]
    rng = np.random.default_rng(0)
    probabilities = rng.random([50, 12, len(classes)])
    expected = []
    for row in probabilities.argmax(-1):  # the slow reference
        text, previous = "", None
        for index in row:
            if index != previous and index != 0:
                text += classes[index]
            previous = index
        expected.append(text)
    assert ocr.ctc_greedy_decode(probabilities, classes) == expected
    path = np.eye(len(classes))[[1, 1, 0, 1, 2, 2, 3, 0, 2]][None]
    assert ocr.ctc_greedy_decode(path, classes) == ["aab b"]


def test_score_ignores_spaces() -> None:
    result = ocr.score(["ab c", "abd", ""], ["abc", "a bc", "xy"])
    assert result.exact_match == pytest.approx(1 / 3)
    assert result.cer == pytest.approx((0 + 1 + 2) / 8)


def test_rendered_lines_are_preprocessed_as_paddleocr_reads_them() -> None:
    images, labels = ocr.rendered_lines(6, seed=0)
    assert images.shape == (6, 3, ocr.HEIGHT, ocr.WIDTH) and images.dtype == np.float32
    assert labels == ocr.random_lines(6, seed=0) and labels != ocr.random_lines(6, seed=1)
    assert all(set(label) <= set(ocr.ALPHABET + " ") for label in labels)
    assert images.min() >= -1.0 and images.max() <= 1.0
    for image in images:
        background = image[0, :, 0]
        assert np.all(background == 1.0)  # white margin, scaled to +1
        written = np.nonzero(np.any(image[0] != 0.0, axis=0))[0]
        assert (image[0] < 0).any()  # dark text
        # Zero padding (PaddleOCR's) to the right of the line only.
        assert np.all(image[:, :, written.max() + 1 :] == 0.0)


def _tiny_recognizer(path: str, dictionary: str) -> None:
    """[N, 3, 48, 320] -> Conv (one step per 8 columns) -> Reshape -> Transpose -> MatMul ->
    Softmax: [N, 40, classes], with the dictionary in the metadata as PaddleOCR's exports."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    classes = len(dictionary.splitlines()) + 2
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], kernel_shape=[48, 8],
                         strides=[48, 8]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        # The target shape from the input's batch size, as paddle2onnx writes a flatten.
        helper.make_node("Shape", ["relu"], ["relu_shape"]),
        helper.make_node("Slice", ["relu_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "steps_shape"], ["shape"], axis=0),
        helper.make_node("Reshape", ["relu", "shape"], ["steps_first"]),
        helper.make_node("Transpose", ["steps_first"], ["steps"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["steps", "fc_w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=2),
    ]
    initializers = [
        numpy_helper.from_array((rng.standard_normal([16, 3, 48, 8]) * 0.05).astype("float32"), "conv_w"),
        numpy_helper.from_array(np.zeros(16, "float32"), "conv_b"),
        numpy_helper.from_array(np.array([0], "int64"), "zero"),
        numpy_helper.from_array(np.array([1], "int64"), "one"),
        numpy_helper.from_array(np.array([16, 40], "int64"), "steps_shape"),
        numpy_helper.from_array(rng.standard_normal([16, classes]).astype("float32"), "fc_w"),
    ]
    graph = helper.make_graph(
        nodes, "rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 48, 320])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 40, classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"character": dictionary})
    onnx.save(model, path)


def test_ocr_row_on_a_tiny_converted_recognizer(tmp_path, monkeypatch) -> None:
    """The OCR row end to end: x2paddle conversion cached (and reused), the batch dimension
    of its reshapes made dynamic, fp32 and int8 scores per target, Paddle Inference run."""
    pytest.importorskip("x2paddle", reason="x2paddle not installed (extra 'test')")
    import onnxruntime

    onnx_path = str(tmp_path / "tiny_rec.onnx")
    _tiny_recognizer(onnx_path, "\n".join(ocr.ALPHABET))
    assert ocr.characters(onnx_path) == ["<blank>", *ocr.ALPHABET, " "]
    cache = tmp_path / "cache"
    model = ocr.converted_recognizer(onnx_path, str(cache))
    code = (cache / "tiny_rec" / "x2paddle_code.py").read_text()
    assert "shape=[0, 16, 40]" in code  # converted with batch 1
    images, labels = ocr.rendered_lines(5, seed=0)  # a batch of 5
    session = onnxruntime.InferenceSession(onnx_path)
    np.testing.assert_allclose(
        ocr.dygraph_runner(model)(images), session.run(None, {"x": images})[0], atol=1e-5
    )

    accuracy = _load("accuracy")
    args = accuracy.parse_args([
        "--tables", "ocr", "--ocr-model", onnx_path, "--cache-dir", str(cache),
        "--ocr-calibration-lines", "8", "--ocr-test-lines", "10",
    ])
    # The cached conversion is reused: converting again would fail.
    import x2paddle.convert

    monkeypatch.setattr(x2paddle.convert, "onnx2paddle", lambda *args, **kwargs: pytest.fail("converted twice"))
    rows = accuracy.run(args)
    assert [row.model for row in rows] == [
        "tiny_rec (x86)", "tiny_rec (x86, bias correction)", "tiny_rec (x86-avx2)",
        "tiny_rec (x86-avx2, bias correction)", "tiny_rec (x86-vnni)",
        "tiny_rec (x86-vnni, bias correction)", "tiny_rec (x86-vnni, budget)",
    ]
    test_images, test_labels = ocr.rendered_lines(10, ocr.TEST_SEED)
    fp32 = ocr.score(
        ocr.recognize(ocr.dygraph_runner(model), test_images, ocr.characters(onnx_path)),
        test_labels,
    )
    for row in rows[:6]:
        assert row.fp32 == pytest.approx(100 * fp32.exact_match)
        assert row.inference is not None and 0 <= row.simulated <= 100
        assert f"CER fp32 {fp32.cer:.3f}" in row.algorithms
    assert [row.algorithms.startswith("KL + bias correction;") for row in rows[:6]] == [False, True] * 3
    budget = rows[6]
    assert budget.fp32 == pytest.approx(100 * fp32.exact_match) and 0 <= budget.simulated <= 100
    assert budget.inference is not None
    assert "max_drop 2.0 on validation lines" in budget.algorithms and "chose" in budget.algorithms
    with paddle.no_grad():
        assert model(paddle.to_tensor(images)).shape == [5, 40, len(ocr.ALPHABET) + 2]
