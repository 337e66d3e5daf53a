"""Which tensor of a calibration forward is an ancestor of which: Paddle's autograd graph.

Paddle Inference's oneDNN pipeline fuses a residual add ``r + conv(x)`` into the conv only where
``r`` is an ancestor of the conv's output: a ResNet block's input is (its first conv reads it),
an HRNet fuse layer's ``x1 + conv_bn(x0)`` is not (``x1`` comes from another branch; measured:
the simulation fusing it was 7.6e-3 of the largest output off Paddle Inference). Forward hooks
see each layer's inputs and outputs, not the functional ops between them (``F.relu``,
``F.interpolate``, ``paddle.add``), so they cannot tell. Paddle's autograd graph can: while
:class:`ForwardGraph` records, every op of the forward records its grad node, whose
``next_functions`` lead to the nodes of its inputs' ops. The tensors those nodes would save for
a backward pass are dropped (no backward ever runs), so the forward takes no more memory than
without grad: measured on random-weight ResNet-50 at batch 8, 0.68 GB peak resident memory
against 0.54 GB without grad and 1.23 GB with grad and the saved tensors, the forward about 5%
slower. Calibration records the first forward (:class:`~imperative_ptq.session.CalibrationSession`).

A tensor no op with a grad node wrote (a network input, anything computed under
``paddle.no_grad`` or from frozen parameters only) has no node: :meth:`ForwardGraph.reaches`
then answers ``None`` (unknown), and callers keep their other rules. Outputs of one multi-output
op (``split``) share a node, so each is an ancestor wherever one of them is.

A forward run under ``paddle.no_grad`` (as calibration usually is) is recorded by switching two
pieces of Paddle's global state for it: grad on, and a pair of saved-tensor hooks. Paddle keeps
one pair at a time: while a caller's own pair is in place, such a forward is not recorded. A
forward that raises leaves grad on (the ``no_grad`` block turns it off again as it ends) and the
hooks until the next op outside that forward saves a tensor: they keep that tensor and remove
themselves, so a backward pass elsewhere still works. A forward run with grad on is recorded
as it runs, with its saved tensors.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import paddle
from paddle.autograd import saved_tensors_hooks

__all__ = ["ForwardGraph", "node_of"]

#: The graph whose saved-tensor hooks are in place, if any.
_recording: ForwardGraph | None = None


def node_of(tensor: paddle.Tensor) -> int | None:
    """The address of the grad node of the op that wrote ``tensor``, or ``None`` (no node; a
    tensor that stops gradients may still carry one, but no op reading it links to it)."""
    node = None if tensor.stop_gradient else tensor.grad_fn
    return None if node is None else node.node_ptr()


class ForwardGraph:
    """Records the autograd graph of one forward.

    Use :meth:`begin` from the model's forward-pre hook and :meth:`end` from its forward-post
    hook; :meth:`reaches` answers ancestry questions while the forward's tensors live. A
    forward run with grad on builds its graph anyway and is recorded as it is. One run under
    ``paddle.no_grad`` is recorded with grad switched on and without the tensors a backward
    pass would need; its outputs are then handed back detached (:attr:`switched_grad_on`),
    as ``no_grad`` would have made them.
    """

    def __init__(self) -> None:
        self._forward_frame: FrameType | None = None
        self._hooks: saved_tensors_hooks | None = None
        self._recording = False

    @property
    def recording(self) -> bool:
        """Whether a forward is being recorded."""
        return self._recording

    @property
    def switched_grad_on(self) -> bool:
        """Whether the forward being recorded runs with grad switched on by :meth:`begin`."""
        return self._hooks is not None

    def begin(self, model: paddle.nn.Layer) -> bool:
        """Starts recording the forward of ``model`` that is about to run (called from its
        forward-pre hook, so ``Layer.__call__``'s frame is on the stack).

        Returns:
            Whether it records (``False`` under ``no_grad`` when the calling forward's frame
            is not found or other saved-tensor hooks are in place).
        """
        global _recording
        if _recording is not None:
            _recording.end()  # a forward that raised, of this or another model
        if paddle.is_grad_enabled():
            self._recording, _recording = True, self
            return True
        frame = _calling_frame(model)
        if frame is None:
            return False
        hooks = saved_tensors_hooks(self._pack, _unpack)
        try:
            hooks.__enter__()
        except ValueError:  # the caller's own pair: Paddle takes one at a time
            return False
        paddle.set_grad_enabled(True)
        self._hooks, self._forward_frame, self._recording, _recording = hooks, frame, True, self
        return True

    def end(self, restore_grad: bool = True) -> None:
        """Stops recording (idempotent); the recorded nodes stay reachable from the tensors.

        Args:
            restore_grad: Switch grad back off if :meth:`begin` switched it on.
        """
        global _recording
        if _recording is self:
            _recording = None
        self._recording = False
        if self._hooks is None:
            return
        self._hooks.__exit__(None, None, None)
        self._hooks, self._forward_frame = None, None
        if restore_grad:
            paddle.set_grad_enabled(False)

    @staticmethod
    def reaches(source: int | None, tensor: paddle.Tensor) -> bool | None:
        """Whether the op with grad node ``source`` (:func:`node_of`) is an ancestor of
        ``tensor`` (or wrote it); ``None`` when either has no node."""
        start = None if tensor.stop_gradient else tensor.grad_fn
        if source is None or start is None:
            return None
        seen: set[int] = set()
        pending = [start]
        while pending:
            node = pending.pop()
            if node is None:
                continue
            key = node.node_ptr()
            if key == source:
                return True
            if key in seen:
                continue
            seen.add(key)
            pending.extend(node.next_functions)
        return False

    def _pack(self, tensor: paddle.Tensor) -> Any:
        """Drops a tensor an op saves for a backward pass inside the recorded forward; keeps
        one saved elsewhere (the forward raised, leaving the hooks in place: they go now)."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame is self._forward_frame:
                return None
            frame = frame.f_back
        self.end(restore_grad=False)
        return tensor


def _unpack(packed: Any) -> Any:
    if packed is None:  # (only reachable through a tensor taken from the forward's internals)
        raise RuntimeError(
            "a backward pass through the first calibration forward of a model that "
            "ImperativePTQ.quantize returned, run under paddle.no_grad: that forward records "
            "its graph without the tensors a backward pass needs"
        )
    return packed


def _calling_frame(model: paddle.nn.Layer) -> FrameType | None:
    """The frame of ``model``'s ``Layer.__call__`` that runs its hooks and its forward."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_locals.get("self") is model and frame.f_code.co_name != "forward":
            return frame
        frame = frame.f_back
    return None
