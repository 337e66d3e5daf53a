"""All-or-nothing writing of a multi-file export.

Everything is written into a temporary directory next to the target (same file system, so the
final ``os.replace`` calls are atomic renames); the files are moved into place only once all of
them exist. A failure leaves no partial file behind and an older export untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Iterator, Sequence

__all__ = ["export_directory", "staged_export"]

logger = logging.getLogger(__name__)


def export_directory(path_prefix: str | os.PathLike) -> tuple[str, str]:
    """Splits ``path_prefix`` into (existing-or-created directory, file stem).

    Raises:
        TypeError: ``path_prefix`` is not a path.
        ValueError: ``path_prefix`` names a directory, not a file prefix.
        OSError: The directory cannot be created (same errno, message naming it).
    """
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path_prefix).__name__}")
    path_prefix = os.fspath(path_prefix)
    stem = os.path.basename(path_prefix)
    if not stem or os.path.isdir(path_prefix):
        raise ValueError(
            f"path must be a file prefix such as 'out/model' (files out/model.pdmodel, ...), "
            f"got the directory {path_prefix!r}"
        )
    directory = os.path.dirname(os.path.abspath(path_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise type(error)(
            error.errno, f"cannot create the export directory {directory!r}: {error.strerror}"
        ) from error
    return directory, stem


@contextlib.contextmanager
def staged_export(path_prefix: str, suffixes: Sequence[str]) -> Iterator[str]:
    """Yields a staging prefix; on success moves ``staging + suffix`` to ``path_prefix + suffix``.

    Args:
        path_prefix: Final prefix (its directory must exist, see :func:`export_directory`).
        suffixes: The files that make up the export, in the order they are moved (put the file a
            loader opens first last, so a reader never pairs a new one with an old partner).

    Raises:
        OSError: The directory is not writable (message naming it).
        FileNotFoundError: A promised file was not produced.
    """
    directory, stem = os.path.split(os.path.abspath(path_prefix))
    try:
        staging_dir = tempfile.mkdtemp(prefix=f".{stem}.export-", dir=directory)
    except OSError as error:
        raise type(error)(
            error.errno, f"cannot write the export to {directory!r}: {error.strerror}"
        ) from error
    try:
        staging = os.path.join(staging_dir, stem)
        yield staging
        missing = [suffix for suffix in suffixes if not os.path.isfile(staging + suffix)]
        if missing:
            raise FileNotFoundError(f"export did not produce {', '.join(missing)}")
        for suffix in suffixes:
            os.replace(staging + suffix, path_prefix + suffix)
        logger.info("wrote %s{%s}", path_prefix, ",".join(suffixes))
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
