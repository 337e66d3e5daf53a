"""All-or-nothing writing of a multi-file export.

Everything is written into a staging directory next to the target (same file system, so the
final ``os.replace`` calls are atomic renames); the files are moved into place only once all of
them exist. A failure leaves no partial file behind and an older export untouched.

The moves themselves are several renames, and a process killed between two of them would
leave a mix of two exports. So before the first move a journal ``.STEM.export-journal`` naming
the staging directory is written (atomically), and removed after the last: whoever finds a
journal of a dead process (the next export to the path, :func:`recover_export`,
``create_predictor``) completes the moves, so the path ends with the new export, whole. A
process killed before the journal exists leaves the previous export untouched; its staging
directory (``.STEM.export-PID-...``) is removed by the next export to the path.

One writer per path at a time: two processes exporting to the same prefix at once are not
serialized (and a reader that opens the files while they are being moved may pair them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

from ..files import atomic_file, process_alive, remove_stale, temporary_prefix

__all__ = ["export_directory", "recover_export", "remove_created_directories", "staged_export"]

logger = logging.getLogger(__name__)

#: Directories :func:`export_directory` created for an export, deepest first, by the export's
#: directory: :func:`staged_export` removes them again when the export fails, so a refused
#: export ("Nothing was written") leaves no new empty directories either.
_created_for: dict[str, list[str]] = {}


def export_directory(path_prefix: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> tuple[str, str]:
    """Splits ``path_prefix`` into (existing-or-created directory, file stem).

    Args:
        path_prefix: The export's file prefix.
        suffixes: The suffixes the export appends to it (refused at its end).

    Raises:
        TypeError: ``path_prefix`` is not a path.
        ValueError: ``path_prefix`` names a directory, not a file prefix, or ends with one of
            ``suffixes`` (``out/m.pdmodel`` would write ``out/m.pdmodel.pdmodel``).
        OSError: The directory cannot be created (same errno, message naming it).
    """
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path_prefix).__name__}")
    path_prefix = os.fspath(path_prefix)
    stem = os.path.basename(path_prefix)
    ending = next((suffix for suffix in suffixes if stem.endswith(suffix) and stem != suffix), None)
    if ending is not None:
        raise ValueError(
            f"path is a file prefix, to which the export appends {', '.join(suffixes)}: "
            f"{path_prefix!r} would write {path_prefix + suffixes[-1]!r}; pass "
            f"{path_prefix[:-len(ending)]!r}"
        )
    if not stem or os.path.isdir(path_prefix):
        raise ValueError(
            f"path must be a file prefix such as 'out/model' (files out/model.pdmodel, ...), "
            f"got the directory {path_prefix!r}"
        )
    directory = os.path.dirname(os.path.abspath(path_prefix))
    missing, parent = [], directory
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise type(error)(
            error.errno, f"cannot create the export directory {directory!r}: {error.strerror}"
        ) from error
    if missing:
        _created_for[directory] = missing
    return directory, stem


@contextlib.contextmanager
def staged_export(
    path_prefix: str, suffixes: Sequence[str], stale: Sequence[str] = ()
) -> Iterator[str]:
    """Yields a staging prefix; on success moves ``staging + suffix`` to ``path_prefix + suffix``.

    Args:
        path_prefix: Final prefix (its directory must exist, see :func:`export_directory`).
        suffixes: The files that make up the export, in the order they are moved (put the file a
            loader opens first last, so a reader never pairs a new one with an old partner).
        stale: Files another kind of export writes beside these (an int8 export's
            ``.calibration.json``), removed before the new files are moved in, so they never
            describe the new program.

    Raises:
        OSError: The directory is not writable (message naming it).
        FileNotFoundError: A promised file was not produced.
    """
    directory, stem = os.path.split(os.path.abspath(path_prefix))
    created = _created_for.pop(directory, [])
    recover_export(path_prefix)
    try:
        staging_dir = tempfile.mkdtemp(
            prefix=temporary_prefix(f".{stem}.export-"), dir=directory
        )
    except OSError as error:
        _remove_empty(created)
        raise type(error)(
            error.errno, f"cannot write the export to {directory!r}: {error.strerror}"
        ) from error
    journal = _journal_path(directory, stem)
    journal_written = False
    written = False
    try:
        staging = os.path.join(staging_dir, stem)
        yield staging
        missing = [suffix for suffix in suffixes if not os.path.isfile(staging + suffix)]
        if missing:
            raise FileNotFoundError(f"export did not produce {', '.join(missing)}")
        with atomic_file(journal) as file:
            json.dump(
                {"pid": os.getpid(), "staging": os.path.basename(staging_dir),
                 "suffixes": list(suffixes)}, file,
            )
        journal_written = True
        for suffix in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path_prefix + suffix)
        _move_staged(staging_dir, path_prefix, suffixes)
        os.unlink(journal)
        journal_written = False
        logger.info("wrote %s{%s}", path_prefix, ",".join(suffixes))
        written = True
    finally:
        if not journal_written:  # else the journal needs the staged files: see recover_export
            shutil.rmtree(staging_dir, ignore_errors=True)
            if not written:
                _remove_empty(created)


def remove_created_directories(path_prefix: str | os.PathLike) -> None:
    """Removes the directories :func:`export_directory` created for ``path_prefix`` while
    they are empty: for a caller refusing the export before :func:`staged_export` runs."""
    _remove_empty(_created_for.pop(os.path.dirname(os.path.abspath(os.fspath(path_prefix))), []))


def _remove_empty(directories: Sequence[str]) -> None:
    """Removes ``directories`` (deepest first) while they are empty."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return


