"""Command line: calibrate a model from the user's Python file and export it.

    imperative-ptq --model net.py:build --weights net.pdparams --data calib/ \\
        --input-shape None,3,224,224 --output out/net

``python -m imperative_ptq`` is the same. Errors the user can fix (a missing file, a bad factory,
an empty data directory) end with a one-line message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import paddle

from .collector import CalibrationError
from .config import PTQConfig
from .ptq import ImperativePTQ
from .quantizers import ACTIVATION_QUANTIZERS, WEIGHT_QUANTIZERS
from .targets import DEFAULT_TARGET, NATIVE_TARGET, TARGETS

__all__ = ["CliError", "build_parser", "load_factory", "main", "npy_batches", "image_batches"]

logger = logging.getLogger(__name__)

PROG = "imperative-ptq"
ACTIVATION_ALGORITHMS = ACTIVATION_QUANTIZERS
WEIGHT_SCHEMES = WEIGHT_QUANTIZERS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class CliError(Exception):
    """An error the user can fix; reported as one line, without a traceback."""


# ----------------------------------------------------------------------------- arguments
def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _shape(text: str) -> list[int | None]:
    parts = [part.strip() for part in text.split(",")]
    try:
        shape = [None if part.lower() in ("none", "-1", "?") else int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a shape like None,3,224,224, got {text!r}"
        ) from None
    if any(dim is not None and dim < 1 for dim in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be positive or None, got {text!r}")
    return shape


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHT,WIDTH, got {text!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHT,WIDTH, got {text!r}")
    return (sizes[0], sizes[-1])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its ``--help`` documents every option)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Post-training quantization of a PaddlePaddle dygraph model: calibrate on a "
            "directory of data, save the calibration table and export an int8 program."
        ),
        epilog=(
            "Example: imperative-ptq --model net.py:build --weights net.pdparams --data calib/ "
            "--input-shape None,3,224,224 --output out/net   writes out/net.calibration.json, "
            "out/net.pdmodel and out/net.pdiparams."
        ),
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", required=True, metavar="FILE.py:FACTORY|MODULE:FACTORY",
        help="a callable returning the fp32 paddle.nn.Layer, called without arguments: a "
             "Python file and a name in it (models/net.py:build), or a module importable "
             "from the current directory or the installed packages (mypkg.models:resnet18)",
    )
    model.add_argument(
        "--weights", metavar="PDPARAMS",
        help="state dict to load into the model (paddle.save(model.state_dict(), ...))",
    )
    data = parser.add_argument_group("calibration data")
    data.add_argument(
        "--data", required=True, metavar="DIR",
        help="directory of .npy files or of images (searched recursively: class "
             "sub-folders are fine). A .npy file is one batch [N, ...] or one sample, stacked "
             "--batch-size at a time: files of the batch rank are batches, files of one rank "
             "lower samples. The batch rank is the rank of --input-shape when given; else, "
             "when all files share one rank that is one lower than the input of the model's "
             "first layer (a convolution: [C, H, W] files for a Conv2D), they are samples; "
             "else the highest rank among the files (files of one rank are batches: give "
             "--input-shape to have single samples stacked for other models). Data keep "
             "their kind: 32/64-bit integers (token ids) are fed as int64, floats, bools and "
             "8/16-bit integers (pixels) as float32",
    )
    data.add_argument("--batch-size", type=_positive_int, default=32,
                      help="images (or single-sample .npy files) per batch (default: 32)")
    data.add_argument("--max-batches", type=_positive_int, metavar="N",
                      help="calibrate on at most N batches (default: all)")
    data.add_argument("--image-size", type=_image_size, default=(224, 224), metavar="H[,W]",
                      help="resize images to this size (default: 224)")
    data.add_argument("--mean", type=_floats, default=None, metavar="M,M,M",
                      help="per-channel mean subtracted from images scaled to [0, 1] "
                           "(default: ImageNet 0.485,0.456,0.406; with --grayscale their "
                           "average, 0.449)")
    data.add_argument("--std", type=_floats, default=None, metavar="S,S,S",
                      help="per-channel std images are divided by (default: ImageNet "
                           "0.229,0.224,0.225; with --grayscale their average, 0.226)")
    data.add_argument("--grayscale", action="store_true",
                      help="load images as one channel (default: RGB)")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--algorithm", choices=sorted(ACTIVATION_ALGORITHMS), default="kl",
                       help="activation calibration algorithm (default: kl)")
    quant.add_argument("--weights-scheme", choices=sorted(WEIGHT_SCHEMES), default="per_channel",
                       help="weight quantization (default: per_channel)")
    quant.add_argument("--bits", type=int, choices=range(2, 17), default=8, metavar="BITS",
                       help="bit width of activations and weights, 2..16 (default: 8)")
    quant.add_argument("--target", choices=sorted(TARGETS) + [NATIVE_TARGET], default=DEFAULT_TARGET,
                       help="deployment whose int8 arithmetic is simulated and exported: x86 "
                            "(any x86 CPU with AVX2; layers reading a signed input stay fp32), "
                            "x86-vnni (VNNI/AMX CPUs only), x86-avx2 (CPUs whose int8 kernels "
                            "are AVX2 only: convs on signed inputs int8 too), arm (Paddle Lite), "
                            "native (x86-vnni if this CPU has VNNI/AMX, x86-avx2 if AVX2 only, "
                            "else x86) (default: x86)")
    output = parser.add_argument_group("output")
    output.add_argument("--output", required=True, metavar="PREFIX",
                        help="path prefix of the written files: PREFIX.calibration.json, and "
                             "with export PREFIX.pdmodel / PREFIX.pdiparams")
    output.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                        help="input spec of the exported program, e.g. None,3,224,224 (default: "
                             "the first batch's shape with a variable batch dimension); its "
                             "dtype is the data's (int64 for token ids, else float32)")
    output.add_argument("--no-export", action="store_true",
                        help="only calibrate and save the calibration table")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, no per-layer table")
    output.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logging")
    return parser


# ------------------------------------------------------------------------------- loading
def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``FILE.py:NAME`` or ``MODULE:NAME``.

    A ``MODULE`` is imported with the current directory on ``sys.path`` (it is added first
    if missing), as ``python -m imperative_ptq`` has it, so the console script finds it too.

    Raises:
        CliError: The file or module cannot be loaded, or has no callable ``NAME``.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CliError(f"--model must be FILE.py:FACTORY or MODULE:FACTORY, got {spec!r}")
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise CliError(f"model file not found: {target}")
        module_name = "_imperative_ptq_user_" + os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(module_name, target)
        if module_spec is None or module_spec.loader is None:
            raise CliError(f"cannot load {target} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        # Registered like an import, so pickling/deep-copying the user's classes finds them.
        sys.modules[module_name] = module
        # The user's file may import its siblings.
        folder = os.path.dirname(os.path.abspath(target))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's code: any failure is theirs to see
            raise CliError(f"error while running {target}: {type(error).__name__}: {error}")
    else:
        _add_cwd_to_path()
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise CliError(f"cannot import module {target!r}: {error}")
    factory = getattr(module, name, None)
    if factory is None:
        raise CliError(f"{target} has no attribute {name!r}")
    if not callable(factory):
        raise CliError(f"{target}:{name} is not callable")
    return factory


def _add_cwd_to_path() -> None:
    """Puts the current directory first on ``sys.path`` unless it is there already.

    ``python -m imperative_ptq`` starts with the current directory on ``sys.path``, the
    ``imperative-ptq`` console script with its own folder instead: with this, both import
    ``MODULE:FACTORY`` (and what the user's module imports later) from the current directory.
    """
    cwd = os.getcwd()
    for entry in sys.path:
        if isinstance(entry, str) and os.path.abspath(entry or os.curdir) == cwd:
            return
    sys.path.insert(0, cwd)
    logger.debug("added the current directory %s to sys.path", cwd)


def build_model(spec: str, weights: str | None) -> paddle.nn.Layer:
    """Calls the factory and loads ``weights``.

    Raises:
        CliError: The factory fails or returns no Layer, or the weights do not load.
    """
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as error:
        raise CliError(f"{spec}() failed: {type(error).__name__}: {error}")
    if not isinstance(model, paddle.nn.Layer):
        raise CliError(f"{spec}() returned {type(model).__name__}, not a paddle.nn.Layer")
    if weights is not None:
        if not os.path.isfile(weights):
            raise CliError(f"weights file not found: {weights}")
        try:
            state = paddle.load(weights)
        except Exception as error:
            raise CliError(f"cannot load weights {weights}: {type(error).__name__}: {error}")
        if not isinstance(state, dict):
            raise CliError(f"{weights} does not hold a state dict")
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise CliError(
                f"{weights} lacks {len(missing)} of the model's parameters, e.g. {missing[0]!r}"
            )
        model.set_state_dict(state)
    model.eval()
    return model


def npy_batches(
    files: Sequence[str], batch_size: int, batch_rank: int | None = None
) -> Iterator[np.ndarray]:
    """Batches from ``.npy`` files: each file is one batch or one sample; samples are
    stacked ``batch_size`` at a time (in file order, the last batch may be smaller).

    A file whose rank is the batch rank is a batch, a file of one rank lower a sample. The
    batch rank is ``batch_rank`` when given (the rank of ``--input-shape``, or of the model's
    first layer, see :func:`model_input_rank`); otherwise the highest rank among the files, so
    files that all share one rank are batches. Every file's header is read before the first
    batch is returned, so a bad file is reported before calibration starts.

    Args:
        files: Paths of ``.npy`` files.
        batch_size: Samples per stacked batch.
        batch_rank: The rank of a batch, when known.

    Data keep their kind: 32- and 64-bit integers (token ids) are fed as int64; floats,
    bools and 8/16-bit integers (pixels) as float32.

    Returns:
        An iterator over float32 or int64 batches.

    Raises:
        CliError: A file cannot be read, holds no numbers, has a rank that is neither the
            batch rank nor one lower, single-sample files differ in shape, or the files mix
            float32 and int64 data.
    """
    headers = [_npy_header(path) for path in files]
    ranks = {len(shape) for shape, _ in headers}
    source = "the batch rank"
    if batch_rank is None:
        batch_rank = max(ranks, default=0)
        source = "the highest rank among the files"
    for path, (shape, _) in zip(files, headers):
        if len(shape) not in (batch_rank, batch_rank - 1):
            raise CliError(
                f"{path} has shape {list(shape)}: with batches of rank {batch_rank} ({source}), "
                f"a file must be a batch of rank {batch_rank} or one sample of rank "
                f"{batch_rank - 1}; --input-shape sets the batch rank"
            )
    first_of_dtype: dict[np.dtype, str] = {}
    for path, (_, stored) in zip(files, headers):
        first_of_dtype.setdefault(_npy_dtype(stored), path)
    if len(first_of_dtype) > 1:
        found = ", ".join(f"{path} ({dtype})" for dtype, path in first_of_dtype.items())
        raise CliError(
            f"the .npy files mix float32 and int64 data, e.g. {found}: a model input takes "
            f"one dtype"
        )
    sample_shapes = {shape for shape, _ in headers if len(shape) == batch_rank - 1}
    if len(sample_shapes) > 1:
        first, second = sorted(sample_shapes)[:2]
        raise CliError(
            f"single-sample .npy files must share one shape to be stacked into batches, found "
            f"{list(first)} and {list(second)}; save them as batches [1, ...] instead"
        )
    return _read_npy_batches(files, batch_size, batch_rank)


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file, without reading its data."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read {path}: {error}")
    if not isinstance(array, np.ndarray):  # an .npz archive renamed .npy
        raise CliError(f"cannot read {path}: not a .npy array file")
    if array.dtype.kind not in "fiub":
        raise CliError(f"{path} holds {array.dtype} data, not numbers")
    return tuple(array.shape), array.dtype


def _npy_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a model is fed data stored as ``dtype``: 32- and 64-bit integers (token ids
    for an ``nn.Embedding``) as int64; floats, bools and 8/16-bit integers (pixels) as
    float32."""
    if dtype.kind in "iu" and dtype.itemsize >= 4:
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def _npy_array(path: str, array: np.ndarray) -> np.ndarray:
    """``array`` converted to :func:`_npy_dtype`."""
    dtype = _npy_dtype(array.dtype)
    if dtype.kind == "i" and array.dtype == np.uint64 and array.size and (
        array.max() > np.iinfo(np.int64).max
    ):
        raise CliError(f"{path} holds uint64 values beyond the int64 range of token ids")
    return array.astype(dtype, copy=False)


def _read_npy_batches(
    files: Sequence[str], batch_size: int, batch_rank: int
) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    for path in files:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CliError(f"cannot read {path}: {error}")
        array = _npy_array(path, array)
        if array.ndim == batch_rank:
            yield array
        else:
            pending.append(array)
            if len(pending) == batch_size:
                yield np.stack(pending)
                pending = []
    if pending:
        yield np.stack(pending)


#: Input rank of a model whose first layer with parameters is one of these.
_CONV_INPUT_RANKS: dict[type, int] = {
    paddle.nn.Conv1D: 3, paddle.nn.Conv2D: 4, paddle.nn.Conv3D: 5,
    paddle.nn.Conv1DTranspose: 3, paddle.nn.Conv2DTranspose: 4, paddle.nn.Conv3DTranspose: 5,
}


def model_input_rank(model: paddle.nn.Layer) -> int | None:
    """The rank of the model's input when its first leaf layer with parameters (in
    definition order) is a convolution: 4 for a ``Conv2D``; ``None`` otherwise (a ``Linear``
    or ``Embedding`` takes inputs of any rank)."""
    for _, layer in model.named_sublayers(include_self=True):
        if layer.sublayers() or not layer.parameters(include_sublayers=False):
            continue
        return _CONV_INPUT_RANKS.get(type(layer))
    return None


def image_batches(
    files: Sequence[str],
    batch_size: int,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    grayscale: bool = False,
) -> Iterator[np.ndarray]:
    """NCHW float32 batches of images resized to ``size`` and normalized per channel."""
    from PIL import Image

    channels = 1 if grayscale else 3
    mean_arr = _per_channel(mean, channels, "--mean")
    std_arr = _per_channel(std, channels, "--std")
    if np.any(std_arr == 0):
        raise CliError("--std must not contain 0")
    height, width = size
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    image = image.convert("L" if grayscale else "RGB")
                    image = image.resize((width, height), Image.BILINEAR)
                    images.append(np.asarray(image, dtype=np.float32))
            except OSError as error:
                raise CliError(f"cannot read image {path}: {error}")
        batch = np.stack(images) / 255.0  # [N, H, W] or [N, H, W, C]
        if grayscale:
            batch = batch[..., None]
        batch = (batch - mean_arr) / std_arr
        yield np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


#: ImageNet's per-channel mean and std, the defaults of ``--mean`` / ``--std``.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resolve_normalization(args: argparse.Namespace) -> None:
    """Fills ``--mean`` / ``--std`` left unset (ImageNet's, averaged for ``--grayscale``)
    and checks their counts against the channels, before anything runs.

    Raises:
        CliError: A count fits neither 1 nor the number of channels.
    """
    channels = 1 if args.grayscale else 3
    for option, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        if getattr(args, option) is None:
            setattr(args, option, [float(np.mean(default))] if channels == 1 else list(default))
        _per_channel(getattr(args, option), channels, f"--{option}")


def _per_channel(values: Sequence[float], channels: int, option: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.size == 1:
        array = np.repeat(array, channels)
    if array.size != channels:
        raise CliError(f"{option} needs 1 or {channels} values, got {array.size}")
    return array


def calibration_data(
    args: argparse.Namespace, model: paddle.nn.Layer | None = None
) -> tuple[str, int, Iterator[np.ndarray]]:
    """``(kind, number of files, batches)`` for ``--data``.

    Args:
        args: The parsed command line.
        model: The model, whose first layer may tell the rank of a batch of ``.npy`` files
            when ``--input-shape`` does not (see :func:`npy_batch_rank`).

    Raises:
        CliError: The directory is missing or holds neither ``.npy`` files nor images, or
            a ``.npy`` file is bad (see :func:`npy_batches`).
    """
    directory = args.data
    if os.path.isfile(directory):
        raise CliError(
            f"--data takes a directory of .npy files or images, not a file: {directory} "
            f"(put it in a directory of its own and pass that)"
        )
    if not os.path.isdir(directory):
        raise CliError(f"data directory not found: {directory}")
    npy, images = [], []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            lower = name.lower()
            if lower.endswith(".npy"):
                npy.append(os.path.join(root, name))
            elif lower.endswith(IMAGE_SUFFIXES):
                images.append(os.path.join(root, name))
    if npy and images:
        logger.warning("%s holds .npy files and images; using the .npy files", directory)
    if npy:
        batch_rank = npy_batch_rank(npy, args.input_shape, model)
        return "npy", len(npy), npy_batches(npy, args.batch_size, batch_rank)
    if images:
        return "image", len(images), image_batches(
            images, args.batch_size, args.image_size, args.mean, args.std, args.grayscale
        )
    raise CliError(
        f"no calibration data in {directory}: expected .npy files or images "
        f"({', '.join(IMAGE_SUFFIXES)})"
    )


def npy_batch_rank(
    files: Sequence[str], input_shape: Sequence[int | None] | None, model: paddle.nn.Layer | None
) -> int | None:
    """The rank of a batch of ``.npy`` files, when known (``None``: :func:`npy_batches`
    takes the highest rank among the files).

    The rank of ``input_shape`` when given. Otherwise, when every file has one rank that is
    one lower than :func:`model_input_rank` (``[3, H, W]`` files for a ``Conv2D`` model), the
    files are single samples: the model's rank. Otherwise ``None``.
    """
    if input_shape is not None:
        return len(input_shape)
    rank = None if model is None else model_input_rank(model)
    if rank is None:
        return None
    ranks = {len(_npy_header(path)[0]) for path in files}
    if ranks == {rank - 1}:
        logger.info("every .npy file has rank %d, one lower than the model's input: samples",
                    rank - 1)
        return rank
    return None


# ---------------------------------------------------------------------------------- main
class _Peek:
    """Iterates the batches while remembering the first one (for the default input shape)."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self.batches = batches
        self.first: np.ndarray | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.batches:
            if self.first is None:
                self.first = batch
            yield batch


def _summary(table: dict[str, dict[str, list[float]]]) -> list[str]:
    width = max([len("layer")] + [len(name) for name in table])
    lines = [f"  {'layer':<{width}}  {'input':>10}  {'output':>10}  weight (min..max, channels)"]
    for name, roles in table.items():
        weight = roles.get("weight")
        weight_text = (
            f"{min(weight):.4g}..{max(weight):.4g} ({len(weight)})" if weight else "-"
        )
        input_text = f"{roles['input'][0]:.4g}" if roles.get("input") else "-"
        output_text = f"{roles['output'][0]:.4g}" if roles.get("output") else "-"
        lines.append(f"  {name:<{width}}  {input_text:>10}  {output_text:>10}  {weight_text}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Runs the command for parsed arguments; raises :class:`CliError` on user errors."""
    model = build_model(args.model, args.weights)
    kind, count, batches = calibration_data(args, model)
    config = PTQConfig(
        ACTIVATION_ALGORITHMS[args.algorithm](quant_bits=args.bits),
        WEIGHT_SCHEMES[args.weights_scheme](quant_bits=args.bits),
        target=args.target,
    )
    ptq = ImperativePTQ(config)
    try:
        qmodel = ptq.quantize(model)
    except ValueError as error:
        raise CliError(str(error))
    peek = _Peek(batches)
    print(f"{PROG}: {type(model).__name__} with {config}")
    try:
        used = ptq.calibrate(qmodel, peek, max_batches=args.max_batches, progress=not args.quiet)
    except (CliError, CalibrationError, KeyboardInterrupt):
        raise
    except Exception as error:  # the user's model on the user's data: theirs to see, briefly
        first = peek.first
        data = "" if first is None else f" (batch of {first.dtype}, shape {list(first.shape)})"
        detail = (str(error) or "").strip().splitlines()
        raise CliError(
            f"the model failed on the calibration data{data}: {type(error).__name__}: "
            f"{detail[0] if detail else ''} (--debug shows the traceback)"
        ) from error
    print(f"calibrated on {used} batches from {count} {kind} files in {args.data}")

    prefix = args.output
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    table_path = prefix + ".calibration.json"
    if args.no_export:
        table = ptq.save_calibration_table(qmodel, table_path)
    else:  # the export writes the same table next to the program
        table = ptq.calibration_table(qmodel)
    if not args.quiet:
        print(f"calibration table ({len(table)} layers):")
        print("\n".join(_summary(table)))
    written = [table_path]

    if not args.no_export:
        shape = args.input_shape
        if shape is None:
            shape = [None, *peek.first.shape[1:]]  # type: ignore[union-attr]
        dtype = "float32" if peek.first is None else str(peek.first.dtype)  # the data's
        input_spec = [paddle.static.InputSpec(shape, dtype, "x")]
        ptq.save_quantized_model(qmodel, prefix, input_spec=input_spec)
        written = sorted([table_path, prefix + ".pdiparams", prefix + ".pdmodel"])
        if TARGETS[config.target].onednn:  # what Paddle Inference's int8 passes made of it
            from .export import int8_report

            print(int8_report(prefix).summary())
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``imperative-ptq`` and ``python -m imperative_ptq``; returns the exit
    status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        resolve_normalization(args)
        return run(args)
    except (CliError, CalibrationError, OSError, ValueError, TypeError) as error:
        if args.debug:
            raise
        message = str(error) or type(error).__name__
        print(f"{PROG}: error: {message.splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
