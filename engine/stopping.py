"""Stopping a run on a signal: after the current step when it ends in time, at once when it does not.

SIGTERM, SIGINT and SLURM's warning signals (SIGUSR1, SIGUSR2) ask a run to stop; ``StopRequest``
turns them into a flag that the training loop checks after each step, and into ``StopNow`` when the
step outlasts the grace period (a cold compilation, a long evaluation, data loading).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("cbam")


class StopNow(BaseException):
    """A stop request was not honoured within its grace period: the work in progress is abandoned.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in torch swallows it."""


PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # after these a SLURM job is requeued (train.py)

# An overdue stop is delivered again at this interval until the run carries it out: Python drops an
# exception raised in a weakref callback or a __del__ ("Exception ignored in ..."), and torch's code
# runs such callbacks often, so one delivery can land where its StopNow is lost.
REDELIVER_S = 0.2

# Python that torch's C++ dispatcher calls back: a dispatch mode's or tensor subclass's ``__torch_dispatch__``
# and ``__torch_function__`` (all of AOT autograd's tracing in a compilation runs under them), and the C++
# operator calls in torch/_ops.py. An exception raised there must unwind C++ frames, and under torch 2.4 one of
# them cannot pass it on: the process aborts (``std::terminate`` on ``pybind11::error_already_set``). An overdue
# stop is not raised while such a frame is on the stack (a later delivery lands outside, seconds later even in
# a compilation's tracing) unless it has waited DISPATCH_WAIT_S, so that the run still ends before SLURM's
# KillWait (30 s by default) after the grace period's 10 s.
DISPATCH_WAIT_S = 15.0
ANNOUNCE_WAIT_S = 1.0  # at most this long, the end of a request's context waits for its log line
_DISPATCH_CALLBACKS = frozenset({"__torch_dispatch__", "__torch_function__"})
_OPERATOR_CALLS = os.path.join("torch", "_ops.py")


def _inside_operator_dispatch(frame) -> bool:
    """Whether ``frame`` or a frame that called it is torch's Python operator dispatch (see above)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in _DISPATCH_CALLBACKS or code.co_filename.endswith(_OPERATOR_CALLS):
            return True
        frame = frame.f_back
    return False


class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 (SLURM's warning before preemption or the time limit, as
    ``sbatch --signal`` or submitit sends it) ask the run to
    stop after the current step, so that the checkpoint resumes bit-identically. If the run has not
    stopped ``grace_s`` seconds later (a cold compilation, a long evaluation, data loading), the
    signal is delivered to the main thread again (every ``REDELIVER_S`` until the run calls
    ``settle``) and raises ``StopNow`` there (outside torch's operator dispatch, see
    ``DISPATCH_WAIT_S``), which interrupts blocking waits too; inside
    ``critical()`` (the optimizer update and the bookkeeping after it, milliseconds) it waits for the
    section's end. A second SIGINT stops at once (KeyboardInterrupt). Whoever catches ``StopNow``
    calls ``settle`` first."""

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.requested = False
        self.signum: int | None = None  # the first stop signal
        self.overdue = False
        self._overdue_since = 0.0  # time.monotonic() when the grace period ended
        self.settled = False  # the stop is being carried out: further signals change nothing
        self._critical = 0
        self._depth = 0
        self._previous = {}
        self._announced = threading.Event()  # the stop's log line is written
        self._done = threading.Event()  # settled, or the request's context has ended: no more deliveries
        self._delivering = threading.Lock()  # no delivery after _done is set (the handler may be gone)

    def __enter__(self):
        if self._depth == 0:
            self._done.clear()
            for sig in (signal.SIGTERM, signal.SIGINT, *PREEMPTION_SIGNALS):
                self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._finish()
            if self.requested:
                self._announced.wait(ANNOUNCE_WAIT_S)  # the line is not lost to an exit right after
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.settled:
            return
        if self.overdue:
            if self._critical or isinstance(sys.exc_info()[1], StopNow):  # not while one is handled
                return
            if time.monotonic() - self._overdue_since > DISPATCH_WAIT_S or not _inside_operator_dispatch(frame):
                raise StopNow
            return
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested, self.signum = True, signum
        # Announced by the grace period's thread, not here: the signal may have interrupted the main thread
        # inside a log handler's write, which logging's reentrant lock would let this message re-enter (a
        # file refuses that: "reentrant call inside <_io.BufferedWriter>"); the thread waits for the lock.
        threading.Thread(
            target=self._announce_then_time, args=(signum, threading.main_thread().ident), daemon=True
        ).start()

    def _announce_then_time(self, signum: int, main_thread: int) -> None:
        """The stop's log line, then the grace period: ``_expire`` unless the run ends or settles first."""
        log.warning(
            "%s received: stopping after this step and writing a checkpoint (at most %g s)",
            signal.Signals(signum).name,
            self.grace_s,
        )
        self._announced.set()
        if not self._done.wait(self.grace_s):
            self._expire(main_thread)

    def _expire(self, main_thread: int) -> None:
        self._overdue_since = time.monotonic()
        self.overdue = True
        while True:
            with self._delivering:
                if self._done.is_set():
                    return
                signal.pthread_kill(main_thread, signal.SIGTERM)  # wakes a blocking wait, then raises StopNow
            self._done.wait(REDELIVER_S)

    def _finish(self) -> None:
        with self._delivering:
            self._done.set()

    @contextmanager
    def critical(self):
        """A section that a late stop does not interrupt; ``StopNow`` at its end instead."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self.overdue and not self._critical and not self.settled:
            raise StopNow

    def settle(self) -> None:
        """The stop is being carried out (after ``StopNow``): ignore further signals."""
        self.settled = True
        self._finish()
