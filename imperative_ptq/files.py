"""Atomic single-file writes: a reader sees the old file or the complete new one, never half.

A temporary file is written next to the target and renamed over it. Its name carries the
writer's process id (``.NAME.tmp-PID-RANDOM``), so one left behind by a process that was killed
(SIGKILL, power off) is recognised and removed by the next write to the same path instead of
piling up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_file", "process_alive", "remove_stale", "temporary_prefix"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file next to ``path``; renames it over ``path`` when the block succeeds.

    The directory is created if missing. On any exception the temporary file is removed and an
    existing ``path`` is left untouched. Temporary files of killed writers of ``path`` are
    removed first.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    remove_stale(directory, f".{name}.tmp-")
    handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(f".{name}.tmp-"), dir=directory)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates files 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def temporary_prefix(stem: str) -> str:
    """``stem`` followed by this process's id and a dash: the prefix of a temporary name that
    :func:`remove_stale` can attribute to its writer."""
    return f"{stem}{os.getpid()}-"


def remove_stale(directory: str, stem: str, keep: str | None = None) -> list[str]:
    """Removes the entries ``stem + PID + '-...'`` of ``directory`` whose process is gone.

    Args:
        directory: Where to look.
        stem: The part before the process id (as given to :func:`temporary_prefix`).
        keep: An entry name never to remove.

    Returns:
        The names removed.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(stem) or name == keep:
            continue
        pid, dash, _ = name[len(stem):].partition("-")
        if not (dash and pid.isdigit()) or process_alive(int(pid)):
            continue
        target = os.path.join(directory, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        removed.append(name)
    if removed:
        logger.info("removed %d temporary file(s) left by killed writers in %s: %s",
                    len(removed), directory, ", ".join(removed))
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists and can still run (this one included)."""
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) is POSIX only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell: keep its files
    try:  # Linux: a zombie (killed, not yet reaped by its parent) writes nothing any more
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Elsewhere: os.umask can only be read by setting it, briefly, from this thread.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
