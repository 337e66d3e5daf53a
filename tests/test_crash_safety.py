"""Writers killed with SIGKILL leave the previous complete file(s) or the new complete one(s),
never a mix, and no temporary file that piles up or trips the next write.

Real processes: ``crash_worker.py`` forks writers (exports, state files, tables) and the test
kills them, at each rename a write makes and at random moments.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from imperative_ptq.calibration_state import read_state
from imperative_ptq.export import recover_export
from imperative_ptq.export.paddle_export import EXPORT_SUFFIXES

sys.path.insert(0, os.path.dirname(__file__))
import crash_worker  # noqa: E402
from checkout import checkout_env  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

WORKER = pathlib.Path(__file__).with_name("crash_worker.py")


class _Worker:
    """The fork server (see crash_worker.py)."""

    def __init__(self) -> None:
        env = checkout_env()
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env,
        )
        assert self.ask("") == "ready"

    def ask(self, line: str) -> str:
        if line:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"crash worker died (exit {self.process.poll()})"
        return answer

    def once(self, kind: str, path: pathlib.Path, generation: int) -> float:
        answer = self.ask(f"once {kind} {path} {generation}")
        assert answer.startswith("done"), answer
        return float(answer.split()[1])

    def kill_randomly(self, kind: str, path: pathlib.Path, delay: float) -> None:
        """Starts a writer looping over both generations and SIGKILLs it after ``delay``."""
        pid = int(self.ask(f"loop {kind} {path}"))
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert self.ask(f"reap {pid}") == "killed"

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker():
    started = _Worker()
    yield started
    started.close()


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _program_channels(path: pathlib.Path) -> int:
    """The conv channels of an exported program (its int8 4-D weight's first dimension)."""
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    program.ParseFromString(path.read_bytes())
    (channels,) = {
        var.type.dense_tensor.tensor.dims[0]
        for var in program.blocks[0].vars
        if var.persistable and len(var.type.dense_tensor.tensor.dims) == 4
    }
    return channels


def _export_generations(prefix: pathlib.Path, digests: list[dict[str, str]]) -> dict[str, int]:
    """Which generation wrote each file of the export at ``prefix``: the program by its
    conv width (its variable names differ from one export to the next), the parameters and the
    table by their bytes (the same for every export of a generation)."""
    found = {".pdmodel": [g for g in (0, 1) if crash_worker.channels(g) == _program_channels(
        pathlib.Path(f"{prefix}.pdmodel"))][0]}
    for suffix in (".pdiparams", ".calibration.json"):
        digest = _digest(pathlib.Path(f"{prefix}{suffix}"))
        found[suffix] = next((g for g in (0, 1) if digests[g][suffix] == digest), -1)
    return found


def _whole(prefix: pathlib.Path, digests: list[dict[str, str]]) -> int:
    """The generation of the export at ``prefix``; fails on a mix."""
    generations = _export_generations(prefix, digests)
    assert len(set(generations.values())) == 1 and -1 not in generations.values(), (
        f"a mix of two exports: {generations}"
    )
    return generations[".pdmodel"]


def _entries(directory: pathlib.Path) -> set[str]:
    return set(os.listdir(directory))


def _state_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    _, states = read_state(path)
    return {f"{key}/{name}": value for key, stats in states.items() for name, value in stats.items()}


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def export_references(worker, tmp_path_factory):
    """Both generations exported whole, their digests and how long one export takes."""
    root = tmp_path_factory.mktemp("references")
    prefixes = [root / f"gen{g}" / "model" for g in (0, 1)]
    seconds = [worker.once("export", prefix, g) for g, prefix in enumerate(prefixes)]
    digests = [
        {suffix: _digest(pathlib.Path(f"{prefix}{suffix}")) for suffix in EXPORT_SUFFIXES}
        for prefix in prefixes
    ]
    for suffix in EXPORT_SUFFIXES:
        assert digests[0][suffix] != digests[1][suffix]
    assert [_program_channels(pathlib.Path(f"{p}.pdmodel")) for p in prefixes] == [8, 12]
    return prefixes, digests, max(seconds)


def _install(reference: pathlib.Path, prefix: pathlib.Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in EXPORT_SUFFIXES:
        shutil.copyfile(f"{reference}{suffix}", f"{prefix}{suffix}")


def _export_files() -> set[str]:
    return {"model" + suffix for suffix in EXPORT_SUFFIXES}


def test_export_killed_at_every_rename_leaves_one_whole_export(
    worker, export_references, tmp_path
) -> None:
    """Kill before each rename the export makes: before its journal exists the previous export
    stays; after, recovery completes the new one (whoever comes next: here recover_export)."""
    references, digests, _ = export_references
    outcomes = []
    for rename in range(20):
        prefix = tmp_path / f"at{rename}" / "model"
        _install(references[0], prefix)
        answer = worker.ask(f"killat export {prefix} 1 {rename}")
        if answer.startswith("done"):  # fewer renames than that: the export completed
            assert _whole(prefix, digests) == 1
            break
        assert answer == "killed"
        recover_export(prefix)
        outcomes.append(_whole(prefix, digests))
        assert _entries(prefix.parent) == _export_files(), f"stray files after rename {rename}"
    # The table written into the staging directory, the journal, then three moves: killed
    # before the journal's rename the old export stays, from there on the new one wins.
    assert outcomes == [0, 0, 1, 1, 1], outcomes


def test_export_killed_at_random_moments_leaves_one_whole_export(
    worker, export_references, tmp_path
) -> None:
    references, digests, seconds = export_references
    prefix = tmp_path / "model"
    _install(references[0], prefix)
    rng = random.Random(14)
    for _ in range(20):
        worker.kill_randomly("export", prefix, rng.uniform(0.0, 2.5 * seconds))
        recover_export(prefix)
        _whole(prefix, digests)
        assert _entries(prefix.parent) == _export_files()
    assert worker.once("export", prefix, 1) > 0
    assert _whole(prefix, digests) == 1 and _entries(prefix.parent) == _export_files()
    # And it runs: a program and parameters of one generation load together.
    from imperative_ptq.export import create_predictor, predict

    output = predict(create_predictor(str(prefix)), np.ones([1, 3, 8, 8], np.float32))[0]
    assert output.shape == (1, 10) and np.isfinite(output).all()


# ------------------------------------------------------------------------- state and table
@pytest.mark.parametrize("kind, name", [("state", "state.npz"), ("table", "table.json")])
def test_state_and_table_writers_killed_leave_one_whole_file(worker, tmp_path, kind, name) -> None:
    references = [tmp_path / f"gen{g}" / name for g in (0, 1)]
    seconds = max(worker.once(kind, path, g) for g, path in enumerate(references))
    if kind == "state":
        expected = [_state_arrays(path) for path in references]
        assert not _same_arrays(*expected)

        def generation(path: pathlib.Path) -> int:
            arrays = _state_arrays(path)
            return next(g for g in (0, 1) if _same_arrays(arrays, expected[g]))
    else:
        expected = [_digest(path) for path in references]
        assert expected[0] != expected[1]

        def generation(path: pathlib.Path) -> int:
            return expected.index(_digest(path))

    target = tmp_path / "out" / name
    target.parent.mkdir()
    shutil.copyfile(references[0], target)
    # Killed just before its rename: the temporary file is complete but not in place.
    assert worker.ask(f"killat {kind} {target} 1 0") == "killed"
    assert generation(target) == 0
    (stray,) = _entries(target.parent) - {name}
    assert stray.startswith(f".{name}.tmp-")
    rng = random.Random(14)
    for _ in range(15):
        worker.kill_randomly(kind, target, rng.uniform(0.0, 3 * seconds))
        generation(target)  # loads whole, as one of the two generations
        # At most the killed writer's temporary file: the next write removes it.
        assert len(_entries(target.parent) - {name}) <= 1
    worker.once(kind, target, 1)
    assert generation(target) == 1
    assert _entries(target.parent) == {name}


def test_recovery_leaves_a_live_writer_alone_and_ignores_a_foreign_journal(tmp_path) -> None:
    prefix = tmp_path / "model"
    staging = tmp_path / f".model.export-{os.getppid()}-abc"
    staging.mkdir()
    (staging / "model.pdmodel").write_text("new")
    journal = tmp_path / ".model.export-journal"
    journal.write_text(
        f'{{"pid": {os.getppid()}, "staging": "{staging.name}", "suffixes": [".pdmodel"]}}'
    )
    assert not recover_export(prefix)  # its writer (alive) is still committing
    assert journal.exists() and staging.exists() and not (tmp_path / "model.pdmodel").exists()
    # A journal naming a path outside the export is not followed, and removed.
    journal.write_text('{"pid": 1, "staging": "../elsewhere", "suffixes": [".pdmodel"]}')
    assert not recover_export(prefix)
    assert not journal.exists() and not (tmp_path / "model.pdmodel").exists()
