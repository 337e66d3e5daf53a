"""The command line: ``python -m imperative_ptq`` / ``imperative-ptq``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest

from imperative_ptq import ImperativePTQ
from imperative_ptq.cli import build_parser, image_batches, main, npy_batches
from checkout import checkout_env

MODEL_FILE = textwrap.dedent(
    """
    import paddle
    from paddle import nn

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(paddle.flatten(self.pool(self.relu(self.conv(x))), 1))

    def build():
        return Net()

    def broken():
        raise RuntimeError("no GPU here")

    def not_a_layer():
        return 42

    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(data / f"batch{i}.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    (tmp_path / "empty").mkdir()
    return tmp_path


def _args(project, *extra: str) -> list[str]:
    return ["--model", str(project / "net.py") + ":build", "--data", str(project / "data"),
            "--output", str(project / "out" / "net"), "-q", *extra]


def test_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--weights", "--data", "--image-size", "--mean", "--std",
                   "--algorithm", "--weights-scheme", "--bits", "--max-batches",
                   "--input-shape", "--output", "--no-export", "kl_tensorrt", "per_channel",
                   "--target", "x86-vnni"):
        assert option in text


def test_calibrates_npy_batches_and_saves_table(project, capsys) -> None:
    assert main(_args(project, "--no-export", "--algorithm", "abs_max", "--max-batches", "2")) == 0
    out = capsys.readouterr().out
    table_path = project / "out" / "net.calibration.json"
    assert "calibrated on 2 batches from 3 npy files" in out and str(table_path) in out
    layers = json.loads(table_path.read_text())["layers"]
    assert {"conv", "fc"} <= set(layers)
    # abs_max over the first two batches, exactly.
    first = np.concatenate([np.load(project / "data" / f"batch{i}.npy") for i in range(2)])
    assert layers["conv"]["input"][0] == pytest.approx(np.abs(first).max(), rel=1e-6)
    assert not (project / "out" / "net.pdmodel").exists()


@pytest.mark.skipif(not hasattr(ImperativePTQ, "save_quantized_model"), reason="no export yet")
def test_exports_with_input_shape(project, capsys) -> None:
    argv = _args(project, "--algorithm", "hist", "--input-shape", "None,3,8,8", "--bits", "8")
    argv.remove("-q")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "calibration table (4 layers)" in out and "conv" in out
    assert "Paddle Inference runs" in out and "conv/fc ops int8" in out  # the runtime's own count
    config = json.loads((project / "out" / "net.calibration.json").read_text())["config"]
    assert config["target"] == "x86"
    for suffix in (".pdmodel", ".pdiparams", ".calibration.json"):
        assert (project / "out" / f"net{suffix}").exists()
        assert f"net{suffix}" in out


def test_weights_and_module_factory(project, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(project))
    paddle.seed(3)
    sys.modules.pop("net", None)
    import net  # noqa: the user's module, from project

    model = net.build()
    with paddle.no_grad():
        model.conv.weight.set_value(paddle.full_like(model.conv.weight, 0.25))
    paddle.save(model.state_dict(), str(project / "w.pdparams"))
    argv = _args(project, "--no-export", "--weights", str(project / "w.pdparams"))
    argv[1] = "net:build"
    assert main(argv) == 0
    layers = json.loads((project / "out" / "net.calibration.json").read_text())["layers"]
    assert layers["conv"]["weight"] == pytest.approx([0.25] * 4)

    paddle.save({"conv.weight": model.conv.weight}, str(project / "partial.pdparams"))
    argv[argv.index("--weights") + 1] = str(project / "partial.pdparams")
    assert main(argv) == 2
    assert "lacks" in capsys.readouterr().err


@pytest.mark.parametrize("model_spec, data, message", [
    ("missing.py:build", "data", "model file not found"),
    ("net.py", "data", "must be FILE.py:FACTORY"),
    ("net.py:nothing", "data", "has no attribute 'nothing'"),
    ("net.py:NOT_CALLABLE", "data", "is not callable"),
    ("net.py:broken", "data", "RuntimeError: no GPU here"),
    ("net.py:not_a_layer", "data", "returned int, not a paddle.nn.Layer"),
    ("no_such_module_xyz:build", "data", "cannot import module"),
    ("net.py:build", "empty", "no calibration data in"),
    ("net.py:build", "missing", "data directory not found"),
    ("net.py:build", "data/batch0.npy", "--data takes a directory of .npy files or images, not a file"),
])
def test_user_errors_are_one_line(project, capsys, model_spec, data, message) -> None:
    spec = model_spec if "/" in model_spec or model_spec.startswith("no_such") else str(
        project / model_spec)
    status = main(["--model", spec, "--data", str(project / data),
                   "--output", str(project / "out" / "x"), "-q"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("imperative-ptq: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_target_option_reaches_the_export(project, capsys) -> None:
    assert main(_args(project, "--target", "x86-vnni")) == 0
    config = json.loads((project / "out" / "net.calibration.json").read_text())["config"]
    assert config["target"] == "x86-vnni"
    with pytest.raises(SystemExit) as exit_info:
        main(_args(project, "--target", "x87"))
    assert exit_info.value.code == 2 and "x87" in capsys.readouterr().err


def test_bad_option_values_exit_2(project, capsys) -> None:
    for bad in (["--input-shape", "None,x,8"], ["--bits", "40"], ["--max-batches", "0"],
                ["--algorithm", "nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(_args(project, *bad))
        assert exit_info.value.code == 2
    assert build_parser().parse_args(_args(project, "--input-shape", "None,3,8,8")).input_shape \
        == [None, 3, 8, 8]


def test_image_folder_batches(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((3, 10, 12, 3)) * 255).astype(np.uint8)
    (tmp_path / "cls").mkdir()
    files = []
    for i, image in enumerate(pixels):
        files.append(str(tmp_path / "cls" / f"{i}.png"))
        Image.fromarray(image).save(files[-1])
    batches = list(image_batches(files, 2, (10, 12), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]))
    assert [b.shape for b in batches] == [(2, 3, 10, 12), (1, 3, 10, 12)]
    expected = (pixels.astype(np.float32) / 255 - 0.5) / 0.25  # same size: no resampling
    np.testing.assert_allclose(np.concatenate(batches), expected.transpose(0, 3, 1, 2), atol=1e-5)
    (gray,) = image_batches(files, 4, (5, 6), [0.0], [1.0], grayscale=True)
    assert gray.shape == (3, 1, 5, 6) and 0.0 <= gray.min() and gray.max() <= 1.0


def test_npy_single_samples_are_stacked(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))  # a batch sets the rank
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.full((3, 4), i, np.float64))
    files = [str(tmp_path / n) for n in ("a.npy", "s0.npy", "s1.npy", "s2.npy")]
    shapes = [(b.shape, b.dtype) for b in npy_batches(files, 2)]
    assert shapes == [((2, 3, 4), np.float32), ((2, 3, 4), np.float32), ((1, 3, 4), np.float32)]


def test_python_m_entry_point_reports_errors_without_traceback(tmp_path) -> None:
    env = checkout_env(PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "imperative_ptq", "--model", str(tmp_path / "nope.py:f"),
         "--data", str(tmp_path), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "imperative-ptq: error: model file not found" in result.stderr
    assert "Traceback" not in result.stderr