def recover_export(path_prefix: str | os.PathLike) -> bool:
    """Completes an export to ``path_prefix`` whose process died while moving its files into
    place, and removes the staging directories of killed exports.

    Called by every export to the path and by ``create_predictor``; harmless when there is
    nothing to do. An export still being committed by a live process is left alone.

    Returns:
        Whether an interrupted export was completed.

    Raises:
        OSError: A staged file cannot be moved (the journal is kept for the next attempt).
    """
    directory, stem = os.path.split(os.path.abspath(os.fspath(path_prefix)))
    path_prefix = os.path.join(directory, stem)
    journal = _journal_path(directory, stem)
    record = _read_journal(journal, stem)
    keep, completed = None, False
    if record is not None:
        if record["pid"] != os.getpid() and process_alive(record["pid"]):
            keep = record["staging"]  # a live writer is committing right now
        else:
            staging_dir = os.path.join(directory, record["staging"])
            _move_staged(staging_dir, path_prefix, record["suffixes"])
            os.unlink(journal)
            shutil.rmtree(staging_dir, ignore_errors=True)
            completed = True
            logger.warning(
                "completed the export to %s that process %d left half-moved",
                path_prefix, record["pid"],
            )
    remove_stale(directory, f".{stem}.export-", keep=keep)
    remove_stale(directory, f".{os.path.basename(journal)}.tmp-")  # see files.atomic_file
    return completed


def _journal_path(directory: str, stem: str) -> str:
    return os.path.join(directory, f".{stem}.export-journal")


def _move_staged(staging_dir: str, path_prefix: str, suffixes: Sequence[str]) -> None:
    """Moves each staged file still in ``staging_dir`` to ``path_prefix + suffix``, in order
    (one already moved by an interrupted attempt is skipped)."""
    stem = os.path.basename(path_prefix)
    for suffix in suffixes:
        source = os.path.join(staging_dir, stem + suffix)
        if os.path.isfile(source):
            os.replace(source, path_prefix + suffix)


def _read_journal(journal: str, stem: str) -> dict[str, Any] | None:
    """The journal's record, or ``None`` when there is none. A journal that is not one this
    module wrote (it is written atomically, so never half) is ignored and removed."""
    try:
        with open(journal) as file:
            record = json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        record = error
    valid = (
        isinstance(record, dict)
        and isinstance(record.get("pid"), int)
        and isinstance(record.get("staging"), str)
        and record["staging"].startswith(f".{stem}.export-")
        and os.sep not in record["staging"]
        and isinstance(record.get("suffixes"), list)
        and all(isinstance(s, str) and s.startswith(".") and os.sep not in s
                for s in record["suffixes"])
    )
    if not valid:
        logger.warning("ignoring %s: not an export journal (%s)", journal, record)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)
        return None
    return record
