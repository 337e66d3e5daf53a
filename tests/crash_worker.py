"""A fork server for the crash-safety tests: imports Paddle and calibrates two "generations" of
a model once, then forks a writer per request, so a writer can be killed within milliseconds of
its start (a fresh interpreter would spend most of its life importing Paddle).

Protocol (one line per request on stdin, one line per answer on stdout):

* ``once KIND PATH GEN``: fork a child that writes generation GEN once and exits; answers
  ``done SECONDS`` when it has.
* ``loop KIND PATH``: fork a child that writes generations 0, 1, 0, 1, ... until killed;
  answers its pid at once.
* ``killat KIND PATH GEN N``: like ``once``, but the child SIGKILLs itself just before its N-th
  ``os.replace`` (counting from 0), the points where a write changes what is on disk;
  answers ``killed`` or, if it made fewer renames, ``done SECONDS``.
* ``reap PID``: wait for a ``loop`` child (killed by the test); answers ``killed`` or
  ``exited``.
* ``quit``.

KIND is ``export`` (``save_quantized_model``), ``state`` (``save_state``) or ``table``
(``save_calibration_table``).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def channels(generation: int) -> int:
    """The conv channels of a generation's model."""
    return 8 + 4 * generation


def _generations():
    import paddle

    import imperative_ptq as ip

    class Net(paddle.nn.Layer):
        """Generation g has 8 + 4 g conv channels: the program file tells which it is."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, channels, 3, padding=1)
            self.relu = paddle.nn.ReLU()
            self.fc = paddle.nn.Linear(channels * 8 * 8, 10)

        def forward(self, x):
            return self.fc(paddle.flatten(self.relu(self.conv(x)), 1))

    # Synchronous collectors: no worker thread alive across the fork.
    ptq = ip.ImperativePTQ(ip.PTQConfig(ip.KLQuantizer(), ip.PerChannelAbsmaxQuantizer()),
                           asynchronous=False)
    calibrating, converted = [], []
    for generation in range(2):
        for target in (calibrating, converted):
            paddle.seed(generation)
            model = ptq.quantize(Net(channels(generation)))
            model(paddle.rand([4, 3, 8, 8]) * (generation + 1))
            ptq.remove_hooks(model)
            target.append(model)
    for model in converted:
        ptq.convert(model)
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]

    def write(kind: str, path: str, generation: int) -> None:
        if kind == "export":
            ptq.save_quantized_model(converted[generation], path, spec)
        elif kind == "state":
            ptq.save_state(calibrating[generation], path)
        elif kind == "table":
            ptq.save_calibration_table(calibrating[generation], path)
        else:
            raise ValueError(f"unknown kind {kind!r}")

    return write


def _kill_before_rename(count: int) -> None:
    """Makes this process SIGKILL itself just before its ``count``-th ``os.replace``."""
    original = os.replace
    calls = [0]

    def replace(*args, **kwargs):
        if calls[0] == count:
            print(f"killed before renaming {args[0]} -> {args[1]}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return original(*args, **kwargs)

    os.replace = replace


def main() -> None:
    import logging

    logging.disable(logging.WARNING)  # the int8 report's advice is not what is tested here
    write = _generations()
    print("ready", flush=True)
    looping: list[int] = []
    try:
        _serve(write, looping)
    finally:
        for pid in looping:  # never leave a writer running
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _serve(write, looping: list[int]) -> None:
    for line in sys.stdin:
        request = line.split()
        if not request or request[0] == "quit":
            break
        if request[0] == "reap":
            looping.remove(int(request[1]))
            status = os.waitpid(int(request[1]), 0)[1]
            print("killed" if os.WIFSIGNALED(status) else "exited", flush=True)
            continue
        command, kind, path = request[:3]
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                if command == "killat":
                    _kill_before_rename(int(request[4]))
                if command in ("once", "killat"):
                    write(kind, path, int(request[3]))
                else:
                    generation = 0
                    while True:
                        write(kind, path, generation)
                        generation = 1 - generation
            except BaseException:  # noqa: BLE001 - reported on stderr, the exit status says it
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                os._exit(status)
        if command in ("once", "killat"):
            status = os.waitpid(pid, 0)[1]
            if os.WIFSIGNALED(status):
                print("killed", flush=True)
            elif os.WEXITSTATUS(status):
                print("failed", flush=True)
            else:
                print(f"done {time.perf_counter() - start:.4f}", flush=True)
        else:
            looping.append(pid)
            print(pid, flush=True)


if __name__ == "__main__":
    main()
