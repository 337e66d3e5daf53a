"""The calibration data path: from a forward hook to quantizer statistics, off the forward thread.

Paddle sets ``OMP_NUM_THREADS=1`` at import, so during calibration one core runs the forward and
the other idles. Paddle kernels release the GIL, so the reductions (abs-max, ``paddle.histogram``)
run on a worker thread while the forward goes on. On the forward thread a hook only copies
``|x|`` into a pooled buffer (a later in-place op must not change the statistics, and a fresh
tensor costs page faults every batch) and queues the job. Per-quantizer order is preserved (one
worker, FIFO), the queue is bounded (memory stays flat however fast the forward is), and an error
on the worker is re-raised on the next call from the forward thread.

A tensor that is one hooked layer's output and the next one's input is copied once: the hook
keeps the last few samples keyed by tensor identity (holding the tensor, so the identity cannot
be reused while cached), and both quantizers receive the same :class:`TensorSample`, which
computes each reduction once.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import weakref
from typing import Sequence

import paddle

from .quantizers import BaseQuantizer, TensorSample

__all__ = ["CalibrationCollector", "CalibrationError"]

logger = logging.getLogger(__name__)

_DEDUP_WINDOW = 8


class CalibrationError(RuntimeError):
    """Calibration cannot proceed (no data seen, a failure on the worker thread, ...)."""


class _BufferPool:
    """Reusable float32 buffers keyed by shape."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, ...], list[paddle.Tensor]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def acquire(self, shape: tuple[int, ...]) -> paddle.Tensor:
        with self._lock:
            free = self._free.get(shape)
            if free:
                return free.pop()
        return paddle.empty(list(shape), dtype="float32")

    def release(self, buffer: paddle.Tensor) -> None:
        with self._lock:
            self._free[tuple(buffer.shape)].append(buffer)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class _PooledSample(TensorSample):
    """A sample whose buffer returns to the pool once no holder (cache or job) needs it."""

    __slots__ = ("_holders", "_lock")

    def __init__(self, abs_values: paddle.Tensor, pool: _BufferPool) -> None:
        super().__init__(abs_values, pool.release)
        self._holders = 1  # the dedup cache
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def drop(self) -> None:
        with self._lock:
            self._holders -= 1
            done = self._holders == 0
        if done:
            self.release()


class CalibrationCollector:
    """Turns hooked tensors into samples and feeds them to quantizers.

    Args:
        asynchronous: Reduce on a worker thread (default). ``False`` reduces inline, which is
            slower but keeps everything on the calling thread.
        max_pending: Jobs that may wait for the worker before the forward blocks.
    """

    def __init__(self, asynchronous: bool = True, max_pending: int = 64) -> None:
        self.asynchronous = asynchronous
        self._pool = _BufferPool()
        # (id, inplace version) -> (tensor, its sample)
        self._recent: collections.OrderedDict[
            tuple[int, int], tuple[paddle.Tensor, _PooledSample]
        ] = collections.OrderedDict()
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_context = ""
        # The worker holds the collector only weakly, so a quantized model dropped without
        # convert() does not leak the thread and its pooled buffers: once the collector is
        # collected, this wakes the worker, which then finds it gone and exits.
        weakref.finalize(self, _wake_worker, self._jobs)

    @property
    def worker(self) -> threading.Thread | None:
        """The reducing thread (``None`` before the first asynchronous batch)."""
        return self._worker

    # ------------------------------------------------------------------------ forward thread
    def sample(self, tensor: paddle.Tensor, signed: bool = False) -> _PooledSample:
        """``|tensor|`` as a sample, shared with recent requests for the same tensor.

        With ``signed`` (affine quantizers) the sample also holds a copy of ``tensor`` itself;
        symmetric-only calibration never pays for that copy.
        """
        # The inplace version tells apart the same tensor before and after an in-place op
        # between two hooks (e.g. ``y = conv1(x); y.scale_(2); conv2(y)``).
        key = (id(tensor), tensor._inplace_version())
        cached = self._recent.get(key)
        if cached is not None and cached[0] is tensor:
            self._recent.move_to_end(key)
            if signed:
                self._attach_signed(cached[1], tensor)
            return cached[1]
        with paddle.no_grad():
            if tensor.dtype == paddle.float32:
                buffer = self._pool.acquire(tuple(tensor.shape))
                paddle.abs(tensor, out=buffer)
                sample = _PooledSample(buffer, self._pool)
            else:
                # float16/bfloat16 have no CPU abs kernel: convert first.
                sample = _PooledSample(paddle.abs(tensor.astype("float32")), _BufferPool())
        if signed:
            self._attach_signed(sample, tensor)
        self._recent[key] = (tensor, sample)
        if len(self._recent) > _DEDUP_WINDOW:
            _, (_, evicted) = self._recent.popitem(last=False)
            evicted.drop()
        return sample

    def _attach_signed(self, sample: _PooledSample, tensor: paddle.Tensor) -> None:
        """Copies ``tensor`` into ``sample`` (once), for consumers that need its sign."""
        if sample.signed_values is not None:
            return
        with paddle.no_grad():
            if tensor.dtype == paddle.float32:
                buffer = self._pool.acquire(tuple(tensor.shape))
                paddle.assign(tensor, output=buffer)
            else:
                buffer = tensor.astype("float32")
        sample.signed_values = buffer

    def submit(self, quantizer: BaseQuantizer, samples: Sequence[_PooledSample], name: str) -> None:
        """Queues one batch of ``samples`` for ``quantizer`` (``name`` is used in errors)."""
        self.raise_pending_error()
        for sample in samples:
            sample.hold()
        if not self.asynchronous:
            self._run(quantizer, samples, name)
            self.raise_pending_error()
            return
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(
                target=_work,
                args=(self._jobs, weakref.ref(self)),
                name="imperative_ptq-calibration",
                daemon=True,
            )
            self._worker.start()
            _LIVE_WORKERS[self._worker] = self._jobs
        try:
            self._jobs.put((quantizer, samples, name))
        except BaseException:
            # Interrupted (Ctrl-C) while waiting for room: the job never reaches the worker,
            # so give back the holds taken above or the buffers never return to the pool.
            for sample in samples:
                sample.drop()
            raise

    def end_forward(self) -> None:
        """Forgets the shared samples of the last forward (their buffers can be reused)."""
        while self._recent:
            _, (_, sample) = self._recent.popitem(last=False)
            sample.drop()

    def flush(self) -> None:
        """Waits until every queued batch is in the statistics.

        Raises:
            CalibrationError: A reduction failed on the worker thread.
        """
        self.end_forward()
        if self._worker is not None:
            self._jobs.join()
        self.raise_pending_error()

    def close(self) -> None:
        """Flushes, stops the worker and frees the buffers."""
        try:
            self.flush()
        finally:
            if self._worker is not None and self._worker.is_alive():
                self._jobs.put(None)
                self._worker.join()
            self._worker = None
            self._pool.clear()

    def raise_pending_error(self) -> None:
        """Re-raises (once) an error that happened on the worker thread."""
        if self._error is not None:
            error, context, self._error = self._error, self._error_context, None
            raise CalibrationError(
                f"calibration failed while sampling {context}: {error}"
            ) from error

    # ------------------------------------------------------------------------- worker thread
    def _run(self, quantizer: BaseQuantizer, samples: Sequence[_PooledSample], name: str) -> None:
        try:
            if self._error is None:
                quantizer.observe_samples(samples)
        except BaseException as error:  # handed to the forward thread
            # Context first: the forward thread reads it as soon as ``_error`` is set.
            self._error_context = name
            self._error = error
            logger.debug("calibration error in %s", name, exc_info=True)
        finally:
            for sample in samples:
                sample.drop()


def _work(jobs: queue.Queue, collector_ref: weakref.ref) -> None:
    """Worker loop: runs jobs until the ``None`` sentinel or until the collector is gone."""
    while True:
        job = jobs.get()
        try:
            collector = None if job is None else collector_ref()
            if collector is None:
                return
            collector._run(*job)
        finally:
            # Drop the strong references before blocking on the queue again.
            collector = job = None
            jobs.task_done()


# Workers still running at interpreter exit (a script that ends, or fails, before convert()):
# a daemon thread caught inside a Paddle kernel when Python finalizes is unwound through C++
# and aborts the process ("FATAL: exception not rethrown", exit status 134). They are stopped
# and joined first; atexit runs before finalization.
_LIVE_WORKERS: "weakref.WeakKeyDictionary[threading.Thread, queue.Queue]" = weakref.WeakKeyDictionary()


@atexit.register
def _stop_workers_at_exit(timeout: float = 10.0) -> None:
    for worker, jobs in list(_LIVE_WORKERS.items()):
        if not worker.is_alive():
            continue
        try:  # after the queued jobs: the kernels they run are never cut short
            jobs.put(None, timeout=timeout)
        except queue.Full:
            continue
        worker.join(timeout)


def _wake_worker(jobs: queue.Queue) -> None:
    try:
        jobs.put_nowait(None)
    except queue.Full:
        pass  # the worker is busy; it finds the collector gone at its next job
